"""Shipped taxonomies, looked up by name: ``load_taxonomy('fashion-mnist')``."""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from importlib import resources
from pathlib import Path

from hierarchy.tree import Hierarchy, HierarchyError

FASHION_MNIST_LABELS = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
FASHION_MNIST_TREE = {
    "root": ["Clothes", "Goods"],
    "Clothes": ["Tops", "Bottoms", "Dresses", "Outers"],
    "Tops": ["T-shirt/top", "Pullover", "Shirt"],
    "Bottoms": ["Trouser"],
    "Dresses": ["Dress"],
    "Outers": ["Coat"],
    "Goods": ["Accessories", "Shoes"],
    "Accessories": ["Bag"],
    "Shoes": ["Sandal", "Sneaker", "Ankle boot"],
}
TINY_IMAGENET_JSON = "tiny_imagenet_tree.json"


def _data_path(name: str) -> Path:
    return Path(str(resources.files("hierarchy") / "data" / name))


def fashion_mnist() -> Hierarchy:
    edges = [(p, c) for p, kids in FASHION_MNIST_TREE.items() for c in kids]
    return Hierarchy.from_edges(edges, leaf_names=FASHION_MNIST_LABELS, source="fashion-mnist")


def cifar100_superclass_rows() -> list[tuple[str, str]]:
    with _data_path("cifar100_superclasses.csv").open(newline="") as f:
        rows = list(csv.reader(f))
    return [(r[0], r[1]) for r in rows[1:] if r]


def cifar100() -> Hierarchy:
    """root -> 20 superclasses -> 5 classes; leaves in CIFAR-100's (alphabetical) label order."""
    rows = cifar100_superclass_rows()
    edges = [("root", sup) for sup in dict.fromkeys(r[0] for r in rows)] + rows
    return Hierarchy.from_edges(edges, leaf_names=sorted(r[1] for r in rows), source="cifar100")


def tiny_imagenet_wnids() -> list[str]:
    return _data_path("tiny-imagenet-200_wnids.txt").read_text().split()


def tiny_imagenet() -> Hierarchy:
    """The tree built from WordNet (see hierarchy.wordnet), shipped as package data."""
    return Hierarchy.from_json(_data_path(TINY_IMAGENET_JSON))


def build_tiny_imagenet() -> Hierarchy:
    """Rebuild the Tiny ImageNet tree from WordNet (needs nltk and WordNet offline)."""
    from hierarchy.wordnet import build_tiny_imagenet as build
    return build(tiny_imagenet_wnids())


TAXONOMIES: dict[str, Callable[[], Hierarchy]] = {
    "fashion-mnist": fashion_mnist,
    "cifar100": cifar100,
    "tiny-imagenet": tiny_imagenet,
}
BUILDERS: dict[str, Callable[[], Hierarchy]] = {**TAXONOMIES, "tiny-imagenet": build_tiny_imagenet}


def _lookup(name: str, table: dict[str, Callable[[], Hierarchy]]) -> Hierarchy:
    if name.split(":")[0] in ("hanzi", "hanzi-strokes"):
        from hierarchy.hanzi import tree
        return tree(name)
    if name.startswith("csv:"):
        return Hierarchy.from_csv(name[4:])
    if name.startswith("json:"):
        return Hierarchy.from_json(name[5:])
    try:
        return table[name]()
    except KeyError:
        raise HierarchyError(f"unknown taxonomy {name!r}; expected one of "
                             f"{', '.join(TAXONOMIES)}, hanzi[:N], hanzi-strokes[:N], csv:PATH or json:PATH") from None


def load_taxonomy(name: str) -> Hierarchy:
    """A shipped taxonomy by name, or ``csv:PATH`` / ``json:PATH``."""
    return _lookup(name, TAXONOMIES)


def read_tree(spec: str) -> Hierarchy:
    """A tree given by the user: a file (``.csv`` of parent,child rows; ``.json`` holding
    either a hierarchy as ``hmoe hierarchy`` writes it or a mapping parent -> [children]) or
    a shipped taxonomy's name."""
    path = Path(spec)
    if not path.is_file():
        if spec in TAXONOMIES or spec.startswith(("csv:", "json:", "hanzi")):
            return load_taxonomy(spec)
        raise HierarchyError(f"{spec}: no such file and not a shipped taxonomy; expected a .csv of parent,child "
                             f"rows, a .json tree, or one of {', '.join(TAXONOMIES)}")
    if path.suffix.lower() == ".csv":
        return Hierarchy.from_csv(path)
    try:
        d = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise HierarchyError(f"{path}: not valid JSON ({exc}); expected a tree") from None
    if isinstance(d, dict) and "names" in d:
        return Hierarchy.from_dict(d, str(path))
    if not isinstance(d, dict) or not all(isinstance(v, list) for v in d.values()):
        raise HierarchyError(f"{path}: expected a hierarchy JSON (names, parents, leaves) or a mapping "
                             'parent -> [children], e.g. {"root": ["a", "b"]}')
    return Hierarchy.from_edges([(p, c) for p, kids in d.items() for c in kids], source=str(path))


def build_taxonomy(name: str) -> Hierarchy:
    """Like ``load_taxonomy`` but regenerates trees that are built from sources (WordNet)."""
    return _lookup(name, BUILDERS)
