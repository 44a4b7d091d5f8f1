"""Memory-capped local training of one expert on a device (the only torch user in edge_runtime).

The network definition and the local update are the trainer's own (imported lazily
here, never on the inference path), so a device's update is bit-for-bit what the
simulation would compute for the same data, seed and effective batch.

Memory: "growth" is the peak resident-set growth of the process over its idle state,
where idle means torch already warmed up by one step of a one-channel network (the
same definition as the per-round cost benchmark). The cap is met by choosing the
micro-batch: one training step is measured at micro-batches 1, 2, 4, ..., the
largest micro-batch whose measured step stayed under the cap is used, and gradients
are accumulated so the effective batch, and so the result, does not change.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

from edge_runtime.bundle import Bundle, load_bundle
from hierarchy.errors import HmoeError
from hierarchy.npz import read_npz
from trainer.device.memory import SAFETY, MemoryCapError, PeakMeter, plan_micro_batch, release_freed_memory, warm_up

__all__ = ["SAFETY", "PeakMeter", "TrainError", "load_local_data", "plan_micro_batch", "release_freed_memory",
           "train_expert", "warm_up", "write_update"]



class TrainError(HmoeError, ValueError):
    """Local training cannot run as asked (unknown expert, bad data, cap too small...)."""


# ------------------------------------------------------------------ local data
def _slug(name: str) -> str:
    return name.replace("/", "_")


def load_local_data(path: str | os.PathLike, bundle: Bundle) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (N, C, H, W) images and leaf labels (in the bundle's leaf order) from a folder
    with one sub-folder per leaf class (named as the leaf, '/' written '_'), or an .npz
    with ``images`` and ``labels`` (leaf names or label indices)."""
    from edge_runtime.images import ImageError, decode_pixels
    path = Path(path)
    tree = bundle.tree
    leaf_names = [tree.names[i] for i in tree.leaves]
    by_slug = {_slug(n): k for k, n in enumerate(leaf_names)} | {n: k for k, n in enumerate(leaf_names)}
    spec = bundle.input_spec
    c, h, w = spec.shape
    if path.is_dir():
        xs, ys = [], []
        classes = sorted(p for p in path.iterdir() if p.is_dir())
        unknown = [p.name for p in classes if p.name not in by_slug]
        if unknown:
            raise TrainError(f"{path}: class folders {unknown[:5]} are not leaves of the hierarchy; expected "
                             f"folders named after leaves, e.g. {', '.join(_slug(n) for n in leaf_names[:4])}")
        for folder in classes:
            for f in sorted(folder.iterdir()):
                if not f.is_file():
                    continue
                try:
                    xs.append(decode_pixels(f.read_bytes(), spec).round().clip(0, 255).astype(np.uint8))
                except ImageError as exc:
                    raise TrainError(f"{f}: {exc}") from None
                ys.append(by_slug[folder.name])
        if not xs:
            raise TrainError(f"{path}: no images found in class folders")
        return np.stack(xs), np.asarray(ys, dtype=np.int64)
    if path.suffix == ".npz" and path.is_file():
        try:
            z = read_npz(path, ("images", "labels"))
            images, labels = z["images"], z["labels"]
        except (KeyError, ValueError, OSError) as exc:
            raise TrainError(f"{path}: expected an .npz with arrays 'images' and 'labels' ({exc})") from None
        if images.ndim == 3:
            images = images[:, None]
        elif images.ndim == 4 and images.shape[-1] == c and images.shape[1] != c:
            images = images.transpose(0, 3, 1, 2)
        if images.shape[1:] != (c, h, w):
            raise TrainError(f"{path}: images of shape {images.shape[1:]}; the bundle expects {(c, h, w)}")
        if images.dtype != np.uint8:
            raise TrainError(f"{path}: images of dtype {images.dtype}; expected uint8 pixels")
        if labels.dtype.kind in "US":
            unknown = sorted({str(v) for v in labels} - set(by_slug))
            if unknown:
                raise TrainError(f"{path}: labels {unknown[:5]} are not leaves of the hierarchy")
            labels = np.array([by_slug[str(v)] for v in labels], dtype=np.int64)
        labels = labels.astype(np.int64)
        if len(labels) != len(images) or (len(labels) and (labels.min() < 0 or labels.max() >= len(leaf_names))):
            raise TrainError(f"{path}: {len(images)} images, {len(labels)} labels, labels must lie in "
                             f"[0, {len(leaf_names)})")
        return np.ascontiguousarray(images), labels
    raise TrainError(f"{path}: expected a folder of class folders or an .npz file")


# ------------------------------------------------------------------- training
def expert_weights(bundle: Bundle, expert: str) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file
    return load_file(str(bundle.weights_file(expert)))


def train_expert(bundle: Bundle | str | os.PathLike, expert: str, x: np.ndarray, labels: np.ndarray,
                 memory_cap_mb: float | None, local=None, seed: int = 0,
                 weights: dict[str, np.ndarray] | None = None,
                 trunk: dict[str, np.ndarray] | None = None) -> tuple[dict[str, np.ndarray], dict]:
    """Train ``expert`` on uint8 images ``x`` with leaf ``labels``; returns new weights and a report.
    An expert on a shared trunk needs ``trunk``, the trunk's weights (the coordinator's current
    ones; a bundle's own experts on a trunk are not trainable from the bundle alone yet)."""
    from trainer.device.client import LocalConfig, Normalizer, local_update
    from trainer.device.nets import NetConfig
    bundle = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
    tree = bundle.tree
    if expert not in bundle.experts:
        raise TrainError(f"unknown expert {expert!r}; this bundle's experts are {', '.join(bundle.experts)}")
    local = local or LocalConfig()
    mask, target = tree.lcpn(tree.index(expert), labels)
    if not mask.any():
        raise TrainError(f"none of the {len(labels)} local samples lies under {expert!r}; nothing to train")
    xs = np.ascontiguousarray(x[mask])
    net_cfg = NetConfig.from_json(json.dumps(bundle.experts[expert].net))
    if net_cfg.trunk_blocks and trunk is None:
        raise TrainError(f"{expert!r} runs on the run's shared trunk; training it needs the trunk's weights "
                         "(hmoe-edge sync fetches them from the coordinator)")
    weights = weights if weights is not None else expert_weights(bundle, expert)
    normalize = Normalizer(bundle.input_spec.mean, bundle.input_spec.std)
    report: dict = {"expert": expert, "samples": int(mask.sum()), "memory_cap_mb": memory_cap_mb,
                    "effective_batch": local.batch_size, "seed": seed}
    plan = None
    loss_before = _loss(net_cfg, weights, xs, target, normalize, trunk=trunk)
    if memory_cap_mb is not None:
        release_freed_memory()
        warm_up(net_cfg, local, normalize)
        meter = PeakMeter()
        try:
            plan = plan_micro_batch(net_cfg, local, normalize, xs, target, memory_cap_mb, meter, trunk=trunk)
        except MemoryCapError as exc:
            raise TrainError(str(exc)) from None
        report.update(micro_batch=plan.micro_batch, probe_growth_mb=plan.predicted_mb, probes_mb=plan.probes)
        meter.reset()
    t = time.perf_counter()
    new, metrics = local_update(net_cfg, weights, xs, target, local, normalize, seed,
                                micro_batch=plan.micro_batch if plan else None, trunk=trunk)
    report["seconds"] = time.perf_counter() - t
    if plan is not None:
        report["peak_growth_mb"] = meter.growth_mb()
        report["within_cap"] = report["peak_growth_mb"] <= memory_cap_mb
    report.update(loss_before=loss_before, loss_after=_loss(net_cfg, new, xs, target, normalize, trunk=trunk),
                  train_loss=metrics["train_loss"])
    return new, report


def _loss(net_cfg, weights, x, y, normalize, batch: int = 32, trunk=None) -> float:
    import torch

    from trainer.device.client import OnTrunkInput, load_numpy
    from trainer.device.nets import build_net
    net = build_net(net_cfg)
    load_numpy(net, weights)
    net.eval()
    if net_cfg.trunk_blocks:
        normalize = OnTrunkInput(net_cfg, trunk, normalize, "cpu")
    total = 0.0
    with torch.no_grad():
        for lo in range(0, len(x), batch):
            xb = normalize(torch.from_numpy(x[lo:lo + batch]))
            total += float(torch.nn.functional.cross_entropy(net(xb), torch.from_numpy(y[lo:lo + batch]),
                                                             reduction="sum"))
    return total / max(1, len(x))


def write_update(out: str | os.PathLike, weights: dict[str, np.ndarray], report: dict) -> Path:
    """``OUT.safetensors`` with the weights and ``OUT.json`` with the report (both atomic)."""
    from safetensors.numpy import save

    from hierarchy.tree import write_bytes_atomic, write_text_atomic
    out = Path(out)
    base = out.with_suffix("") if out.suffix in (".safetensors", ".json") else out
    path = base.with_name(base.name + ".safetensors")
    write_bytes_atomic(path, save({k: np.ascontiguousarray(v) for k, v in weights.items()},
                                  metadata={"expert": report["expert"], "samples": str(report["samples"])}))
    write_text_atomic(base.with_name(base.name + ".json"), json.dumps(report, indent=1) + "\n")
    return path
