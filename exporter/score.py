"""Information F1 of a bundle on a data set's test split, with onnxruntime and numpy only.

    python -m exporter.score --bundle runs/demo/bundle --dataset fashion-mnist [--out F.json]

Proves the bundle alone reproduces the trained run: torch is never imported (checked
at the end through sys.modules). The test split is read with trainer.datasets, which
needs numpy only. `hmoe demo` runs it in a process of its own.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from edge_runtime.engine import Engine
from hierarchy import info_f1, summarize
from trainer.datasets import load_dataset


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", required=True)
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--data-root", default=None)
    p.add_argument("--decode", nargs="+", default=["greedy", "beam:2", "threshold:0.5"])
    p.add_argument("--variant", default="fp32", choices=["fp32", "int8"])
    p.add_argument("--out", help="write the figures to this JSON file")
    args = p.parse_args()
    data = load_dataset(args.dataset, args.data_root)
    engine = Engine(args.bundle, variant=args.variant)
    x = engine.bundle.input_spec.normalize(data.test_x)
    tree = engine.tree
    gt = tree.leaves[data.test_y]
    out: dict = {"bundle": str(args.bundle), "variant": args.variant, "test_images": int(len(x)), "hmoe": {}}
    for spec in args.decode:
        t = time.perf_counter()
        d = engine.decode(x, spec)
        out["hmoe"][spec] = {**summarize(tree, gt, d.nodes), "experts_per_input": float(d.experts_evaluated.mean()),
                             "seconds": time.perf_counter() - t}
    if "flat" in engine.entries:
        nodes = engine.flat_nodes(x)
        out["flat"] = {"leaf": {"info_f1": float(info_f1(tree, gt, nodes).mean()),
                                "leaf_accuracy": float(np.mean(nodes == gt))}}
    out["torch_imported"] = "torch" in sys.modules
    text = json.dumps(out, indent=1)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)
    return 1 if out["torch_imported"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
