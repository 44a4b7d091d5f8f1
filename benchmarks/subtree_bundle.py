"""Personalised bundles: what a device that cares about one subtree carries, against the full
bundle, and a check that it decides as the full model does inside its subtree.

For each --subtrees node of a trained run: export the full bundle and the subtree bundle
(`hmoe export --subtree`), then measure

- size on disk: the whole bundle folder, and the expert ONNX files alone;
- resident memory (each mode in a fresh process, edge_runtime/bench_worker.py): path-only
  loading and all experts loaded, on the test images under the subtree;
- decisions: the subtree bundle's greedy answer for every test image under the subtree,
  against the full bundle's greedy decisions started at the subtree's root
  (`Engine.greedy_from`); they must be equal on every image.

    python benchmarks/subtree_bundle.py --run runs/demo --out docs/results/subtree_bundle

Writes subtree_bundle.json and subtree_bundle.md to --out.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def flat_bytes(bundle) -> int:
    """The flat model's files in a bundle (a subtree bundle has none)."""
    f = bundle.flat
    return 0 if f is None else f.bytes + (f.weights.bytes if f.weights else 0)


def expert_onnx_bytes(bundle) -> int:
    return sum(e.bytes for e in bundle.experts.values())


def results_lines(result: dict) -> list[str]:
    """The Markdown of subtree_bundle.json (also rendered into BENCHMARKS.md)."""
    run, dataset = result["run"], result["dataset"]
    f = result["full"]
    lines = [f"Run `{run}` ({dataset}); full bundle: {len(f['experts'])} experts, "
             f"{f['disk_bytes_without_flat'] / 1e6:.2f} MB on disk without the flat model "
             f"({f['disk_bytes'] / 1e6:.2f} MB with it), expert ONNX files {f['expert_onnx_bytes'] / 1e6:.3f} MB.", "",
             "| subtree | experts | disk (MB) | disk / full (no flat) | expert ONNX / full | resident, all loaded (MB): "
             "subtree / full | added by the models (MB): subtree / full | test images under it | decisions "
             "differing from the full model's | leaf accuracy there |", "|---|---|---|---|---|---|---|---|---|---|"]
    for node, s in result["subtrees"].items():
        m = s["memory"]
        lines.append(f"| {node} | {', '.join(s['experts'])} | {s['disk_bytes'] / 1e6:.2f} | {s['disk_ratio']:.3f} | "
                     f"{s['expert_onnx_ratio']:.3f} | {m['subtree']['all']['resident_mb']:.1f} / "
                     f"{m['full']['all']['resident_mb']:.1f} | {m['subtree']['all']['added_mb']:.2f} / "
                     f"{m['full']['all']['added_mb']:.2f} | {s['test_images_under']} | {s['decisions_differing']} | "
                     f"{s['leaf_accuracy_under']:.4f} |")
    return lines


def main() -> int:
    from edge_runtime import bench
    from edge_runtime.bundle import load_bundle
    from edge_runtime.engine import Engine
    from exporter.bundle import export_run
    from trainer.protocol.run import run_files
    from trainer.prepare import prepare
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default="runs/demo", help="a trained run directory (hmoe train)")
    p.add_argument("--subtrees", nargs="+", default=["Goods", "Clothes"])
    p.add_argument("--out", default="runs/subtree_bundle")
    p.add_argument("--work", default=None, help="where the bundles are exported (default: OUT/bundles)")
    p.add_argument("--images", type=int, default=300, help="images for the memory and latency measurement")
    args = p.parse_args()
    out = Path(args.out)
    work = Path(args.work or out / "bundles")
    work.mkdir(parents=True, exist_ok=True)
    run = Path(args.run)
    cfg, tree, spec = run_files(run)
    data = prepare(cfg).data
    started = time.perf_counter()
    full_dir = work / "full"
    if not (full_dir / "manifest.json").exists():
        export_run(run, full_dir, progress=False)
    full = load_bundle(full_dir)
    result = {"run": str(run), "dataset": cfg.dataset, "machine": bench.machine(), "full": {
        "disk_bytes": folder_bytes(full_dir), "flat_bytes": flat_bytes(full),
        "disk_bytes_without_flat": folder_bytes(full_dir) - flat_bytes(full), "expert_onnx_bytes": expert_onnx_bytes(full),
        "experts": sorted(full.experts)}, "subtrees": {}}
    full_engine = Engine(full)
    for node in args.subtrees:
        sub_dir = work / node
        if not (sub_dir / "manifest.json").exists():
            export_run(run, sub_dir, subtree=node, progress=False)
        sub = load_bundle(sub_dir)
        under = np.flatnonzero(tree.ancestor_mask[tree.leaf_order[data.test_y], tree.index(node)])
        x = spec.normalize(data.test_x[under])
        t = time.perf_counter()
        answers = [pred.node for pred in Engine(sub).predict(x)]
        restricted = full_engine.greedy_from(node, x)
        differ = int(sum(a != b for a, b in zip(answers, restricted)))
        leaf_names = [tree.names[v] for v in tree.leaf_order]
        correct = float(np.mean([a == leaf_names[y] for a, y in zip(answers, data.test_y[under])]))
        print(f"{node}: {len(under)} test images under it, {differ} decisions differ from the full model's "
              f"({time.perf_counter() - t:.0f} s); measuring memory", flush=True)
        mem_full = bench.inference(full_dir, x[:args.images], modes=("path", "all"))
        mem_sub = bench.inference(sub_dir, x[:args.images], modes=("path", "all"))
        result["subtrees"][node] = {
            "experts": sorted(sub.experts), "disk_bytes": folder_bytes(sub_dir),
            "expert_onnx_bytes": expert_onnx_bytes(sub),
            "disk_ratio": folder_bytes(sub_dir) / result["full"]["disk_bytes_without_flat"],
            "expert_onnx_ratio": expert_onnx_bytes(sub) / result["full"]["expert_onnx_bytes"],
            "test_images_under": int(len(under)), "decisions_differing": differ,
            "leaf_accuracy_under": correct,
            "memory": {"full": mem_full, "subtree": mem_sub,
                       "all_loaded_added_ratio": mem_sub["all"]["added_mb"] / mem_full["all"]["added_mb"]
                       if mem_full["all"]["added_mb"] > 0 else None,
                       "all_loaded_resident_ratio": mem_sub["all"]["resident_mb"] / mem_full["all"]["resident_mb"]}}
    result["wall_seconds"] = time.perf_counter() - started
    result["command"] = " ".join(sys.argv)
    out.mkdir(parents=True, exist_ok=True)
    (out / "subtree_bundle.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = results_lines(result)
    (out / "subtree_bundle.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if all(s["decisions_differing"] == 0 for s in result["subtrees"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
