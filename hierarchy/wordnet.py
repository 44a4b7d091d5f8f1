"""Build the Tiny ImageNet tree from WordNet hypernym paths (nltk, offline).

Rule for a synset with several hypernym paths: take the longest path (the most
specific chain of hypernyms); among equally long ones, the path that shares the
most nodes with the paths of the other classes (so that a class joins the part of
WordNet where most of its siblings already are); remaining ties go to the path
whose synset names sort first. Then single-child chains are collapsed: an internal
node with exactly one child is replaced by that child (the root is kept).
"""

from __future__ import annotations

import os
import shutil
from collections import Counter
from pathlib import Path

from hierarchy.errors import HmoeError, UsageError
from hierarchy.tree import Hierarchy

DEBIAN_WORDNET = Path("/usr/share/wordnet")
WORDNET_FILES = [
    "data.adj", "data.adv", "data.noun", "data.verb",
    "index.adj", "index.adv", "index.noun", "index.verb", "index.sense",
    "adj.exc", "adv.exc", "noun.exc", "verb.exc",
]
# The lexicographer file table of WordNet 3.0 (man 5 lexnames); Debian ships no file.
LEXNAMES = [
    ("adj.all", 3), ("adj.pert", 3), ("adv.all", 4), ("noun.Tops", 1), ("noun.act", 1),
    ("noun.animal", 1), ("noun.artifact", 1), ("noun.attribute", 1), ("noun.body", 1),
    ("noun.cognition", 1), ("noun.communication", 1), ("noun.event", 1), ("noun.feeling", 1),
    ("noun.food", 1), ("noun.group", 1), ("noun.location", 1), ("noun.motive", 1),
    ("noun.object", 1), ("noun.person", 1), ("noun.phenomenon", 1), ("noun.plant", 1),
    ("noun.possession", 1), ("noun.process", 1), ("noun.quantity", 1), ("noun.relation", 1),
    ("noun.shape", 1), ("noun.state", 1), ("noun.substance", 1), ("noun.time", 1),
    ("verb.body", 2), ("verb.change", 2), ("verb.cognition", 2), ("verb.communication", 2),
    ("verb.competition", 2), ("verb.consumption", 2), ("verb.contact", 2), ("verb.creation", 2),
    ("verb.emotion", 2), ("verb.motion", 2), ("verb.perception", 2), ("verb.possession", 2),
    ("verb.social", 2), ("verb.stative", 2), ("verb.weather", 2), ("adj.ppl", 3),
]
HOW_TO_GET = (
    "WordNet 3.0 is needed offline. On Debian/Ubuntu: apt-get install wordnet-base "
    "wordnet-sense-index (files in /usr/share/wordnet); or, with internet, "
    "python -c \"import nltk; nltk.download('wordnet')\"; or set HMOE_WORDNET_DIR "
    "to a folder holding data.noun, index.noun, ... and index.sense."
)


class WordNetUnavailable(HmoeError, RuntimeError):
    """WordNet could not be found offline."""


def cache_dir() -> Path:
    return Path(os.environ.get("HMOE_CACHE", Path.home() / ".cache" / "hmoe-edge"))


def prepare_nltk_data(source: Path | None = None) -> Path:
    """Copy WordNet files into an nltk_data-shaped folder (copies, not links: nltk
    refuses links that resolve outside its data roots) and add a lexnames file."""
    source = Path(source or os.environ.get("HMOE_WORDNET_DIR", DEBIAN_WORDNET))
    missing = [f for f in WORDNET_FILES if not (source / f).is_file()]
    if missing:
        raise WordNetUnavailable(f"no WordNet at {source} (missing {', '.join(missing[:4])}). {HOW_TO_GET}")
    root = cache_dir() / "nltk_data"
    target = root / "corpora" / "wordnet"
    target.mkdir(parents=True, exist_ok=True)
    for name in WORDNET_FILES:
        src, dst = source / name, target / name
        if not dst.exists() or dst.stat().st_size != src.stat().st_size:
            shutil.copyfile(src, dst)
    lex = "".join(f"{i:02d}\t{name}\t{cat}\n" for i, (name, cat) in enumerate(LEXNAMES))
    if not (target / "lexnames").exists() or (target / "lexnames").read_text() != lex:
        (target / "lexnames").write_text(lex)
    return root


def load_wordnet():
    """nltk's WordNet reader, from nltk's own data if present, else from Debian's files."""
    try:
        import nltk
        from nltk.corpus.reader.wordnet import WordNetCorpusReader
    except ImportError as exc:
        raise WordNetUnavailable(f"nltk is not installed ({exc}); pip install nltk") from None
    try:
        from nltk.corpus import wordnet
        wordnet.ensure_loaded()
        return wordnet
    except LookupError:
        pass
    root = prepare_nltk_data()
    if str(root) not in nltk.data.path:
        nltk.data.path.insert(0, str(root))
    return WordNetCorpusReader(str(root / "corpora" / "wordnet"), None)


def synset_for_wnid(wn, wnid: str):
    if len(wnid) < 2 or wnid[0] != "n" or not wnid[1:].isdigit():
        raise UsageError(f"{wnid!r} is not a WordNet noun id; expected 'n' followed by 8 digits")
    return wn.synset_from_pos_and_offset("n", int(wnid[1:]))


def wnid_of(synset) -> str:
    return f"{synset.pos()}{synset.offset():08d}"


def choose_paths(wn, wnids: list[str]) -> dict[str, list[str]]:
    """One root-to-synset path of wnids per class, by the rule in the module docstring."""
    all_paths = {w: [[wnid_of(s) for s in p] for p in synset_for_wnid(wn, w).hypernym_paths()]
                 for w in wnids}
    popularity = Counter(node for paths in all_paths.values() for p in paths for node in set(p))
    chosen = {}
    for w, paths in all_paths.items():
        def key(p: list[str]) -> tuple:
            return (-len(p), -sum(popularity[n] for n in p), p)
        chosen[w] = min(paths, key=key)
    return chosen


def build_tree_from_paths(paths: dict[str, list[str]], leaf_names: list[str]) -> Hierarchy:
    """Union of root-to-leaf paths, then single-child chains collapsed."""
    parent_of: dict[str, str] = {}
    for leaf in leaf_names:
        p = paths[leaf]
        for a, b in zip(p[:-1], p[1:]):
            if parent_of.setdefault(b, a) != a:
                raise UsageError(f"{b} reached through two parents; paths must form a tree")
    leaf_set = set(leaf_names)
    inner_leaves = [w for w in leaf_names if w in parent_of.values()]
    if inner_leaves:
        raise UsageError(f"classes {inner_leaves[:3]} are hypernyms of other classes; a class must be a leaf")
    children: dict[str, list[str]] = {}
    for child, parent in parent_of.items():
        children.setdefault(parent, []).append(child)
    root = next(n for n in parent_of.values() if n not in parent_of)

    edges: list[tuple[str, str]] = []

    def collapse(node: str) -> str:
        while node not in leaf_set and len(children.get(node, [])) == 1:
            node = children[node][0]
        return node

    def walk(node: str) -> None:
        for c in sorted(children.get(node, [])):
            c = collapse(c)
            edges.append((node, c))
            walk(c)

    walk(root)
    return Hierarchy.from_edges(edges, leaf_names=leaf_names, source="wordnet")


def build_tiny_imagenet(wnids: list[str]) -> Hierarchy:
    wn = load_wordnet()
    return build_tree_from_paths(choose_paths(wn, wnids), wnids)
