"""A bundle on disk: manifest.json plus one ONNX file per expert (no torch needed)."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from hierarchy import Hierarchy
from hierarchy.errors import HmoeError
from hierarchy.manifest import MANIFEST, FileEntry, Manifest, ManifestError, ModelEntry
from hierarchy.spec import InputSpec

__all__ = ["MANIFEST", "Bundle", "BundleError", "ModelEntry", "load_bundle", "sha256_file"]


class BundleError(HmoeError, ValueError):
    """A bundle is missing, malformed, or a file does not match its manifest."""


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass
class Bundle:
    root: Path
    manifest: Manifest

    @property
    def tree(self) -> Hierarchy:
        return self.manifest.tree

    @property
    def input_spec(self) -> InputSpec:
        return self.manifest.input

    @property
    def experts(self) -> dict[str, ModelEntry]:
        return self.manifest.experts

    @property
    def flat(self) -> ModelEntry | None:
        return self.manifest.flat

    def path(self, entry: ModelEntry | FileEntry) -> Path:
        return self.root / entry.file

    def check_file(self, entry: ModelEntry | FileEntry, what: str = "") -> Path:
        """The file's path once its size and sha256 match the manifest; else BundleError."""
        f = entry.file_entry if isinstance(entry, ModelEntry) else entry
        path = self.root / f.file
        what = what or (entry.node if isinstance(entry, ModelEntry) else f.file)
        if not path.is_file():
            raise BundleError(f"{path}: missing (the manifest lists it for {what!r})")
        if path.stat().st_size != f.bytes or sha256_file(path) != f.sha256:
            raise BundleError(f"{path}: sha256 differs from the manifest: the file is corrupt or was tampered "
                              "with; re-export or re-copy the bundle")
        return path

    def int8_entries(self) -> dict[str, ModelEntry]:
        """The int8 models by node name ('flat' for the flat model); empty when not quantized."""
        return self.manifest.int8

    def all_entries(self) -> list[ModelEntry]:
        """Every model file the manifest lists: experts, flat, and int8 variants."""
        return [*self.manifest.models().values(), *self.int8_entries().values()]

    def weights_file(self, node: str) -> Path:
        """The checked safetensors weights of model ``node`` (for on-device training)."""
        entry = self.manifest.models().get(node) or self.manifest.expert(node)
        if entry.weights is None:
            raise BundleError(f"{self.root}: {node!r} carries no trainable weights; re-export the bundle")
        return self.check_file(entry.weights, f"trainable weights of {node}")

    def verify(self) -> list[str]:
        """Check every file; return the problems (empty when the bundle is intact)."""
        problems = []
        checks = [(e, "") for e in self.all_entries()]
        checks += [(e.weights, f"trainable weights of {k}") for k, e in self.manifest.models().items() if e.weights]
        checks += [(t.file, "an expert template") for t in self.manifest.templates]
        for entry, what in checks:
            try:
                self.check_file(entry, what)
            except BundleError as exc:
                problems.append(str(exc))
        return problems


def load_bundle(root: str | os.PathLike) -> Bundle:
    """Read and check the manifest (not the ONNX files: those are checked when loaded)."""
    root = Path(root)
    if not (root / MANIFEST).is_file():
        raise BundleError(f"{root}: not a bundle (no {MANIFEST}); make one with `hmoe export`")
    try:
        return Bundle(root, Manifest.read(root))
    except ManifestError as exc:
        raise BundleError(str(exc)) from None
