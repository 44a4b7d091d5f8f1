"""`hmoe plan`: prepare a run for a fleet (coordinator devices or Flower SuperNodes) without
training it, change the planned rounds of a run that has not finished, and export each
client's data from the run's partition."""

from __future__ import annotations

import argparse
import json
from dataclasses import fields
from pathlib import Path

import numpy as np

from hierarchy.errors import UsageError
from hierarchy.tree import write_text_atomic
from trainer.cli import command
from trainer.cli.flags import ROUNDS, add_config_flags, config_from_args, flag_name
from trainer.device.config import LocalConfig
from trainer.protocol.fleet import CostBook
from trainer.protocol.run import RunConfig, RunError, load_run_config


def plan_run(out: Path, cfg: RunConfig, kinds: list[str], fleet_costs: CostBook | None = None) -> RunConfig:
    """A new run directory, untrained: config (its rounds fix the learning-rate schedule the
    fleet will follow), hierarchy, input spec, a fleet's costs, every network's initial
    checkpoint and the schedule's starting state."""
    from trainer.prepare import open_run
    from trainer.transports.inprocess import Federation
    if (out / "config.json").exists():
        raise RunError(f"{out} already holds a run; change its rounds with `hmoe plan --run {out} --hmoe-rounds N` "
                       "or choose another --out")
    cfg, prep = open_run(out, cfg, resume=False, kinds=tuple(kinds), seed_book=fleet_costs)
    for kind in kinds:
        Federation(out, kind, cfg, prep)
    return cfg


def set_rounds(run: Path, rounds: dict[str, int]) -> RunConfig:
    """Change the planned rounds of a run (and so its learning-rate schedule from the next round
    on) without training; a count below the rounds already done is refused."""
    cfg = load_run_config(run)
    for kind, n in rounds.items():
        state = run / f"state-{kind}.json"
        done = json.loads(state.read_text())["completed_rounds"] if state.exists() else 0
        if n < done:
            raise UsageError(f"--{kind}-rounds {n}: {run} has already completed {done} {kind} rounds")
    cfg = RunConfig.from_dict({**cfg.to_dict(), **{f"{k}_rounds": n for k, n in rounds.items()}})
    write_text_atomic(run / "config.json", json.dumps(cfg.to_dict(), indent=1) + "\n")
    return cfg


def export_clients(run: Path, out: Path) -> list[Path]:
    """``out/client-N/train.npz`` for every client of the run: its partition of the training set
    (uint8 images N,C,H,W; labels as leaf names), what `hmoe-edge sync --data` and a SuperNode's
    ``data-dir`` read. Device N of a coordinator (the N-th to enrol) and SuperNode
    ``partition-id=N`` are client N."""
    from trainer.prepare import prepare
    cfg = load_run_config(run)
    prep = prepare(cfg)
    d = prep.data
    names = np.array([d.tree.names[v] for v in d.tree.leaf_order])
    paths = []
    for c, part in enumerate(prep.parts):
        path = out / f"client-{c}" / "train.npz"
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, images=d.train_x[part], labels=names[d.train_y[part]])
        paths.append(path)
    return paths


def _given(args: argparse.Namespace, parser: argparse.ArgumentParser) -> list[str]:
    """Configuration flags given on the command line (values other than their defaults)."""
    names = [f for f in [*fields(RunConfig), *fields(LocalConfig)]
             if f.name != "local" and not f.metadata.get("internal")]
    return [flag_name(f) for f in names if getattr(args, f.name) != parser.get_default(f.name)
            and f.name not in ROUNDS]


def _plan(args: argparse.Namespace) -> int:
    kinds = ["hmoe", "flat"] if args.model == "both" else [args.model]
    if bool(args.out) == bool(args.run_dir):
        raise UsageError("give --out NEW_RUN (prepare a run) or --run RUN (change its rounds, export its clients)")
    if args.out:
        cfg = config_from_args(args)
        out = Path(args.out)
        cfg = plan_run(out, cfg, kinds, CostBook.load(args.fleet_costs) if args.fleet_costs else None)
        print(f"planned {out}: {', '.join(f'{k} {cfg.rounds(k)} rounds' for k in kinds)} on {cfg.clients} clients "
              f"({cfg.clients_per_round} a round), nothing trained")
        run = out
    else:
        run = Path(args.run_dir)
        extra = _given(args, args.parser)
        if extra:
            raise UsageError(f"--run changes only a run's planned rounds; the run's other settings "
                             f"({', '.join(extra)}) are fixed in {run}/config.json: plan a new run with --out")
        rounds = {k[:-len("_rounds")]: getattr(args, k) for k in ROUNDS if getattr(args, k) is not None}
        if rounds:
            cfg = set_rounds(run, rounds)
            print(f"{run}: now {', '.join(f'{k} {cfg.rounds(k)} rounds' for k in rounds)} (the learning-rate "
                  "schedule follows from the next round on; restart a coordinator serving it)")
    if args.export_clients:
        paths = export_clients(run, Path(args.export_clients))
        print(f"wrote {len(paths)} client data sets under {args.export_clients} (client-N/train.npz: device N "
              "to enrol, SuperNode partition-id=N)")
    return 0


@command("plan")
def _add_plan(p: argparse.ArgumentParser) -> None:
    """Prepare a run for a fleet without training it; change its rounds; export its clients' data."""
    p.add_argument("--model", choices=["hmoe", "flat", "both"], default="hmoe")
    p.add_argument("--out", help="create this run directory, untrained (every flag is checked before anything "
                                 "is written; its --hmoe-rounds fix the learning-rate schedule the fleet follows)")
    p.add_argument("--run", dest="run_dir", help="an existing run: change its planned rounds (--hmoe-rounds, "
                                                 "--flat-rounds) without training, or export its clients' data")
    p.add_argument("--export-clients", metavar="DIR",
                   help="write DIR/client-N/train.npz, client N's partition of the run's training set, for "
                        "`hmoe-edge sync --data` (device N) and SuperNodes (partition-id=N data-dir=...)")
    p.add_argument("--fleet-costs", metavar="FILE",
                   help="take per-round costs from this costs.json instead of measuring them")
    add_config_flags(p)
    p.set_defaults(run=_plan, parser=p)
