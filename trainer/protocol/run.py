"""A run directory without torch: its config, its input specification, its hierarchy, and the
strategy state that drives its schedule (read by the simulation, the coordinator and the exporter)."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from hierarchy import Hierarchy
from hierarchy.errors import HmoeError
from hierarchy.spec import InputSpec
from hierarchy.tree import write_text_atomic
from trainer.device.config import LocalConfig
from trainer.protocol.strategy import Strategy, Task, expert_widths, make_tasks

INPUT_SPEC = "input.json"


class RunError(HmoeError, ValueError):
    """A run directory is missing, incomplete, or was made by an older release."""


@dataclass(frozen=True)
class RunConfig:
    """A federated run; saved as config.json in the run directory."""

    dataset: str = "fashion-mnist"
    data_root: str | None = None
    clients: int = 20
    clients_per_round: int = 5
    partition: str = "dirichlet"
    alpha: float = 0.5
    dropout: float = 0.0
    val_fraction: float = 0.05
    eval_every: int = 0           # validation metric every N rounds (0: about 20 points per run)
    train_limit: int = 0          # use a seeded subsample of this many training images (0: all)
    test_limit: int = 0           # likewise for the test split
    seed: int = 0
    hmoe_rounds: int = 100
    flat_rounds: int = 40
    schedule: str = "round-robin"
    expert_width: int = 16
    expert_widths: str = ""       # per-expert widths: leaves:MIN (by share of leaves) | map:NODE=W,... | "" (all equal)
    flat_width: int = 32
    depth: int = 0
    local: LocalConfig = field(default_factory=LocalConfig)
    balanced_epochs: bool = True  # HMoE: as many epochs as fit in the root's round, in samples and in
                                  # optimizer steps (strategy.balanced_epochs); False: the paper's one
    lr_decay: str = "cosine"      # cosine: client lr falls from lr to lr/10 over the run; none: constant
    aggregation: str = "fedavg"   # fedavg | median | trimmed-mean[:SHARE]
    influence_bound: float = 3.0  # a client's change and sample count count at most this x the round's median
    fleet: dict | None = None     # device tiers and round deadline (trainer.protocol.fleet); None: every client can train anything
    assignment: str = "one"       # one: a round trains one task; resource-aware: each client its most useful affordable task
    min_cohort: int = 2           # resource-aware: a task beside the round's own trains only with this many clients
    min_children: int = 1         # HMoE: a client trains an expert only if it holds samples of this many of its children
    tree: dict | None = None      # the run's own taxonomy (Hierarchy.to_dict); None: the data set's. The data
                                  # set's classes outside it are left out (a held-out class)
    arrival: dict | None = None   # {"leaves": [...], "clients": SHARE}: those leaves' samples are held only by a
                                  # seeded SHARE of the clients (new data appears where it is collected)
    train_only: list | None = None   # HMoE: the experts rounds train (None: all); set by growing a run
    extends: dict | None = None   # a grown run: the run it grew from and which experts were kept, changed, new
    device: str = "cpu"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        d = dict(d)
        d["local"] = LocalConfig(**d.get("local", {}))
        return cls(**d)

    def rounds(self, kind: str) -> int:
        return self.hmoe_rounds if kind == "hmoe" else self.flat_rounds

    def width(self, kind: str) -> int:
        return self.expert_width if kind == "hmoe" else self.flat_width

    def tasks(self, kind: str, tree: Hierarchy, in_shape: tuple[int, int, int]) -> dict[str, Task]:
        """The networks of model family ``kind``, experts sized by ``expert_widths``."""
        widths = expert_widths(tree, self.expert_widths, self.expert_width) if kind == "hmoe" else None
        return make_tasks(tree, kind, in_shape, self.width(kind), self.depth, widths=widths)

    def strategy(self, kind: str, tree: Hierarchy, tasks: dict[str, Task], shares: dict[str, float] | None = None,
                 schedule: str | None = None) -> Strategy:
        """The strategy of model family ``kind`` (the flat model has one task: round-robin)."""
        hmoe = kind == "hmoe"
        if hmoe and self.train_only is not None:
            tasks = {k: t for k, t in tasks.items() if k in self.train_only}
            if not tasks:
                raise RunError(f"the run trains only {self.train_only}, none of which is an expert of its tree")
        return Strategy(tree, tasks, (schedule or self.schedule) if hmoe else "round-robin", self.seed, self.local,
                        self.rounds(kind), self.balanced_epochs and hmoe, self.lr_decay, shares,
                        aggregation=self.aggregation, influence_bound=self.influence_bound,
                        assignment=self.assignment if hmoe else "one", min_clients=self.min_cohort,
                        min_children=self.min_children)


def load_run_config(run_dir: Path) -> RunConfig:
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise RunError(f"{run_dir}: not a run directory (no config.json); train one with `hmoe train`")
    return RunConfig.from_dict(json.loads(path.read_text()))


def merged_config(run_dir: Path, cfg: RunConfig, resume: bool) -> RunConfig:
    """The config a run continues with: a new run's own, or with ``resume`` the saved one
    (the round counts may be raised to continue training). Writes nothing."""
    path = Path(run_dir) / "config.json"
    if not path.exists():
        return cfg
    if not resume:
        raise RunError(f"{run_dir} already holds a run; pass --resume to continue it or choose another --out")
    saved = load_run_config(run_dir)
    return RunConfig.from_dict({**saved.to_dict(), "hmoe_rounds": max(saved.hmoe_rounds, cfg.hmoe_rounds),
                                "flat_rounds": max(saved.flat_rounds, cfg.flat_rounds), "device": cfg.device})


def start_run(run_dir: Path, cfg: RunConfig, resume: bool) -> RunConfig:
    """Create a run directory, or reopen one with ``resume`` (see ``merged_config``)."""
    cfg = merged_config(run_dir, cfg, resume)
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    write_text_atomic(Path(run_dir) / "config.json", json.dumps(cfg.to_dict(), indent=1) + "\n")
    return cfg


REPAIR = "`hmoe train --out {run} --resume --cost-clients 0` where its data set is installed rewrites it"


def write_input_spec(run_dir: Path, spec: InputSpec) -> None:
    """Record the run's input; a run keeps the one it was created with (a different one is an error)."""
    path = Path(run_dir) / INPUT_SPEC
    if path.exists():
        old = load_input_spec(run_dir)
        if old.differences(spec):
            raise RunError(f"{path}: the data set now gives an input whose {', '.join(old.differences(spec))} "
                           f"differ from the run's ({old.to_dict()} vs {spec.to_dict()}); the run's experts "
                           "were trained on the recorded one: use the original data set or start a new run")
        return
    write_text_atomic(path, json.dumps(spec.to_dict(), indent=1) + "\n")


def load_input_spec(run_dir: Path) -> InputSpec:
    """The input the run was trained on; never guessed (a run without it says how to repair it)."""
    path = Path(run_dir) / INPUT_SPEC
    if not path.is_file():
        raise RunError(f"{run_dir}: the run has no {INPUT_SPEC} (its input shape and normalisation; runs made "
                       f"before it was recorded lack it): {REPAIR.format(run=run_dir)}")
    try:
        return InputSpec.from_dict(json.loads(path.read_text()), str(path))
    except json.JSONDecodeError as exc:
        raise RunError(f"{path}: not valid JSON ({exc}); {REPAIR.format(run=run_dir)}") from None


def load_hierarchy(run_dir: Path) -> Hierarchy:
    return Hierarchy.from_json(Path(run_dir) / "hierarchy.json")


def load_strategy_state(run_dir: Path, kind: str = "hmoe") -> dict:
    """The schedule state the simulation saved with the run (data shares, validation errors)."""
    path = Path(run_dir) / f"state-{kind}.json"
    state = json.loads(path.read_text()) if path.is_file() else {}
    if "strategy" not in state:
        raise RunError(f"{run_dir}: no saved strategy state for {kind} (data shares, validation errors) in "
                       f"{path.name}: {REPAIR.format(run=run_dir)}")
    return state["strategy"]


def run_files(run_dir: str | os.PathLike) -> tuple[RunConfig, Hierarchy, InputSpec]:
    run_dir = Path(run_dir)
    return load_run_config(run_dir), load_hierarchy(run_dir), load_input_spec(run_dir)
