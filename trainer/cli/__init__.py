"""The registry of `hmoe` commands, and the hierarchy commands (the parser and `main` are in exporter.cli,
the top of the server side's imports, so nothing in trainer loads exporter)."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from hierarchy import build_taxonomy, load_taxonomy

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
                      help="fashion-mnist | cifar100 | tiny-imagenet | hanzi[:N] | hanzi-strokes[:N] | csv:PATH | json:PATH")
    show.set_defaults(run=_hierarchy_show)
    build = sub.add_parser("build", help="build a taxonomy (tiny-imagenet: from WordNet) and save it as JSON")
    build.add_argument("--taxonomy", required=True,
                       help="fashion-mnist | cifar100 | tiny-imagenet | hanzi[:N] | hanzi-strokes[:N] | csv:PATH | json:PATH")
    build.add_argument("--out", required=True, help="output JSON file")
    build.set_defaults(run=_hierarchy_build)
