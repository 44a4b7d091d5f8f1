"""Greedy decoding of one image at a time against the flat model, on one bundle: with every
expert open, and under memory budgets that hold part of the tree (closing the deepest
expert first, or the least recently used), one onnxruntime thread.

    python benchmarks/greedy_latency.py --bundle runs/demo/bundle --out docs/results/greedy_latency

Inputs are Fashion-MNIST's test images for a 1x28x28 bundle (else seeded noise). Writes
greedy_latency.json: p50 / p95 in ms per setting, session creations (misses), and
whether the one-input path gave the batch decoder's leaf for every image.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edge_runtime.engine import Engine  # noqa: E402


def inputs(engine: Engine, n: int) -> np.ndarray:
    spec = engine.bundle.input_spec
    shape = tuple(spec.shape)
    try:
        from trainer.datasets import load_dataset
        if shape != (1, 28, 28):
            raise LookupError
        x = load_dataset("fashion-mnist", download=False).test_x[:n].astype(np.float32) / 255.0
    except Exception:   # noqa: BLE001 - another shape, or no data set: seeded noise of the bundle's shape
        x = np.random.default_rng(0).random((n, *shape), dtype=np.float32)
    mean = np.asarray(spec.mean, dtype=np.float32).reshape(-1, 1, 1)
    std = np.asarray(spec.std, dtype=np.float32).reshape(-1, 1, 1)
    return ((x - mean) / std).astype(np.float32)


def timed(fn, x: np.ndarray) -> dict:
    ts = []
    for i in range(len(x)):
        t = time.perf_counter()
        fn(x[i:i + 1])
        ts.append((time.perf_counter() - t) * 1e3)
    return {"p50_ms": float(np.percentile(ts, 50)), "p95_ms": float(np.percentile(ts, 95))}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", required=True)
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.8], help="shares of the experts' bytes")
    p.add_argument("--out", default="runs/greedy_latency")
    args = p.parse_args()
    full = Engine(args.bundle)
    full.preload(flat=True)
    x = inputs(full, args.images)
    batch = full.decode(x, "threshold:0.0").nodes   # the batch decoder
    one = np.array([int(full.decode(x[i:i + 1]).nodes[0]) for i in range(len(x))])
    rows = {"flat": timed(full.flat_nodes, x), "greedy, every expert open": timed(full.decode, x),
            "greedy, every expert open, batch decoder": timed(lambda xi: full.decode(xi, "threshold:0.0"), x)}
    total = sum(e.bytes for e in full.bundle.experts.values())
    for share in args.budgets:
        for policy in ("deepest first", "least recently used"):
            e = Engine(args.bundle, memory_budget_mb=share * total / 2**20,
                       eviction="lru" if policy == "least recently used" else "deepest")
            r = timed(e.decode, x)
            r["misses"] = e.stats.misses
            rows[f"greedy, budget {share:.0%} of the experts' bytes, {policy}"] = r
    for name, r in rows.items():
        print(f"{name}: p50 {r['p50_ms']:.3f} ms, p95 {r['p95_ms']:.3f} ms" +
              (f", {r['misses']} session creations" if "misses" in r else ""))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "greedy_latency.json").write_text(json.dumps({
        "command": "python benchmarks/greedy_latency.py " + " ".join(sys.argv[1:]), "images": len(x),
        "same_leaf_as_batch_decoder": int((one == batch).sum()), "rows": rows}, indent=1) + "\n")
    print(f"same leaf as the batch decoder: {int((one == batch).sum())} of {len(x)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
