"""`hmoe-edge`: the device-side command line (never imports torch for inference)."""

from __future__ import annotations

import argparse
import sys

from edge_runtime.bundle import BundleError, load_bundle


def _verify(args: argparse.Namespace) -> int:
    bundle = load_bundle(args.bundle)
    problems = bundle.verify()
    entries = bundle.all_entries()
    for entry in entries:
        bad = [p for p in problems if entry.file in p]
        print(f"{'FAIL' if bad else 'ok  '} {entry.file:<24} {entry.node}")
    if problems:
        for p in problems:
            print(f"hmoe-edge verify: {p}", file=sys.stderr)
        return 1
    print(f"{args.bundle}: {len(entries)} files match the manifest")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hmoe-edge", description="hmoe-edge device side: verify bundles, "
                                     "predict, serve, train one expert locally, sync with a coordinator.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("verify", help="check every file of a bundle against its manifest (size, sha256)")
    p.add_argument("bundle", help="bundle directory (manifest.json + ONNX files)")
    p.set_defaults(run=_verify)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except (BundleError, FileNotFoundError, KeyError, ValueError) as exc:
        print(f"hmoe-edge {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
