"""The bundle manifest: one schema, written and read by this code only (exporter, int8 path,
coordinator and edge runtime alike); numpy only, so both sides of the system share it."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

from hierarchy.errors import HmoeError, UnknownNameError
from hierarchy.spec import InputSpec, SpecError
from hierarchy.tree import Hierarchy, HierarchyError, write_text_atomic

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PREPROCESS = "decode, convert to color mode, resize to HxW, x/255, (x - mean) / std"


class ManifestError(HmoeError, ValueError):
    """A manifest is missing a field, holds an impossible value, or disagrees with its hierarchy."""


@dataclass(frozen=True)
class FileEntry:
    """A file of the bundle with its size and sha256."""

    file: str
    sha256: str
    bytes: int

    def to_dict(self) -> dict:
        return {"file": self.file, "sha256": self.sha256, "bytes": self.bytes}

    @classmethod
    def from_dict(cls, d: dict, where: str) -> "FileEntry":
        try:
            entry = cls(str(d["file"]), str(d["sha256"]), int(d["bytes"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ManifestError(f"manifest {where}: malformed file entry ({exc!r}); expected file, sha256, "
                                "bytes") from None
        if Path(entry.file).name != entry.file:
            raise ManifestError(f"manifest {where}: file name {entry.file!r} must not contain a directory")
        return entry


@dataclass(frozen=True)
class ModelEntry:
    """One model of the bundle: an expert (node) or the flat model, its ONNX file and, for
    on-device training, its weights as safetensors."""

    node: str
    children: list[str]
    file: str
    sha256: str
    params: int
    bytes: int
    opset: int
    net: dict
    weights: FileEntry | None = None

    def to_dict(self) -> dict:
        d = {"node": self.node, "children": list(self.children), "file": self.file, "sha256": self.sha256,
             "params": self.params, "bytes": self.bytes, "opset": self.opset, "net": dict(self.net)}
        if self.weights is not None:
            d["weights"] = self.weights.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict, where: str) -> "ModelEntry":
        try:
            entry = cls(node=str(d["node"]), children=[str(c) for c in d["children"]], file=str(d["file"]),
                        sha256=str(d["sha256"]), params=int(d["params"]), bytes=int(d["bytes"]),
                        opset=int(d["opset"]), net=dict(d.get("net", {})),
                        weights=FileEntry.from_dict(d["weights"], f"{where}.weights") if d.get("weights") else None)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            if isinstance(exc, ManifestError):
                raise
            raise ManifestError(f"manifest {where}: malformed entry ({exc!r}); expected node, children, file, "
                                "sha256, params, bytes, opset") from None
        if Path(entry.file).name != entry.file:
            raise ManifestError(f"manifest {where}: file name {entry.file!r} must not contain a directory")
        return entry

    @property
    def file_entry(self) -> FileEntry:
        return FileEntry(self.file, self.sha256, self.bytes)


@dataclass(frozen=True)
class TemplateEntry:
    """An expert architecture with its weights as graph inputs and its number of outputs open:
    one onnxruntime session that runs any expert whose ``net`` matches, given the expert's
    safetensors weights (how the edge engine runs experts its memory budget cannot keep open)."""

    file: FileEntry
    net: dict            # the experts' net config without num_outputs

    def to_dict(self) -> dict:
        return {**self.file.to_dict(), "net": dict(self.net)}

    @classmethod
    def from_dict(cls, d: dict, where: str) -> "TemplateEntry":
        if not isinstance(d, dict) or not isinstance(d.get("net"), dict):
            raise ManifestError(f"manifest {where}: malformed template entry; expected file, sha256, bytes, net")
        return cls(FileEntry.from_dict(d, where), dict(d["net"]))

    def serves(self, entry: "ModelEntry") -> bool:
        return template_key(entry.net) == template_key(self.net)


def template_key(net: dict) -> str:
    """What experts must share to run through one template: the net config but its outputs."""
    return json.dumps({k: v for k, v in net.items() if k != "num_outputs"}, sort_keys=True)


@dataclass(frozen=True)
class Manifest:
    """What a device receives: the hierarchy, the input it expects, and one entry per model."""

    tree: Hierarchy
    input: InputSpec
    experts: dict[str, ModelEntry]                         # by node name, in the tree's expert order
    flat: ModelEntry | None = None
    int8: dict[str, ModelEntry] = field(default_factory=dict)   # by node name, "flat" for the flat model
    int8_info: dict = field(default_factory=dict)          # calibration images, format
    subtree_of: str | None = None
    source: dict = field(default_factory=dict)             # the run and data set it came from
    created_by: str = "hmoe-edge"
    templates: list[TemplateEntry] = field(default_factory=list)   # fp32 experts' weights-as-inputs graphs

    def __post_init__(self) -> None:
        tree = self.tree
        for node, e in self.experts.items():
            if e.node != node or node not in tree._index:
                raise ManifestError(f"manifest: expert for unknown node {e.node!r}")
            want = [tree.names[c] for c in tree.children(tree.index(node))]
            if e.children != want:
                raise ManifestError(f"manifest: expert {node!r} lists children {e.children}; the hierarchy has {want}")
        missing = [tree.names[v] for v in tree.experts if tree.names[v] not in self.experts]
        if missing:
            raise ManifestError(f"manifest: no expert file for nodes {missing[:5]}")

    def expert(self, node: str) -> ModelEntry:
        try:
            return self.experts[node]
        except KeyError:
            raise UnknownNameError(f"unknown expert {node!r}; this bundle's experts are "
                                   f"{', '.join(self.experts)}") from None

    def models(self) -> dict[str, ModelEntry]:
        """The fp32 models by name: the experts, and 'flat' when the bundle has it."""
        return {**self.experts, **({"flat": self.flat} if self.flat else {})}

    def template_for(self, node: str) -> TemplateEntry | None:
        """The template that runs fp32 expert ``node`` (None when the bundle has none for it)."""
        entry = self.expert(node)
        if entry.weights is None:
            return None
        return next((t for t in self.templates if t.serves(entry)), None)

    def with_int8(self, int8: dict[str, ModelEntry], info: dict) -> "Manifest":
        return replace(self, int8=dict(int8), int8_info=dict(info))

    def to_dict(self) -> dict:
        return {
            "format_version": FORMAT_VERSION,
            "created_by": self.created_by,
            "hierarchy": self.tree.to_dict(),
            "input": {**self.input.to_dict(), "resize": list(self.input.shape[1:]), "dtype": "float32",
                      "layout": "NCHW", "preprocess": PREPROCESS},
            "experts": [e.to_dict() for e in self.experts.values()],
            "flat": self.flat.to_dict() if self.flat else None,
            "subtree_of": self.subtree_of,
            "quantization": "int8" if self.int8 else None,
            "int8": ({"experts": [e.to_dict() for k, e in self.int8.items() if k != "flat"],
                      "flat": self.int8["flat"].to_dict() if "flat" in self.int8 else None, **self.int8_info}
                     if self.int8 else None),
            "source": dict(self.source),
            **({"templates": [t.to_dict() for t in self.templates]} if self.templates else {}),
        }

    @classmethod
    def from_dict(cls, m: object, where: str = MANIFEST) -> "Manifest":
        if not isinstance(m, dict) or m.get("format_version") != FORMAT_VERSION:
            found = m.get("format_version") if isinstance(m, dict) else None
            raise ManifestError(f"{where}: format_version {found!r}; this release reads version {FORMAT_VERSION}")
        for key in ("hierarchy", "input", "experts"):
            if key not in m:
                raise ManifestError(f"{where}: missing {key!r}")
        try:
            tree = Hierarchy.from_dict(m["hierarchy"], source=where)
            spec = InputSpec.from_dict(m["input"], f"{where}: input")
        except (HierarchyError, SpecError) as exc:
            raise ManifestError(str(exc)) from None
        if not isinstance(m["experts"], list):
            raise ManifestError(f"{where}: 'experts' must be a list of model entries")
        experts = [ModelEntry.from_dict(d, f"{where} experts[{i}]") for i, d in enumerate(m["experts"])]
        q = m.get("int8") or {}
        int8 = {d["node"]: ModelEntry.from_dict(d, f"{where} int8.experts") for d in q.get("experts", [])}
        if q.get("flat"):
            int8["flat"] = ModelEntry.from_dict(q["flat"], f"{where} int8.flat")
        if not isinstance(m.get("templates") or [], list):
            raise ManifestError(f"{where}: 'templates' must be a list of template entries")
        templates = [TemplateEntry.from_dict(d, f"{where} templates[{i}]") for i, d in enumerate(m.get("templates") or [])]
        try:
            return cls(tree, spec, {e.node: e for e in experts},
                       ModelEntry.from_dict(m["flat"], f"{where} flat") if m.get("flat") else None, int8,
                       {k: v for k, v in q.items() if k not in ("experts", "flat")}, m.get("subtree_of"),
                       dict(m.get("source") or {}), str(m.get("created_by", "")), templates)
        except ManifestError as exc:
            raise ManifestError(f"{where}: {str(exc).removeprefix('manifest: ')}") from None

    def write(self, folder: Path) -> Path:
        path = Path(folder) / MANIFEST
        write_text_atomic(path, json.dumps(self.to_dict(), indent=1) + "\n")
        return path

    @classmethod
    def read(cls, folder: Path) -> "Manifest":
        path = Path(folder) / MANIFEST
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
            raise ManifestError(f"{path}: not valid JSON ({exc.__class__.__name__}: {exc})") from None
        return cls.from_dict(data, str(path))
