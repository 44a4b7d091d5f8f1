"""`hmoe train`, `hmoe eval`, `hmoe demo`: thin wrappers over the trainer library."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from hierarchy.errors import UsageError
from trainer.cli import command
from trainer.cli.flags import add_config_flags, config_from_args
from trainer.protocol.fleet import CostBook
from trainer.protocol.run import RunConfig, RunError, load_run_config
from trainer.train import train_run



def _kinds(model: str) -> list[str]:
    return ["hmoe", "flat"] if model == "both" else [model]


def _add_run_flags(p: argparse.ArgumentParser, defaults: RunConfig) -> None:
    """The run's configuration (every field a flag, trainer/cli/flags.py) and the command's own options."""
    add_config_flags(p, defaults)
    p.add_argument("--fleet-costs", metavar="FILE",
                   help="take per-round costs from this costs.json (of an earlier run) instead of measuring them")
    p.add_argument("--cost-clients", type=int, default=3,
                   help="clients whose local update is measured per expert, each in its own process (0: skip)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _config(args: argparse.Namespace) -> RunConfig:
    return config_from_args(args, getattr(args, "resume", False))


def _extended_config(args: argparse.Namespace) -> RunConfig:
    """``--extend``: every setting from the old run but the tree, rounds, arrival and device."""
    from hierarchy.taxonomies import read_tree
    from trainer.grow import extension_config
    if not args.from_run:
        raise UsageError("--extend NEW_TREE needs --from-run DIR, the trained run to grow")
    if args.resume:
        return load_run_config(Path(args.out))
    cfg, plan = extension_config(Path(args.from_run), read_tree(args.extend), _kinds(args.model), args.hmoe_rounds,
                                 args.flat_rounds, args.arrival, args.device)
    changed = ", ".join(f"{k} (+{len(v['added'])} -{len(v['removed'])})" for k, v in plan.changed.items())
    print(f"growing {args.from_run}: kept {', '.join(plan.kept) or '-'}; changed {changed or '-'}; "
          f"new {', '.join(plan.new) or '-'}")
    return cfg


def _train(args: argparse.Namespace) -> int:
    from trainer.device.cost import summary, table1
    from trainer.report import extension_table, fleet_table
    if args.from_run and not args.extend:
        raise UsageError("--from-run DIR is for growing a run: pass --extend NEW_TREE too")
    cfg = _extended_config(args) if args.extend else _config(args)
    report = train_run(Path(args.out), cfg, _kinds(args.model), args.resume, args.cost_clients,
                       not args.no_progress, CostBook.load(args.fleet_costs) if args.fleet_costs else None)
    print(table1(summary(report)))
    if "extension" in report:
        print(extension_table(report))
    if "fleet" in report:
        print(fleet_table(report))
    print(f"\nrun directory: {args.out} (report.json, plots/)")
    return 0


@command("train")
def _add_train(p: argparse.ArgumentParser) -> None:
    """Federated training of HMoE and/or the flat-softmax baseline."""
    p.add_argument("--model", choices=["hmoe", "flat", "both"], default="both")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its last completed round")
    g = p.add_argument_group("growing a trained run (trainer/grow.py)")
    g.add_argument("--extend", metavar="NEW_TREE",
                   help="grow --from-run onto this taxonomy: experts whose children are unchanged are kept (bit for "
                        "bit), changed ones keep their old children's outputs, new ones start fresh; only changed and "
                        "new experts train. Settings come from the old run, except rounds, --arrival and --device")
    g.add_argument("--from-run", metavar="DIR", help="the trained run (simulation or coordinator) to grow")
    _add_run_flags(p, RunConfig())
    p.set_defaults(run=_train)


def _eval(args: argparse.Namespace) -> int:
    from trainer.transports.inprocess import prepared_feds
    from trainer.prepare import prepare
    run = Path(args.run_dir)
    cfg = load_run_config(run)
    kinds = [k for k in ("hmoe", "flat") if (run / f"state-{k}.json").exists()]
    if not kinds:
        raise RunError(f"{run}: no trained model (no state-hmoe.json or state-flat.json)")
    prep = prepare(cfg)
    feds = prepared_feds(run, cfg, prep, kinds)
    rows = []
    for kind, fed in feds.items():
        specs = args.decode if kind == "hmoe" else args.flat_rule
        for spec in specs:
            r = fed.evaluate(prep.data.test_x, prep.data.test_y, spec)
            rows.append({"model": kind, "decode": spec, **r})
    print(f"{'model':<6}{'decode':<15}{'info F1':>9}{'precision':>11}{'recall':>9}{'leaf acc':>10}{'experts/input':>15}")
    for r in rows:
        print(f"{r['model']:<6}{r['decode']:<15}{r['info_f1']:>9.4f}{r['info_precision']:>11.4f}"
              f"{r['info_recall']:>9.4f}{r['leaf_accuracy']:>10.4f}{r.get('experts_per_input', float('nan')):>15.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


@command("eval")
def _add_eval(p: argparse.ArgumentParser) -> None:
    """Re-evaluate a run on the test split with other decoders."""
    p.add_argument("--run", dest="run_dir", required=True, help="run directory written by hmoe train")
    p.add_argument("--decode", nargs="+", default=["greedy", "beam:2", "threshold:0.5"],
                   help="HMoE decoders: greedy, beam:K, threshold:T, soft:K (beam:K over probabilities calibrated "
                   "by a temperature per expert, fitted on the run's validation split)")
    p.add_argument("--flat-rule", nargs="+", default=["leaf", "majority"], help="flat rules: leaf, majority")
    p.add_argument("--json", help="also write the rows to this JSON file")
    p.set_defaults(run=_eval)
