"""On-device measurements: inference latency and resident memory per loading mode, and
(with torch installed) one local training round per expert, as the paper's Table 1.

Inference is measured in fresh processes (``python -m edge_runtime.bench_worker``) so
one mode's sessions never sit in another's resident memory.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from edge_runtime.bundle import load_bundle

MODES = ("path", "all", "flat", "deepest")


def machine() -> dict:
    import psutil
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith(("model name", "Model")))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "machine": platform.machine(), "cores": os.cpu_count(),
            "memory_gb": round(psutil.virtual_memory().total / 2**30, 2), "platform": platform.platform()}


def inference(bundle: str | os.PathLike, images: np.ndarray, modes=MODES, threads: int = 1,
              variant: str = "fp32") -> dict:
    """Per mode: median and p95 latency (batch 1) and resident memory the loaded models add over
    the ready engine (and over onnxruntime merely imported); ``variant`` int8 uses the bundle's
    quantized models."""
    b = load_bundle(bundle)
    out = {}
    with tempfile.TemporaryDirectory(prefix="hmoe-bench-") as tmp:
        np.save(Path(tmp) / "x.npy", np.ascontiguousarray(images, dtype=np.float32))
        for mode in modes:
            if mode == "flat" and (b.flat is None or (variant == "int8" and "flat" not in b.int8_entries())):
                continue
            proc = subprocess.run([sys.executable, "-m", "edge_runtime.bench_worker", str(bundle), mode,
                                   str(Path(tmp) / "x.npy"), str(threads), variant], capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"bench worker ({mode}) failed: {proc.stderr.strip()[-1500:]}")
            out[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
    if "path" in out and "all" in out and out["all"]["added_mb"] > 0:
        out["path_over_all_added"] = out["path"]["added_mb"] / out["all"]["added_mb"]
        out["path_over_all_added_over_import"] = (out["path"]["added_mb_over_import"]
                                                  / out["all"]["added_mb_over_import"])
    return out


def random_images(bundle, n: int, seed: int = 0) -> np.ndarray:
    shape = list(load_bundle(bundle).input_spec.shape)
    return np.random.default_rng(seed).standard_normal((n, *shape)).astype(np.float32)


def training(bundle: str | os.PathLike, x: np.ndarray | None = None, labels: np.ndarray | None = None,
             samples: int = 512, batch_size: int = 32) -> dict:
    """One local round per expert (and the flat model's cost on a same-size network built from
    its config), each in a fresh process: wall time and peak memory growth. Needs torch."""
    from safetensors.numpy import load_file

    from trainer.device.client import LocalConfig
    from trainer.device.cost import summarize_costs, task_cost
    from trainer.device.nets import NetConfig
    b = load_bundle(bundle)
    tree = b.tree
    rng = np.random.default_rng(0)
    c, h, w = b.input_spec.shape
    if x is None:
        x = rng.integers(0, 256, (samples, c, h, w), dtype=np.uint8)
        labels = rng.integers(0, tree.num_leaves, samples)
    local = LocalConfig(batch_size=batch_size)
    per_task = {}
    entries = dict(b.experts) | ({"flat": b.flat} if b.flat else {})
    for key, entry in entries.items():
        cfg = NetConfig.from_json(json.dumps(entry.net))
        weights = load_file(str(b.weights_file(key)))
        if key == "flat":
            xs, ys = x, labels
        else:
            mask, ys = tree.lcpn(tree.index(key), labels)
            xs = x[mask]
        if len(xs) == 0:
            continue
        per_task[key] = task_cost(cfg, weights, [(xs, ys, local)], b.input_spec.mean, b.input_spec.std, 0)
    return summarize_costs(per_task)
