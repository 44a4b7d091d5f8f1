"""A bundle on disk: manifest.json plus one ONNX file per expert (no torch needed)."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from hierarchy import Hierarchy, HierarchyError
from hierarchy.errors import HmoeError
from hierarchy.spec import InputSpec, SpecError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"


class BundleError(HmoeError, ValueError):
    """A bundle is missing, malformed, or a file does not match its manifest."""


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class ModelEntry:
    """One ONNX file of the bundle: an expert (node) or the flat model."""

    node: str
    children: list[str]
    file: str
    sha256: str
    params: int
    bytes: int
    opset: int
    net: dict

    @classmethod
    def from_dict(cls, d: dict, where: str) -> "ModelEntry":
        try:
            return cls(node=str(d["node"]), children=[str(c) for c in d["children"]], file=str(d["file"]),
                       sha256=str(d["sha256"]), params=int(d["params"]), bytes=int(d["bytes"]),
                       opset=int(d["opset"]), net=dict(d.get("net", {})))
        except (KeyError, TypeError, ValueError) as exc:
            raise BundleError(f"manifest {where}: malformed entry ({exc!r}); expected node, children, file, "
                              "sha256, params, bytes, opset") from None


@dataclass
class Bundle:
    root: Path
    manifest: dict
    tree: Hierarchy
    experts: dict[str, ModelEntry]    # by node name
    flat: ModelEntry | None

    @property
    def input(self) -> dict:
        return self.manifest["input"]

    @property
    def input_spec(self) -> InputSpec:
        return InputSpec.from_dict(self.manifest["input"], f"{self.root / MANIFEST}: input")

    def manifest_entry(self, node: str) -> dict:
        """The raw manifest dict of expert ``node``."""
        for d in self.manifest["experts"]:
            if d["node"] == node:
                return d
        raise KeyError(f"unknown expert {node!r}; this bundle's experts are {', '.join(self.experts)}")

    def path(self, entry: ModelEntry) -> Path:
        return self.root / entry.file

    def check_file(self, entry: ModelEntry) -> Path:
        """The file's path once its size and sha256 match the manifest; else BundleError."""
        path = self.path(entry)
        if not path.is_file():
            raise BundleError(f"{path}: missing (the manifest lists it for {entry.node!r})")
        if path.stat().st_size != entry.bytes or sha256_file(path) != entry.sha256:
            raise BundleError(f"{path}: sha256 differs from the manifest: the file is corrupt or was tampered "
                              "with; re-export or re-copy the bundle")
        return path

    def int8_entries(self) -> dict[str, ModelEntry]:
        """The int8 models by node name ('flat' for the flat model); empty when not quantized."""
        q = self.manifest.get("int8") or {}
        out = {d["node"]: ModelEntry.from_dict(d, "int8.experts") for d in q.get("experts", [])}
        if q.get("flat"):
            out["flat"] = ModelEntry.from_dict(q["flat"], "int8.flat")
        return out

    def all_entries(self) -> list[ModelEntry]:
        """Every file the manifest lists: experts, flat, and int8 variants."""
        return [*self.experts.values(), *([self.flat] if self.flat else []), *self.int8_entries().values()]

    def verify(self) -> list[str]:
        """Check every file; return the problems (empty when the bundle is intact)."""
        problems = []
        for entry in self.all_entries():
            try:
                self.check_file(entry)
            except BundleError as exc:
                problems.append(str(exc))
        for d in [*self.manifest["experts"], *([self.manifest["flat"]] if self.manifest.get("flat") else [])]:
            w = d.get("weights")
            if w and (not (self.root / w["file"]).is_file() or sha256_file(self.root / w["file"]) != w["sha256"]):
                problems.append(f"{self.root / w['file']}: trainable weights of {d['node']!r} are missing or "
                                "their sha256 differs from the manifest")
        return problems


def load_bundle(root: str | os.PathLike) -> Bundle:
    """Read and check the manifest (not the ONNX files: those are checked when loaded)."""
    root = Path(root)
    path = root / MANIFEST
    if not path.is_file():
        raise BundleError(f"{root}: not a bundle (no {MANIFEST}); make one with `hmoe export`")
    try:
        m = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(m, dict) or m.get("format_version") != FORMAT_VERSION:
        raise BundleError(f"{path}: format_version {m.get('format_version') if isinstance(m, dict) else None!r}; "
                          f"this runtime reads version {FORMAT_VERSION}")
    for key in ("hierarchy", "input", "experts"):
        if key not in m:
            raise BundleError(f"{path}: missing {key!r}")
    try:
        tree = Hierarchy.from_dict(m["hierarchy"], source=str(path))
    except HierarchyError as exc:
        raise BundleError(str(exc)) from None
    experts = {}
    for i, d in enumerate(m["experts"]):
        e = ModelEntry.from_dict(d, f"experts[{i}]")
        if e.node not in tree._index:
            raise BundleError(f"{path}: expert for unknown node {e.node!r}")
        node = tree.index(e.node)
        want = [tree.names[c] for c in tree.children(node)]
        if e.children != want:
            raise BundleError(f"{path}: expert {e.node!r} lists children {e.children}; the hierarchy has {want}")
        if Path(e.file).name != e.file:
            raise BundleError(f"{path}: file name {e.file!r} must not contain a directory")
        experts[e.node] = e
    missing = [tree.names[v] for v in tree.experts if tree.names[v] not in experts]
    if missing:
        raise BundleError(f"{path}: no expert file for nodes {missing[:5]}")
    flat = ModelEntry.from_dict(m["flat"], "flat") if m.get("flat") else None
    try:
        InputSpec.from_dict(m["input"], f"{path}: input")
    except SpecError as exc:
        raise BundleError(str(exc)) from None
    return Bundle(root, m, tree, experts, flat)
