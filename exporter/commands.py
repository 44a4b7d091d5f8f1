"""`hmoe export`, and `hmoe demo` (train, export, score the bundle without torch)."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

from trainer.cli import command
from trainer.train import DEMO, train_run
from trainer.protocol.run import RunConfig


def _export(args: argparse.Namespace) -> int:
    from exporter.bundle import export_run
    from exporter.onnx_export import ExportSpec
    spec = ExportSpec(opset=args.opset, atol=args.atol)
    print(f"exporting {args.run_dir} -> {args.out}" + (f" (subtree {args.subtree})" if args.subtree else ""))
    res = export_run(args.run_dir, args.out, subtree=args.subtree, quantize=args.quantize, spec=spec,
                     validate_images=args.validate_images, progress=not args.quiet)
    print(f"\n{'model':<22}{'children':>9}{'params':>10}{'bytes':>11}{'max diff':>11}{'near ties':>11}")
    for r in res.rows:
        print(f"{r['model']:<22}{r['children']:>9}{r['params']:>10}{r['bytes']:>11}"
              f"{max(r['max_diff_random'], r['max_diff_real']):>11.2e}{r['near_ties']:>11}")
    q = res.report.get("int8")
    if q:
        print(f"\nint8: {q['int8']['total_bytes']} bytes vs fp32 {q['fp32']['total_bytes']} "
              f"({100 * q['bytes_ratio']:.0f}%)")
        if "info_f1_drop" in q:
            print(f"greedy Information F1: fp32 {q['fp32']['info_f1_greedy']:.4f}, int8 "
                  f"{q['int8']['info_f1_greedy']:.4f} (drop {q['info_f1_drop']:+.4f})")
    print(f"\nbundle written to {args.out} (manifest.json, export_report.json)")
    if args.json:
        print(json.dumps(res.report, indent=1))
    return 0


@command("export")
def _add_export(p: argparse.ArgumentParser) -> None:
    """Export a run's experts (and flat model) to an ONNX bundle for devices."""
    p.add_argument("--run", dest="run_dir", required=True, help="run directory written by hmoe train")
    p.add_argument("--out", required=True, help="bundle directory to create (must not exist)")
    p.add_argument("--subtree", help="export only this node's subtree (its experts, a hierarchy rooted there)")
    p.add_argument("--quantize", choices=["int8"], help="also write static QDQ int8 models")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (18 or newer)")
    p.add_argument("--atol", type=float, default=1e-4, help="max |logit| difference torch vs onnxruntime")
    p.add_argument("--validate-images", type=int, default=0, help="test images used in validation (0: all)")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--json", action="store_true", help="also print the export report as JSON")
    p.set_defaults(run=_export)


def _demo(args: argparse.Namespace) -> int:
    from trainer.device.cost import summary, table1
    out = Path(args.out)
    cfg = replace(DEMO, data_root=args.data_root) if args.data_root else DEMO
    report = train_run(out, cfg, ["hmoe", "flat"], resume=True, cost_clients=3, progress=not args.no_progress)
    s = summary(report)
    s["bundle"] = _demo_bundle(out, cfg, s, progress=not args.no_progress)
    from hierarchy.tree import write_text_atomic
    write_text_atomic(out / "summary.json", json.dumps(s, indent=1) + "\n")
    print("\n" + table1(s))
    print(f"\nwrote {out / 'summary.json'}, {out / 'report.json'} and plots in {out / 'plots'}")
    return 0


def _demo_bundle(out: Path, cfg: RunConfig, s: dict, progress: bool) -> dict:
    """Export the demo run to out/bundle, then score the bundle on the test split in a
    separate process with onnxruntime and numpy only (exporter.score)."""
    import shutil
    import subprocess
    import sys

    bundle = out / "bundle"
    if bundle.exists():
        shutil.rmtree(bundle)
    from exporter.bundle import export_run
    print(f"\nexporting to {bundle}")
    res = export_run(out, bundle, progress=progress)
    f1_file = out / "bundle_f1.json"
    cmd = [sys.executable, "-m", "exporter.score", "--bundle", str(bundle), "--dataset", cfg.dataset, "--decode", "greedy",
           "--out", str(f1_file)] + (["--data-root", cfg.data_root] if cfg.data_root else [])
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    scored = json.loads(f1_file.read_text())
    f1 = scored["hmoe"]["greedy"]["info_f1"]
    row = {"path": str(bundle), "info_f1": f1, "info_f1_diff_vs_torch": f1 - s["hmoe"]["info_f1"],
           "torch_imported": scored["torch_imported"], "total_bytes": res.report["total_bytes"],
           "max_logit_diff": max(max(r["max_diff_random"], r["max_diff_real"]) for r in res.rows)}
    if "flat" in scored:
        row["flat_info_f1"] = scored["flat"]["leaf"]["info_f1"]
    print(f"bundle greedy Information F1 (onnxruntime, no torch): {f1:.5f} "
          f"(torch: {s['hmoe']['info_f1']:.5f}, difference {row['info_f1_diff_vs_torch']:+.5f})")
    return row


@command("demo")
def _add_demo(p: argparse.ArgumentParser) -> None:
    """Train HMoE and flat softmax on real Fashion-MNIST and print the paper's Table 1."""
    p.add_argument("--out", default="runs/demo", help="run directory (resumed if it exists)")
    p.add_argument("--data-root", default=None, help="folder holding the data sets")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(run=_demo)
