"""`hmoe export`: a run directory to a device bundle."""

from __future__ import annotations

import argparse
import json

from trainer.cli import command


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
