"""Edge inference: latency (batch 1) and resident memory, path-only vs all experts vs flat,
in onnxruntime, fp32 and int8.

Bundles: the demo's (real Fashion-MNIST test images; exported with --quantize int8 when
it has no int8 models: pass --demo-run) and CIFAR-100- and Tiny-ImageNet-shaped ones
(21 and 101 experts; built here from a one-round run on synthetic data, since only the
shapes matter for cost; one per --shaped-widths, the first is the project's default
expert width, the flat model twice as wide). The Tiny ImageNet tree's greedy path is up
to 12 experts deep: "experts per input" says how many a decision visited. Each mode and
variant runs in a fresh process. Memory is what the loaded models add over the ready
engine (onnxruntime imported and started, manifest read, no model loaded), and, beside
it, over onnxruntime merely imported. Writes edge_inference.json and edge_inference.md.

    python benchmarks/edge_inference.py --demo-run runs/demo --out runs/edge_bench
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from edge_runtime import bench

SHAPED = {"cifar100": ("CIFAR-100-shaped", "synthetic:3,32,32:cifar100:4000"),
          "tiny-imagenet": ("Tiny-ImageNet-shaped", "synthetic:3,64,64:tiny-imagenet:4000")}


def shaped_bundle(work: Path, taxonomy: str, width: int) -> Path:
    """A bundle (fp32 and int8) of the taxonomy's shape, trained one round on synthetic data."""
    return synthetic_bundle(work / f"{taxonomy}_run_w{width}", work / f"{taxonomy}_bundle_w{width}",
                            SHAPED[taxonomy][1], width, 2 * width, quantize="int8", validate_images=100)


def synthetic_bundle(run: Path, out: Path, dataset: str, width: int, flat_width: int, quantize: str | None = None,
                     validate_images: int = 100, **settings) -> Path:
    """``out``: a bundle of ``dataset``'s shape (a ``synthetic:`` spec) trained one round into
    ``run``, experts of ``width`` and the flat model of ``flat_width`` (kept when already
    there; ``settings``: other RunConfig fields). Only the shapes matter for what it costs."""
    from exporter.bundle import export_run
    from trainer.prepare import open_run
    from trainer.protocol.run import RunConfig
    from trainer.transports.inprocess import Federation
    if (out / "manifest.json").exists():
        return out
    cfg = RunConfig(**{"clients": 4, "clients_per_round": 2, **settings, "dataset": dataset, "hmoe_rounds": 1,
                       "flat_rounds": 1, "expert_width": width, "flat_width": flat_width})
    cfg, prep = open_run(run, cfg, resume=True)
    for kind in ("hmoe", "flat"):
        Federation(run, kind, cfg, prep).run(progress=False)
    export_run(run, out, quantize=quantize, progress=False, validate_images=validate_images)
    return out


def demo_bundle(run: Path) -> Path | None:
    """The trained run's bundle with int8 models (``run``/bundle-int8, exported unless there)."""
    from exporter.bundle import export_run
    if (run / "bundle-int8" / "manifest.json").exists():
        return run / "bundle-int8"
    if not (run / "config.json").exists():
        return None
    export_run(run, run / "bundle-int8", quantize="int8", progress=False)
    return run / "bundle-int8"


def demo_images(bundle: Path, n: int) -> np.ndarray:
    from trainer.datasets import load_dataset
    b = bench.load_bundle(bundle)
    data = load_dataset(b.manifest.source["dataset"])
    return b.input_spec.normalize(data.test_x[:n])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--demo-run", default="runs/demo", help="a trained Fashion-MNIST run (its bundle-int8/ is "
                   "used, or exported)")
    p.add_argument("--out", default="runs/edge_bench")
    p.add_argument("--work", help="where shaped runs and bundles are kept (default: --out)")
    p.add_argument("--images", type=int, default=300)
    p.add_argument("--shaped-widths", type=int, nargs="+", default=[16],
                   help="expert widths of the CIFAR-100- and Tiny-ImageNet-shaped bundles (flat: twice that)")
    p.add_argument("--shapes", nargs="+", default=list(SHAPED), choices=list(SHAPED))
    args = p.parse_args(argv)
    from tqdm import tqdm
    out = Path(args.out)
    work = Path(args.work or args.out)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    result = {"command": "python benchmarks/edge_inference.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "machine": bench.machine(), "images": args.images, "threads": 1, "bundles": {}}
    todo = []
    demo = demo_bundle(Path(args.demo_run))
    if demo is not None:
        todo.append(("demo (Fashion-MNIST)", demo, lambda b: demo_images(b, args.images)))
    else:
        print(f"note: {args.demo_run} is not a trained run (run `make demo` first); shaped bundles only")
    for taxonomy in args.shapes:
        for width in args.shaped_widths:
            todo.append((f"{SHAPED[taxonomy][0]}, experts of width {width}", (taxonomy, width),
                         lambda b: bench.random_images(b, args.images)))
    for name, bundle, images in tqdm(todo, desc="edge bundles", unit="bundle"):
        if isinstance(bundle, tuple):
            bundle = shaped_bundle(work, *bundle)
        b = bench.load_bundle(bundle)
        x = images(bundle)
        entry = {"experts": len(b.experts), "tree_depth": int(b.tree.depths[b.tree.leaves].max()),
                 "expert_mb_on_disk": sum(e.bytes for e in b.experts.values()) / 2**20,
                 "int8_expert_mb_on_disk": sum(e.bytes for k, e in b.int8_entries().items() if k != "flat") / 2**20}
        for variant in ("fp32", "int8"):
            entry[variant] = bench.inference(bundle, x, variant=variant)
        result["bundles"][name] = entry
    (out / "edge_inference.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [("| bundle | variant | mode | median ms | p95 ms | experts per input (max) | added MB over ready engine "
              "| resident MB |"), "|---|---|---|---|---|---|---|---|"]
    for name, entry in result["bundles"].items():
        for variant in ("fp32", "int8"):
            for mode, r in entry[variant].items():
                if isinstance(r, dict):
                    per = "" if r.get("experts_per_input") is None else \
                        f"{r['experts_per_input']:.2f} ({r['max_experts_per_input']})"
                    lines.append(f"| {name} | {variant} | {mode} | {r['latency_ms_median']:.2f} | "
                                 f"{r['latency_ms_p95']:.2f} | {per} | {r['added_mb']:.1f} | {r['resident_mb']:.1f} |")
    (out / "edge_inference.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
