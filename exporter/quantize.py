"""Static int8 (QDQ) quantization of a bundle's models, with an fp32-vs-int8 report."""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from edge_runtime.bundle import load_bundle, sha256_file
from edge_runtime.engine import Engine
from hierarchy import info_f1
from hierarchy.errors import UsageError
from trainer.datasets import Dataset

CALIBRATION_IMAGES = 300


class _Reader:
    """onnxruntime CalibrationDataReader over a float32 array."""

    def __init__(self, x: np.ndarray, name: str = "input", batch: int = 32) -> None:
        self.batches = iter([{name: x[i:i + batch]} for i in range(0, len(x), batch)])

    def get_next(self):
        return next(self.batches, None)

    def rewind(self) -> None:  # not needed by MinMax calibration
        pass


def _calibration(data: Dataset, tree, node: str | None, n: int, seed: int = 0) -> np.ndarray:
    """Training images under ``node`` (all images for the flat model)."""
    y = data.train_y
    idx = np.arange(len(y))
    if node is not None:
        mask, _ = tree.lcpn(tree.index(node), y)
        idx = idx[mask]
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(idx, min(n, len(idx)), replace=False))
    return data.input_spec.normalize(data.train_x[pick])


def _median_latency_ms(engine: Engine, key: str, x: np.ndarray, reps: int = 50) -> float:
    engine.run(key, x[:1])
    times = []
    for i in range(reps):
        t = time.perf_counter()
        engine.run(key, x[i % len(x):i % len(x) + 1])
        times.append((time.perf_counter() - t) * 1000)
    return float(np.median(times))


def quantize_bundle(folder: Path, data: Dataset, experts: dict, flat, mode: str) -> dict:
    """Write ``<file>.int8.onnx`` beside every model, add them to the manifest under
    ``int8``, and return the fp32-vs-int8 comparison (bytes, test F1, latency)."""
    if mode != "int8":
        raise UsageError(f"unknown quantization {mode!r}; expected int8")
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    bundle = load_bundle(folder)
    tree = bundle.tree
    int8 = {}
    for key, entry in bundle.manifest.models().items():
        src = folder / entry.file
        dst = folder / entry.file.replace(".onnx", ".int8.onnx")
        node = None if key == "flat" else entry.node
        calib = _calibration(data, tree, node, CALIBRATION_IMAGES)
        root_logger = logging.getLogger()
        level = root_logger.level
        root_logger.setLevel(logging.ERROR)  # onnxruntime advises pre-processing on every call
        try:
            quantize_static(str(src), str(dst), _Reader(calib), quant_format=QuantFormat.QDQ,
                            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, per_channel=True)
        finally:
            root_logger.setLevel(level)
        int8[key] = replace(entry, file=dst.name, sha256=sha256_file(dst), bytes=dst.stat().st_size)
    bundle.manifest.with_int8(int8, {"calibration_images": CALIBRATION_IMAGES,
                                     "format": "QDQ, int8 activations and per-channel int8 weights"}).write(folder)
    x = data.input_spec.normalize(data.test_x)
    gt = tree.leaves[data.test_y] if tree.num_leaves == data.tree.num_leaves else None
    report: dict = {}
    for variant in ("fp32", "int8"):
        engine = Engine(folder, variant=variant)
        row: dict = {"total_bytes": int(sum(e.bytes for e in engine.entries.values()))}
        if gt is not None:
            row["info_f1_greedy"] = float(info_f1(tree, gt, engine.decode(x).nodes).mean())
            if "flat" in engine.entries:
                row["flat_info_f1"] = float(info_f1(tree, gt, engine.flat_nodes(x)).mean())
        row["median_latency_ms"] = {k: _median_latency_ms(engine, k, x) for k in engine.entries}
        report[variant] = row
    if "info_f1_greedy" in report["fp32"]:
        report["info_f1_drop"] = report["fp32"]["info_f1_greedy"] - report["int8"]["info_f1_greedy"]
    report["bytes_ratio"] = report["int8"]["total_bytes"] / report["fp32"]["total_bytes"]
    return report
