"""The ``hanzi`` taxonomy: GB2312 level 1 (3,755 printed Chinese characters) under their
Kangxi radicals, from the Unihan database that Debian's ``unicode-data`` installs.

- ``kGB0`` (Unihan_OtherMappings) gives each GB2312 character its row and cell; rows 16-55
  are level 1, the standard set of Chinese character recognition benchmarks.
- ``kRSUnicode`` (Unihan_IRGSources) gives its radical and residual strokes ("64.4"; a
  trailing apostrophe marks the radical's simplified form, "149'.2", which is the same
  Kangxi radical here). Where it lists several, the first is the character's own.
- ``kFrequency`` (Unihan_DictionaryLikeData) ranks common characters 1 (most) to 5;
  ``hanzi:N`` keeps the N most frequent (ties in GB2312 order; no rank counts as 6).
- ``CJKRadicals.txt`` and ``UnicodeData.txt`` name the radicals ("64 hand 手").

The tree is root -> radical -> character; a radical with one character among those kept
is collapsed (its character hangs from the root). ``hanzi-strokes`` adds a level: root ->
the radical's stroke count -> radical -> character (the Kangxi order counts strokes).
Only the standard library and numpy: this module belongs to ``hierarchy``.
"""

from __future__ import annotations

import bz2
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from hierarchy.tree import Hierarchy, HierarchyError

PACKAGE = "unicode-data"
LEVEL1_ROWS = range(16, 56)
# The first radical of each stroke count in the Kangxi order (radical 1..214).
STROKE_STARTS = (1, 7, 30, 61, 95, 118, 147, 167, 176, 187, 195, 201, 205, 209, 211, 212, 214)


class UnihanError(HierarchyError):
    """The Unihan database is missing or malformed, or a character has no radical."""


def unicode_dir() -> Path:
    return Path(os.environ.get("HMOE_UNICODE_DIR", "/usr/share/unicode"))


def _open(name: str):
    path = unicode_dir() / name
    if not path.is_file():
        raise UnihanError(f"{path}: missing; the hanzi taxonomy needs Debian's {PACKAGE} package "
                          f"(make setup installs it, or apt-get install {PACKAGE})")
    return bz2.open(path, "rt", encoding="utf-8") if name.endswith(".bz2") else path.open(encoding="utf-8")


def _field(file: str, field: str) -> dict[str, str]:
    """Character -> value of one Unihan field."""
    out: dict[str, str] = {}
    try:
        with _open(file) as f:
            for line in f:
                if line.startswith("U+"):
                    parts = line.rstrip("\n").split("\t")
                    if len(parts) == 3 and parts[1] == field:
                        out[chr(int(parts[0][2:], 16))] = parts[2]
    except (OSError, EOFError, ValueError) as exc:
        raise UnihanError(f"{unicode_dir() / file}: unreadable ({exc}); reinstall {PACKAGE}") from None
    if not out:
        raise UnihanError(f"{unicode_dir() / file}: no {field} entries; reinstall {PACKAGE}")
    return out


@dataclass(frozen=True)
class Character:
    char: str
    gb: int            # GB2312 row * 100 + cell
    radical: int       # Kangxi radical 1..214
    strokes: int       # residual strokes
    frequency: int     # kFrequency 1..5, 6 when Unihan gives none


@lru_cache(maxsize=1)
def level1() -> tuple[Character, ...]:
    """GB2312 level 1 in GB2312 order, each with its radical, strokes and frequency rank."""
    gb = _field("Unihan_OtherMappings.txt.bz2", "kGB0")
    rs = _field("Unihan_IRGSources.txt.bz2", "kRSUnicode")
    freq = _field("Unihan_DictionaryLikeData.txt.bz2", "kFrequency")
    out = []
    for char, code in gb.items():
        row = int(code) // 100
        if row not in LEVEL1_ROWS:
            continue
        value = rs.get(char)
        if value is None:
            raise UnihanError(f"character {char} (U+{ord(char):04X}) has no kRSUnicode radical entry in "
                              f"{unicode_dir() / 'Unihan_IRGSources.txt.bz2'}")
        radical, _, strokes = value.split()[0].partition(".")
        out.append(Character(char, int(code), int(radical.rstrip("'")), int(strokes or 0),
                             int(freq.get(char, 6))))
    out.sort(key=lambda c: c.gb)
    return tuple(out)


@lru_cache(maxsize=1)
def radical_names() -> dict[int, str]:
    """Kangxi radical number -> "64 hand 手" (number, Unicode name, the radical's ideograph)."""
    names = {}
    try:
        with _open("UnicodeData.txt") as f:
            for line in f:
                code, name = line.split(";", 2)[:2]
                if name.startswith("KANGXI RADICAL "):
                    names[int(code, 16)] = name[len("KANGXI RADICAL "):].lower()
        out = {}
        with _open("CJKRadicals.txt") as f:
            for line in f:
                if not line.strip() or line.startswith("#"):
                    continue
                number, radical, ideograph = (p.strip() for p in line.split(";"))
                if number.endswith("'"):
                    continue
                out[int(number)] = f"{int(number)} {names.get(int(radical, 16), 'radical')} {chr(int(ideograph, 16))}"
    except (OSError, ValueError) as exc:
        raise UnihanError(f"{unicode_dir()}: radical names unreadable ({exc}); reinstall {PACKAGE}") from None
    return out


def radical_strokes(radical: int) -> int:
    return sum(1 for s in STROKE_STARTS if s <= radical)


def characters(n: int | None = None) -> list[Character]:
    """The ``n`` most frequent level-1 characters (all 3,755 when ``n`` is None), in GB2312 order."""
    chars = level1()
    if n is None:
        return list(chars)
    if not 2 <= n <= len(chars):
        raise UnihanError(f"hanzi:{n}: expected between 2 and {len(chars)} characters")
    keep = sorted(chars, key=lambda c: (c.frequency, c.gb))[:n]
    return sorted(keep, key=lambda c: c.gb)


def options(name: str) -> tuple[str, int, int]:
    """A data-set name's options after the tree's name, in any order: ``:xC`` images per
    character and face (1 to 64, default 1) and ``:Spx`` the images' side in pixels (16 to
    128, default 32): ``hanzi:500:x4:64px`` -> ("hanzi:500", 4, 64)."""
    copies, side = 1, 32
    while name.count(":") >= 1:
        last = name.rsplit(":", 1)[-1]
        if last[:1] == "x" and last[1:].isdigit():
            copies = int(last[1:])
            if not 1 <= copies <= 64:
                raise UnihanError(f"{name}: expected between x1 and x64 images per character and face")
        elif last.endswith("px") and last[:-2].isdigit():
            side = int(last[:-2])
            if not 16 <= side <= 128:
                raise UnihanError(f"{name}: expected a side between 16px and 128px")
        else:
            break
        name = name.rsplit(":", 1)[0]
    return name, copies, side


def copies(name: str) -> int:
    """Images per (character, face) a data-set name asks for: ``hanzi:500:x4`` -> 4 (default 1)."""
    return options(name)[1]


def side(name: str) -> int:
    """The images' side in pixels a data-set name asks for: ``hanzi:500:64px`` -> 64 (default 32)."""
    return options(name)[2]


def parse(name: str) -> tuple[str, int | str | None]:
    """``hanzi``, ``hanzi:500``, ``hanzi:@FILE``, ``hanzi-strokes:500`` -> (kind, n or FILE); the
    options after it (``:xC``, ``:Spx``, :func:`options`) are the data set's, not the tree's."""
    name = options(name)[0]
    kind, _, n = name.partition(":")
    if kind not in ("hanzi", "hanzi-strokes"):
        raise UnihanError(f"unknown taxonomy {name!r}")
    if n.startswith("@"):
        return kind, n[1:]
    try:
        return kind, int(n) if n else None
    except ValueError:
        raise UnihanError(f"{name}: expected {kind}, {kind}:N with N a number of characters, or {kind}:@FILE "
                          "with FILE a list of characters") from None


def from_file(path: str) -> list[Character]:
    """The characters listed in a UTF-8 text file (whitespace and commas ignored), each of
    which must be in GB2312 level 1; in GB2312 order."""
    try:
        text = open(path, encoding="utf-8").read()
    except (OSError, UnicodeDecodeError) as exc:
        raise UnihanError(f"{path}: cannot read the character list ({exc})") from None
    wanted = [ch for ch in text if not ch.isspace() and ch != ","]
    known = {c.char: c for c in level1()}
    unknown = [ch for ch in dict.fromkeys(wanted) if ch not in known]
    if unknown:
        shown = ", ".join(f"{ch} (U+{ord(ch):04X})" for ch in unknown[:5])
        raise UnihanError(f"{path}: {len(unknown)} characters are not in GB2312 level 1, the hanzi classes: {shown}")
    if len(set(wanted)) < 2:
        raise UnihanError(f"{path}: lists {len(set(wanted))} distinct characters; expected at least 2")
    return sorted((known[ch] for ch in dict.fromkeys(wanted)), key=lambda c: c.gb)


def select(n: int | str | None) -> list[Character]:
    """``characters(n)`` for a count, ``from_file`` for a path."""
    return from_file(n) if isinstance(n, str) else characters(n)


def tree(name: str = "hanzi") -> Hierarchy:
    """The taxonomy ``hanzi[:N|:@FILE]`` or ``hanzi-strokes[...]``; leaves in GB2312 order."""
    kind, n = parse(name)
    chars = select(n)
    names = radical_names()
    by_radical: dict[int, list[str]] = {}
    for c in chars:
        by_radical.setdefault(c.radical, []).append(c.char)
    edges = []
    groups: dict[int, list[str]] = {}
    for radical in sorted(by_radical):
        kids = by_radical[radical]
        node = names.get(radical, f"{radical} radical")
        top = node if len(kids) > 1 else kids[0]
        if len(kids) > 1:
            edges += [(node, k) for k in kids]
        groups.setdefault(radical_strokes(radical), []).append(top)
    if kind == "hanzi":
        edges = [("root", top) for g in groups.values() for top in g] + edges
    else:
        for strokes, tops in groups.items():
            if len(tops) > 1:
                edges = [("root", f"{strokes} strokes")] + [(f"{strokes} strokes", t) for t in tops] + edges
            else:
                edges = [("root", tops[0])] + edges
    return Hierarchy.from_edges(edges, leaf_names=[c.char for c in chars], source=name)
