"""`hmoe train`, `hmoe eval`, `hmoe demo`: thin wrappers over the trainer library."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from hierarchy.errors import UsageError
from trainer.cli import command
from trainer.device.config import LocalConfig
from trainer.protocol.fleet import CostBook, Fleet
from trainer.grow import parse_arrival
from trainer.partition import PARTITIONS
from trainer.protocol.run import RunConfig, RunError, load_run_config
from trainer.protocol.schedules import SCHEDULES
from trainer.protocol.strategy import ASSIGNMENTS

# The demo's defaults (README): 20 clients, Dirichlet(0.5) non-IID, 5 clients a round, SGD
# (lr 0.05, momentum 0.9, cosine decay), one local epoch (experts: balanced by data share);
# flat softmax at width 32 for 40 rounds; HMoE experts at width 16 for 100 rounds (20 each).
DEMO = RunConfig()


def _kinds(model: str) -> list[str]:
    return ["hmoe", "flat"] if model == "both" else [model]


def _add_run_flags(p: argparse.ArgumentParser, defaults: RunConfig) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default=defaults.dataset,
                   help="fashion-mnist | cifar100 | tiny-imagenet | synthetic:C,H,W:TAXONOMY:N")
    g.add_argument("--data-root", default=defaults.data_root, help="folder holding the data sets (default: $HMOE_DATA or ./data)")
    g.add_argument("--train-limit", type=int, default=0, help="train on a seeded subsample of N images (0: all)")
    g.add_argument("--test-limit", type=int, default=0, help="evaluate on a seeded subsample of N images (0: all)")
    g.add_argument("--tree", metavar="TREE",
                   help="train on this taxonomy instead of the data set's (a .json or .csv file, or a shipped "
                        "taxonomy's name); the data set's classes outside it are left out (a held-out class)")
    g.add_argument("--arrival", metavar="LEAF,LEAF@SHARE",
                   help="those leaves' samples are held only by a seeded SHARE of the clients (new data appears "
                        "where it is collected); with --extend, SHARE alone means the leaves the new tree adds")
    g = p.add_argument_group("federation")
    g.add_argument("--clients", type=int, default=defaults.clients, help="number of clients K")
    g.add_argument("--clients-per-round", type=int, default=defaults.clients_per_round, help="clients sampled per round M")
    g.add_argument("--partition", choices=sorted(PARTITIONS), default=defaults.partition)
    g.add_argument("--alpha", type=float, default=defaults.alpha, help="Dirichlet concentration (non-IID-ness)")
    g.add_argument("--dropout", type=float, default=defaults.dropout, help="chance that a sampled client drops out")
    g.add_argument("--hmoe-rounds", type=int, default=None,
                   help=f"HMoE rounds (each trains one expert; default {defaults.hmoe_rounds}, with --extend 20 per "
                        "expert it trains)")
    g.add_argument("--flat-rounds", type=int, default=None,
                   help=f"flat-softmax rounds (default {defaults.flat_rounds}, with --extend half the old run's)")
    g.add_argument("--schedule", choices=sorted(SCHEDULES), default=defaults.schedule, help="which expert a round trains")
    g.add_argument("--seed", type=int, default=defaults.seed)
    g = p.add_argument_group("networks and local training")
    g.add_argument("--expert-width", type=int, default=defaults.expert_width, help="channels of an expert's first conv")
    g.add_argument("--flat-width", type=int, default=defaults.flat_width, help="channels of the flat model's first conv")
    g.add_argument("--expert-widths", default=defaults.expert_widths,
                   help="per-expert widths: leaves:MIN (--expert-width scaled by the node's share of the leaves, at "
                        "least MIN) or map:NODE=W,NODE=W (default: every expert --expert-width)")
    g.add_argument("--local-epochs", type=int, default=defaults.local.epochs)
    g.add_argument("--batch-size", type=int, default=defaults.local.batch_size)
    g.add_argument("--lr", type=float, default=defaults.local.lr)
    g.add_argument("--momentum", type=float, default=defaults.local.momentum)
    g.add_argument("--optimizer", choices=["sgd", "adam"], default=defaults.local.optimizer)
    g.add_argument("--clip-norm", type=float, default=defaults.local.clip_norm,
                   help="clip each batch's gradient to this L2 norm (0: off)")
    g.add_argument("--min-children", type=int, default=defaults.min_children,
                   help="HMoE: a client trains an expert only if it holds samples of at least this many of the "
                        "expert's children (a client with one child's samples can only teach it to answer that child)")
    g.add_argument("--balanced-epochs", action=argparse.BooleanOptionalAction, default=defaults.balanced_epochs,
                   help="HMoE: local epochs = floor(1 / expert's data share), so each round does about the root's work")
    g.add_argument("--lr-decay", choices=["cosine", "none"], default=defaults.lr_decay,
                   help="client learning rate over the rounds (cosine: down to lr/10)")
    g.add_argument("--aggregation", default=defaults.aggregation,
                   help="fedavg | median | trimmed-mean[:SHARE] (coordinate-wise, unweighted)")
    g.add_argument("--influence-bound", type=float, default=defaults.influence_bound,
                   help="a client's change from the round's weights and its sample count count at most this many "
                        "times the round's median (0: off)")
    g = p.add_argument_group("fleet (device tiers; see trainer/protocol/fleet.py)")
    g.add_argument("--fleet", metavar="FILE",
                   help="JSON fleet file: tiers (name, share of clients, memory_mb, speed) and deadline_s; a client "
                        "is asked only for tasks whose predicted round fits its tier (default: no limits)")
    g.add_argument("--assignment", choices=list(ASSIGNMENTS), default=defaults.assignment,
                   help="one: a round trains the schedule's task; resource-aware: each client trains the most "
                        "useful expert it can afford, so a round can train several")
    g.add_argument("--min-cohort", type=int, default=defaults.min_cohort,
                   help="resource-aware: an expert other than the round's own trains only if at least this many "
                        "clients chose it (the others move on to their next choice)")
    g.add_argument("--fleet-costs", metavar="FILE",
                   help="take per-round costs from this costs.json (of an earlier run) instead of measuring them")
    p.add_argument("--device", default=defaults.device, help="cpu | cuda (when available)")
    p.add_argument("--cost-clients", type=int, default=3,
                   help="clients whose local update is measured per expert, each in its own process (0: skip)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _config(args: argparse.Namespace) -> RunConfig:
    local = LocalConfig(epochs=args.local_epochs, batch_size=args.batch_size, lr=args.lr,
                        momentum=args.momentum, optimizer=args.optimizer, clip_norm=args.clip_norm)
    for name, value in (("--local-epochs", args.local_epochs), ("--batch-size", args.batch_size),
                        ("--clients", args.clients), ("--expert-width", args.expert_width),
                        ("--flat-width", args.flat_width), ("--min-cohort", args.min_cohort),
                        ("--min-children", args.min_children)):
        if value < 1:
            raise UsageError(f"{name} must be at least 1; got {value}")
    if args.device.startswith("cuda"):
        import torch
        if not torch.cuda.is_available():
            raise UsageError("--device cuda asked for, but torch sees no CUDA device; use --device cpu")
    return RunConfig(dataset=args.dataset, data_root=args.data_root, clients=args.clients,
                     clients_per_round=args.clients_per_round, partition=args.partition, alpha=args.alpha,
                     dropout=args.dropout, seed=args.seed, train_limit=args.train_limit,
                     test_limit=args.test_limit, hmoe_rounds=_rounds(args, "hmoe_rounds"),
                     flat_rounds=_rounds(args, "flat_rounds"), schedule=args.schedule, expert_width=args.expert_width,
                     expert_widths=args.expert_widths,
                     flat_width=args.flat_width, local=local, lr_decay=args.lr_decay,
                     balanced_epochs=args.balanced_epochs, aggregation=args.aggregation,
                     influence_bound=args.influence_bound, device=args.device,
                     fleet=Fleet.load(args.fleet).to_dict() if args.fleet else None, assignment=args.assignment,
                     min_cohort=args.min_cohort, min_children=args.min_children, tree=_tree(args.tree),
                     arrival=parse_arrival(args.arrival, []))


def _rounds(args: argparse.Namespace, name: str) -> int:
    """The rounds asked for; unset: the default, or on --resume the run's own (0 keeps the saved count)."""
    given = getattr(args, name)
    return given if given is not None else 0 if getattr(args, "resume", False) else getattr(RunConfig, name)


def _tree(spec: str | None) -> dict | None:
    from hierarchy.taxonomies import read_tree
    return read_tree(spec).to_dict() if spec else None


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


def train_run(out: Path, cfg: RunConfig, kinds: list[str], resume: bool, cost_clients: int,
              progress: bool = True, fleet_costs: CostBook | None = None) -> dict:
    """Train (or continue) the given model families, then evaluate, measure cost, report."""
    from trainer.report import build_report
    from trainer.transports.inprocess import prepared_feds
    from trainer.prepare import open_run
    if cfg.fleet and progress and not (out / "costs.json").exists():
        print("measuring per-round costs for the fleet's predictions (fresh processes, a few seconds a network)")
    cfg, prep = open_run(out, cfg, resume, kinds=tuple(kinds), seed_book=fleet_costs)
    if cfg.extends:
        from trainer.grow import seed_extension
        seed_extension(out, cfg, prep.data.tree, prep.data.shape, kinds)
    feds = prepared_feds(out, cfg, prep, kinds)
    for fed in feds.values():
        fed.run(progress=progress)
    previous = json.loads((out / "report.json").read_text()) if (out / "report.json").exists() else None
    if progress:
        print("evaluating on the test split" + (", measuring per-round client cost" if cost_clients else ""))
    return build_report(out, cfg, feds, cost_clients, previous)


def _train(args: argparse.Namespace) -> int:
    from trainer.report import extension_table, fleet_table, summary, table1
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
                   help="HMoE decoders: greedy, beam:K, threshold:T")
    p.add_argument("--flat-rule", nargs="+", default=["leaf", "majority"], help="flat rules: leaf, majority")
    p.add_argument("--json", help="also write the rows to this JSON file")
    p.set_defaults(run=_eval)
