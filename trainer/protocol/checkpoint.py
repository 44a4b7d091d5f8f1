"""Checkpoints: safetensors weights with the network config in the file's metadata."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save

from hierarchy.errors import HmoeError
from hierarchy.tree import write_bytes_atomic
from trainer.device.config import NetConfig
from trainer.device.config import Weights


class CheckpointError(HmoeError, ValueError):
    """A checkpoint is missing, corrupt, or does not match what was expected."""


def save_checkpoint(path: str | os.PathLike, weights: Weights, cfg: NetConfig, meta: dict | None = None) -> None:
    """Write atomically (temporary file, fsync, rename)."""
    metadata = {"config": cfg.to_json(), "meta": json.dumps(meta or {})}
    write_bytes_atomic(Path(path), save({k: np.ascontiguousarray(v) for k, v in weights.items()}, metadata=metadata))


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="numpy") as f:
            return f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors checkpoint ({exc})") from None


def load_checkpoint(path: str | os.PathLike) -> tuple[Weights, NetConfig, dict]:
    """Weights, the config to rebuild the network, and the stored metadata."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint missing")
    meta = read_metadata(path)
    if "config" not in meta:
        raise CheckpointError(f"{path}: no network config in the checkpoint metadata")
    try:
        weights = load_file(str(path))
        cfg = NetConfig.from_json(meta["config"])
        extra = json.loads(meta.get("meta", "{}"))
    except (SafetensorError, OSError, ValueError, TypeError) as exc:
        raise CheckpointError(f"{path}: corrupt checkpoint ({exc})") from None
    expected = cfg.param_shapes()
    got = {k: tuple(v.shape) for k, v in weights.items()}
    if got != expected:
        diff = sorted(set(got.items()) ^ set(expected.items()))[:3]
        raise CheckpointError(f"{path}: weights do not match the stored config (differences: {diff})")
    return weights, cfg, extra
