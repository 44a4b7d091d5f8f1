"""Edge inference: latency (batch 1) and resident memory, path-only vs all experts vs flat.

For the demo bundle (real Fashion-MNIST test images) and CIFAR-100-shaped bundles
(21 experts; built here from a one-round run on synthetic 3x32x32 data, since only
the shapes matter for cost; one per --cifar-widths, the first is the project's
default expert width), each mode runs in a fresh process. Memory is what the loaded
models add over the ready engine (onnxruntime imported and started, manifest read,
no model loaded), and, beside it, over onnxruntime merely imported (its start-up,
~9-10 MB, then counts as added by the first model). Writes edge_inference.json and
edge_inference.md to --out.

    python benchmarks/edge_inference.py --demo-bundle runs/demo/bundle --out runs/edge_bench
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from edge_runtime import bench


def cifar_shaped_bundle(work: Path, width: int) -> Path:
    from exporter.bundle import export_run
    from trainer.run import RunConfig
    from trainer.simulation import Federation, open_run
    out = work / f"cifar_bundle_w{width}"
    if (out / "manifest.json").exists():
        return out
    cfg = RunConfig(dataset="synthetic:3,32,32:cifar100:4000", clients=4, clients_per_round=2, hmoe_rounds=1,
                    flat_rounds=1, expert_width=width, flat_width=2 * width)
    run = work / f"cifar_run_w{width}"
    cfg, prep = open_run(run, cfg, resume=True)
    for kind in ("hmoe", "flat"):
        Federation(run, kind, cfg, prep).run(progress=False)
    export_run(run, out, progress=False, validate_images=100)
    return out


def demo_images(bundle: Path, n: int) -> np.ndarray:
    from trainer.datasets import load_dataset
    b = bench.load_bundle(bundle)
    data = load_dataset(b.manifest.source["dataset"])
    return b.input_spec.normalize(data.test_x[:n])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--demo-bundle", default="runs/demo/bundle")
    p.add_argument("--out", default="runs/edge_bench")
    p.add_argument("--images", type=int, default=300)
    p.add_argument("--cifar-widths", type=int, nargs="+", default=[16, 32, 64],
                   help="expert widths of the CIFAR-100-shaped bundles (flat model: twice that)")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"machine": bench.machine(), "images": args.images, "bundles": {}}
    demo = Path(args.demo_bundle)
    if (demo / "manifest.json").exists():
        result["bundles"]["demo (Fashion-MNIST)"] = bench.inference(demo, demo_images(demo, args.images))
    else:
        print(f"note: {demo} not found (run `make demo` first); measuring the CIFAR-100-shaped bundle only")
    for width in args.cifar_widths:
        cifar = cifar_shaped_bundle(out, width)
        name = f"CIFAR-100-shaped, 21 experts of width {width}"
        result["bundles"][name] = bench.inference(cifar, bench.random_images(cifar, args.images))
        experts = bench.load_bundle(cifar).experts.values()
        result["bundles"][name]["expert_mb_on_disk"] = sum(e.bytes for e in experts) / 2**20
    (out / "edge_inference.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [("| bundle | mode | median ms | p95 ms | first prediction ms | added MB over ready engine "
              "| added MB over onnxruntime imported | resident MB |"), "|---|---|---|---|---|---|---|---|"]
    for name, modes in result["bundles"].items():
        for mode, r in modes.items():
            if isinstance(r, dict):
                lines.append(f"| {name} | {mode} | {r['latency_ms_median']:.2f} | {r['latency_ms_p95']:.2f} | "
                             f"{r['first_prediction_ms']:.1f} | {r['added_mb']:.1f} | "
                             f"{r['added_mb_over_import']:.1f} | {r['resident_mb']:.1f} |")
        if "path_over_all_added" in modes:
            lines.append(f"| {name} | path-only / all (added memory) | | | | {modes['path_over_all_added']:.3f} | "
                         f"{modes['path_over_all_added_over_import']:.3f} | |")
    (out / "edge_inference.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
