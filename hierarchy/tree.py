"""A class taxonomy as a topologically ordered parent array (numpy only)."""

from __future__ import annotations

import csv
import json
import os
import tempfile
from collections.abc import Iterable, Sequence
from functools import cached_property
from pathlib import Path

import numpy as np

from hierarchy.errors import HmoeError, UnknownNameError, UsageError

FORMAT_VERSION = 1
MAX_NODES = 100_000   # the largest tree read from a file or a manifest (all 3,755 characters: about 4,000 nodes)


class HierarchyError(HmoeError, ValueError):
    """A tree description is malformed (cycle, two parents, several roots, ...)."""


class Hierarchy:
    """Nodes 0..n-1, root 0 with parent -1, every parent before its children.

    ``leaf_order`` lists the leaf nodes in the data set's label order: label ``k``
    is node ``leaf_order[k]``. Names are for the boundary; everything else is indices.
    """

    def __init__(self, parents: Sequence[int], names: Sequence[str],
                 leaf_order: Sequence[int] | None = None) -> None:
        parents = np.asarray(parents, dtype=np.int64)
        if parents.ndim != 1 or len(parents) == 0:
            raise HierarchyError("a hierarchy needs at least one node (the root)")
        if len(names) != len(parents):
            raise HierarchyError(f"{len(names)} names for {len(parents)} nodes")
        if parents[0] != -1:
            raise HierarchyError("node 0 must be the root (parent -1)")
        later = np.flatnonzero(parents[1:] >= np.arange(1, len(parents))) + 1
        bad_root = np.flatnonzero(parents[1:] < 0) + 1
        if len(bad_root):
            raise HierarchyError(f"node {names[bad_root[0]]!r} is a second root; exactly one root expected")
        if len(later):
            n = later[0]
            raise HierarchyError(f"node {names[n]!r} comes before its parent; parents must precede children")
        if len(set(names)) != len(names):
            seen: set = set()
            dup = next(x for x in names if x in seen or seen.add(x))
            raise HierarchyError(f"node name {dup!r} appears twice; names must be unique")
        self.parents: np.ndarray = parents
        self.names: list[str] = [str(x) for x in names]
        self._index = {name: i for i, name in enumerate(self.names)}
        is_leaf = self.num_children == 0
        if leaf_order is None:
            leaf_order = np.flatnonzero(is_leaf)
        leaf_order = np.asarray(leaf_order, dtype=np.int64)
        if sorted(leaf_order.tolist()) != np.flatnonzero(is_leaf).tolist():
            raise HierarchyError("leaf_order must list every leaf exactly once")
        self.leaf_order: np.ndarray = leaf_order
        self.parents.setflags(write=False)
        self.leaf_order.setflags(write=False)

    # ---------------------------------------------------------------- building
    @classmethod
    def from_edges(cls, pairs: Iterable[tuple[str, str]],
                   leaf_names: Sequence[str] | None = None,
                   source: str = "edges") -> "Hierarchy":
        """Build from ``(parent, child)`` name pairs; ``leaf_names`` fixes label order."""
        parent_of: dict[str, str] = {}
        children: dict[str, list[str]] = {}
        seen: dict[str, None] = {}  # insertion-ordered set
        for lineno, (parent, child) in enumerate(pairs, start=1):
            parent, child = str(parent).strip(), str(child).strip()
            if not parent or not child:
                raise HierarchyError(f"{source}: row {lineno}: empty node name")
            if parent == child:
                raise HierarchyError(f"{source}: row {lineno}: {child!r} is its own parent (a cycle)")
            if child in parent_of:
                if parent_of[child] == parent:
                    raise HierarchyError(f"{source}: row {lineno}: duplicate edge {parent!r} -> {child!r}")
                raise HierarchyError(
                    f"{source}: row {lineno}: node {child!r} has two parents "
                    f"({parent_of[child]!r} and {parent!r}); a tree allows one")
            parent_of[child] = parent
            children.setdefault(parent, []).append(child)
            for name in (parent, child):
                if name not in seen:
                    seen[name] = None
        if not parent_of:
            raise HierarchyError(f"{source}: no edges; expected rows of 'parent,child'")
        roots = [n for n in seen if n not in parent_of]
        if not roots:
            cyc = next(iter(parent_of))
            raise HierarchyError(f"{source}: every node has a parent, so there is a cycle (through {cyc!r})")
        if len(roots) > 1:
            raise HierarchyError(f"{source}: several roots {roots[:5]}; exactly one node without a parent expected")
        names = [roots[0]]
        parents = [-1]
        queue = 0
        while queue < len(names):
            for child in children.get(names[queue], []):
                names.append(child)
                parents.append(queue)
            queue += 1
        if len(names) != len(parent_of) + 1:
            unreached = sorted(set(parent_of) - set(names))
            raise HierarchyError(
                f"{source}: nodes {unreached[:5]} are not reachable from root {roots[0]!r}: they form a cycle")
        tree = cls(parents, names)
        if leaf_names is not None:
            tree = tree.with_leaf_order(leaf_names)
        return tree

    @classmethod
    def from_csv(cls, path: str | os.PathLike, leaf_names: Sequence[str] | None = None) -> "Hierarchy":
        """Rows ``parent,child``; a header row ``parent,child`` or ``superclass,class`` is skipped."""
        path = Path(path)
        if not path.is_file():
            raise HierarchyError(f"{path}: no such file; expected a CSV of 'parent,child' rows")
        with path.open(newline="") as f:
            rows = [r for r in csv.reader(f) if r and any(c.strip() for c in r)]
        if not rows:
            raise HierarchyError(f"{path}: empty file; expected rows of 'parent,child'")
        for i, r in enumerate(rows, start=1):
            if len(r) != 2:
                raise HierarchyError(f"{path}: row {i}: {len(r)} fields; expected 'parent,child'")
        if [c.strip().lower() for c in rows[0]] in (["parent", "child"], ["superclass", "class"]):
            rows = rows[1:]
        return cls.from_edges([(r[0], r[1]) for r in rows], leaf_names=leaf_names, source=str(path))

    def with_leaf_order(self, leaf_names: Sequence[str]) -> "Hierarchy":
        leaf_set = {self.names[i] for i in np.flatnonzero(self.num_children == 0)}
        unknown = [n for n in leaf_names if n not in self._index]
        if unknown:
            raise HierarchyError(f"leaf order names unknown nodes {unknown[:5]}")
        not_leaves = [n for n in leaf_names if n not in leaf_set]
        if not_leaves:
            raise HierarchyError(f"leaf order names internal nodes {not_leaves[:5]}; expected leaves")
        missing = sorted(leaf_set - set(leaf_names))
        if missing or len(set(leaf_names)) != len(leaf_names):
            raise HierarchyError(f"leaf order must list every leaf once; missing {missing[:5]}")
        return Hierarchy(self.parents, self.names, [self._index[n] for n in leaf_names])

    # ------------------------------------------------------------ serialising
    def to_dict(self) -> dict:
        return {
            "format_version": FORMAT_VERSION,
            "names": self.names,
            "parents": self.parents.tolist(),
            "experts": [self.names[e] for e in self.experts],
            "leaves": [self.names[i] for i in self.leaf_order],
        }

    @classmethod
    def from_dict(cls, d: dict, source: str = "hierarchy") -> "Hierarchy":
        for key in ("names", "parents", "leaves"):
            if key not in d:
                raise HierarchyError(f"{source}: missing key {key!r}; expected names, parents, leaves")
        names, parents, leaves = d["names"], d["parents"], d["leaves"]
        for key, value in (("names", names), ("parents", parents), ("leaves", leaves)):
            if not isinstance(value, list):
                raise HierarchyError(f"{source}: {key!r} is {type(value).__name__}; expected a list")
        if len(names) > MAX_NODES:   # before any work per node: a hostile manifest costs nothing
            raise HierarchyError(f"{source}: {len(names)} nodes; this release reads trees of at most {MAX_NODES}")
        if not all(isinstance(n, str) for n in names):
            raise HierarchyError(f"{source}: 'names' holds a value that is not a string")
        index = {n: i for i, n in enumerate(names)}   # one pass: linear in the tree, not leaves x names
        try:
            leaf_order = [index[n] for n in leaves]
        except (KeyError, TypeError) as exc:
            raise HierarchyError(f"{source}: 'leaves' names a node not in 'names': {str(exc)[:80]}") from None
        return cls(parents, names, leaf_order)

    def to_json(self, path: str | os.PathLike) -> None:
        """Write atomically: a failure leaves no half-written file."""
        write_text_atomic(Path(path), json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "Hierarchy":
        path = Path(path)
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise HierarchyError(f"{path}: no such file; expected a hierarchy JSON") from None
        if not text.strip():
            raise HierarchyError(f"{path}: empty file; expected a hierarchy JSON")
        try:
            d = json.loads(text)
        except json.JSONDecodeError as exc:
            raise HierarchyError(f"{path}: not valid JSON (line {exc.lineno}: {exc.msg})") from None
        return cls.from_dict(d, source=str(path))

    # ------------------------------------------------------------- structure
    def __len__(self) -> int:
        return len(self.parents)

    def __repr__(self) -> str:
        return (f"Hierarchy(nodes={len(self)}, leaves={self.num_leaves}, "
                f"experts={len(self.experts)}, depth={int(self.depths.max())})")

    def index(self, name: str) -> int:
        try:
            return self._index[name]
        except KeyError:
            raise UnknownNameError(f"unknown node {name!r}; the hierarchy has {len(self)} nodes "
                           f"(e.g. {self.names[:3]})") from None

    def indices(self, names: Iterable[str]) -> np.ndarray:
        return np.array([self.index(n) for n in names], dtype=np.int64)

    @cached_property
    def num_children(self) -> np.ndarray:
        return np.bincount(self.parents[1:], minlength=len(self)).astype(np.int64)

    @cached_property
    def _children(self) -> list[np.ndarray]:
        order = np.argsort(self.parents[1:], kind="stable") + 1
        splits = np.cumsum(self.num_children)[:-1]
        return np.split(order, splits)

    def children(self, node: int) -> np.ndarray:
        return self._children[node]

    @property
    def leaves(self) -> np.ndarray:
        """Leaf node indices in the data set's label order."""
        return self.leaf_order

    @property
    def num_leaves(self) -> int:
        return len(self.leaf_order)

    @cached_property
    def experts(self) -> np.ndarray:
        """Internal nodes with two or more children, in topological order."""
        return np.flatnonzero(self.num_children >= 2)

    @cached_property
    def depths(self) -> np.ndarray:
        d = np.zeros(len(self), dtype=np.int64)
        for i in range(1, len(self)):
            d[i] = d[self.parents[i]] + 1
        return d

    @cached_property
    def paths(self) -> np.ndarray:
        """(n, max_depth+1) root-to-node paths padded with -1."""
        out = np.full((len(self), int(self.depths.max()) + 1), -1, dtype=np.int64)
        out[0, 0] = 0
        for i in range(1, len(self)):
            d = self.depths[i]
            out[i, :d] = out[self.parents[i], :d]
            out[i, d] = i
        return out

    def path(self, node: int) -> list[int]:
        return [int(v) for v in self.paths[node] if v >= 0]

    @cached_property
    def ancestor_mask(self) -> np.ndarray:
        """(n, n) bool: ``mask[v, u]`` iff u is an ancestor of v or v itself."""
        mask = np.zeros((len(self), len(self)), dtype=bool)
        rows, cols = np.nonzero(self.paths >= 0)
        mask[rows, self.paths[rows, cols]] = True
        return mask

    @cached_property
    def num_leaf_descendants(self) -> np.ndarray:
        return self.ancestor_mask[self.leaf_order].sum(axis=0).astype(np.int64)

    @cached_property
    def information(self) -> np.ndarray:
        """I(v) = log2 L - log2 |leaves(v)|, uniform over leaf classes (bits)."""
        return np.log2(self.num_leaves) - np.log2(self.num_leaf_descendants)

    def lca(self, a: np.ndarray | int, b: np.ndarray | int) -> np.ndarray:
        """Vectorised lowest common ancestor of node arrays ``a`` and ``b``."""
        a, b = np.broadcast_arrays(np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64))
        pa, pb = self.paths[a], self.paths[b]
        same = np.cumprod((pa == pb) & (pa >= 0), axis=-1).astype(bool)
        depth = same.sum(axis=-1) - 1
        return np.take_along_axis(pa, depth[..., None], axis=-1)[..., 0]

    def is_ancestor(self, a: np.ndarray | int, b: np.ndarray | int) -> np.ndarray:
        """True where ``a`` is an ancestor of ``b`` or equal to it."""
        a, b = np.broadcast_arrays(np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64))
        return self.ancestor_mask[b, a]

    # ---------------------------------------------------------- relabelling
    @cached_property
    def child_position(self) -> np.ndarray:
        """Node -> its position among its parent's children (-1 for the root)."""
        pos = np.full(len(self), -1, dtype=np.int64)
        for kids in self._children:
            pos[kids] = np.arange(len(kids))
        return pos

    def lcpn(self, expert: int, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For leaf ``labels`` (label indices): mask of samples under ``expert`` (a strict
        ancestor of the leaf) and, for those samples, the index of the child on the path."""
        labels = np.asarray(labels, dtype=np.int64)
        if labels.size and (labels.min() < 0 or labels.max() >= self.num_leaves):
            raise UsageError(f"leaf labels must lie in [0, {self.num_leaves}); got "
                             f"[{labels.min()}, {labels.max()}]")
        leaves = self.leaf_order[labels]
        depth = self.depths[expert]
        mask = (self.paths[leaves, depth] == expert) & (self.depths[leaves] > depth)
        child = self.paths[leaves[mask], depth + 1]
        return mask, self.child_position[child]

    def subtree(self, node: int) -> "Hierarchy":
        """The subtree rooted at ``node`` with leaves in this tree's label order."""
        keep = np.flatnonzero(self.ancestor_mask[:, node])
        remap = {int(old): new for new, old in enumerate(keep)}
        parents = [-1] + [remap[int(self.parents[v])] for v in keep[1:]]
        leaves = [remap[int(v)] for v in self.leaf_order if int(v) in remap]
        return Hierarchy(parents, [self.names[v] for v in keep], leaves)

    def render(self, mark_experts: bool = True) -> str:
        """ASCII drawing of the tree, experts marked with ``*``."""
        lines: list[str] = []

        def walk(node: int, prefix: str, last: bool, top: bool) -> None:
            mark = " *" if mark_experts and self.num_children[node] >= 2 else ""
            label = f"{self.names[node]}{mark}"
            lines.append(label if top else f"{prefix}{'`-- ' if last else '|-- '}{label}")
            kids = self.children(node)
            child_prefix = "" if top else prefix + ("    " if last else "|   ")
            for j, c in enumerate(kids):
                walk(int(c), child_prefix, j == len(kids) - 1, False)

        walk(0, "", True, True)
        return "\n".join(lines)


def write_text_atomic(path: Path, text: str, mode: int = 0o644) -> None:
    """Write ``text`` (UTF-8) to ``path`` through a temporary file and a rename."""
    write_bytes_atomic(path, text.encode(), mode)


def write_bytes_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` via a temporary file, fsync and rename: readers see the old
    file or the whole new one, never a half-written one. The file has ``mode`` from its first
    byte on (the temporary file is created 0600 and only ever widened to ``mode``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
