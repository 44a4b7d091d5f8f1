"""`hmoe`: the server-side command line (thin: parse flags, call library functions).

It sits at the top of the server side's imports (it registers trainer's and exporter's
commands), so that nothing in trainer ever loads exporter."""

from __future__ import annotations

import argparse
import sys

from hierarchy.errors import HmoeError
from trainer.cli import COMMANDS


def _load_optional_commands() -> None:
    """Commands whose modules need torch register themselves on import."""
    import importlib
    for module in ("trainer.cli.train", "trainer.cli.plan", "trainer.cli.coordinator", "trainer.cli.flower",
                   "exporter.commands"):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name not in ("torch", "torchvision", "onnx", "onnxscript", "safetensors"):
                raise


def build_parser() -> argparse.ArgumentParser:
    _load_optional_commands()
    parser = argparse.ArgumentParser(prog="hmoe", description="hmoe-edge server side: hierarchies, "
                                     "federated training, evaluation, export, coordinator.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, add in COMMANDS.items():
        p = sub.add_parser(name, help=(add.__doc__ or "").strip().splitlines()[0] if add.__doc__ else None)
        add(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except (HmoeError, OSError) as exc:   # a user's error or the system's: one line; a bug keeps its traceback
        print(f"hmoe {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
