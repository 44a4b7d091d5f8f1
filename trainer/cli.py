"""`hmoe`: the server-side command line (thin: parse flags, call library functions)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from hierarchy import build_taxonomy, load_taxonomy
from hierarchy.errors import HmoeError

COMMANDS: dict[str, Callable[[argparse.ArgumentParser], None]] = {}


def command(name: str):
    def register(fn):
        COMMANDS[name] = fn
        return fn
    return register


def _hierarchy_show(args: argparse.Namespace) -> int:
    tree = load_taxonomy(args.taxonomy)
    print(tree.render())
    print(f"\nnodes {len(tree)}, leaves {tree.num_leaves}, experts {len(tree.experts)} (marked *), "
          f"depth {int(tree.depths.max())}")
    return 0


def _hierarchy_build(args: argparse.Namespace) -> int:
    tree = build_taxonomy(args.taxonomy)
    tree.to_json(args.out)
    print(f"wrote {args.out}: {tree!r}")
    return 0


@command("hierarchy")
def _add_hierarchy(p: argparse.ArgumentParser) -> None:
    """Show or build class taxonomies."""
    sub = p.add_subparsers(dest="action", required=True)
    show = sub.add_parser("show", help="print a taxonomy with its experts marked")
    show.add_argument("--taxonomy", required=True,
                      help="fashion-mnist | cifar100 | tiny-imagenet | csv:PATH | json:PATH")
    show.set_defaults(run=_hierarchy_show)
    build = sub.add_parser("build", help="build a taxonomy (tiny-imagenet: from WordNet) and save it as JSON")
    build.add_argument("--taxonomy", required=True,
                       help="fashion-mnist | cifar100 | tiny-imagenet | csv:PATH | json:PATH")
    build.add_argument("--out", required=True, help="output JSON file")
    build.set_defaults(run=_hierarchy_build)


def _load_optional_commands() -> None:
    """Commands whose modules need torch register themselves on import."""
    import importlib
    for module in ("trainer.commands", "trainer.coordinator_cmd", "exporter.commands"):
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
    import trainer.cli as registry  # the canonical module, also when this file runs as __main__
    for name, add in registry.COMMANDS.items():
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
