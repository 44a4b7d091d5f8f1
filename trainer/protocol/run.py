"""A run directory without torch: its config, its input specification, its hierarchy, and the
strategy state that drives its schedule (read by the simulation, the coordinator and the exporter)."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from hierarchy import Hierarchy
from hierarchy.errors import HmoeError, UsageError
from hierarchy.spec import InputSpec
from hierarchy.tree import write_text_atomic
from trainer.device.config import LocalConfig
from trainer.protocol.aggregate import SERVER_OPTIMIZERS
from trainer.protocol.strategy import Strategy, Task, expert_widths, make_tasks

INPUT_SPEC = "input.json"


def flag_of(name: str) -> str:
    """The command-line flag of a RunConfig or LocalConfig field ('local.prox_mu' -> --prox-mu)."""
    cls, field_name = (LocalConfig, name.split(".", 1)[1]) if name.startswith("local.") else (RunConfig, name)
    meta = next(f.metadata for f in fields(cls) if f.name == field_name)
    return meta.get("flag") or "--" + field_name.replace("_", "-")


class RunError(HmoeError, ValueError):
    """A run directory is missing, incomplete, or was made by an older release."""


def opt(default, help: str, group: str = "federation", flag: str | None = None, least: float | None = None,
        choices: tuple | None = None, parse: str = "", **kw):
    """A config field with its command-line flag: the one place its default and help are written
    (``trainer/cli/flags.py`` builds the flags from these)."""
    meta = {"help": help, "group": group, "flag": flag, "least": least, "choices": choices, "parse": parse}
    if callable(default):
        return field(default_factory=default, metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


SKEW = "label skew (docs/TRAINING.md, \"Label skew\")"

# The settings a run keeps for life: a resumed run given other values is refused, naming
# both; a run saved before a setting existed was trained without it (its value here).
REMEDIES = {"local.prox_mu": 0.0, "local.restricted_softmax": 1.0, "local.logit_adjust": 0.0,
            "server_optimizer": "none", "server_lr": 1.0, "server_momentum": 0.9, "epochs_cap": 0,
            "min_children": 1, "balanced_epochs": True}


@dataclass(frozen=True)
class RunConfig:
    """A federated run; saved as config.json in the run directory. Every field is a flag of
    `hmoe train`, `hmoe plan` and `hmoe flower` (``opt``: flag, group, help, bounds)."""

    dataset: str = opt("fashion-mnist", "fashion-mnist | cifar100 | tiny-imagenet | hanzi[:N] | "
                       "synthetic:C,H,W:TAXONOMY:N", "data")
    data_root: str | None = opt(None, "folder holding the data sets (default: $HMOE_DATA or ./data)", "data")
    clients: int = opt(20, "number of clients K", least=1)
    clients_per_round: int = opt(5, "clients sampled per round M", least=1)
    partition: str = opt("dirichlet", "how the training set is split over the clients (shards: every client "
                         "holds exactly two labels, McMahan et al. 2017)", choices=("dirichlet", "iid", "shards"))
    alpha: float = opt(0.5, "Dirichlet concentration (smaller: more label skew)")
    dropout: float = opt(0.0, "chance that a sampled client drops out of a round (simulation)")
    val_fraction: float = opt(0.05, "share of the training set held out for validation")
    eval_every: int = opt(0, "validation F1 every N rounds (0: about 20 points per run)", "data")
    train_limit: int = opt(0, "train on a seeded subsample of N images (0: all)", "data")
    test_limit: int = opt(0, "evaluate on a seeded subsample of N images (0: all)", "data")
    seed: int = opt(0, "seed of the split, sampling, initial weights and every client's update")
    hmoe_rounds: int = opt(100, "HMoE rounds (with --assignment one each trains one expert; with --extend the "
                           "default is 20 per expert it trains)", least=0)
    flat_rounds: int = opt(40, "flat-softmax rounds (with --extend the default is half the old run's)", least=0)
    schedule: str = opt("round-robin", "which expert a round trains", choices=("round-robin", "proportional",
                                                                             "worst-validation"))
    expert_width: int = opt(16, "channels of an expert's first conv", "networks and local training", least=1)
    expert_widths: str = opt("", "per-expert widths: leaves:MIN (--expert-width scaled by the node's share of the "
                             "leaves, at least MIN) or map:NODE=W,NODE=W (default: every expert --expert-width)",
                             "networks and local training")
    flat_width: int = opt(32, "channels of the flat model's first conv", "networks and local training", least=1)
    depth: int = opt(0, "conv blocks of every network (0: chosen from the input size)", "networks and local training",
                     least=0)
    local: LocalConfig = opt(LocalConfig, "a client's local update (its fields are flags of their own)",
                             "networks and local training")
    balanced_epochs: bool = opt(True, "HMoE: an expert runs as many local epochs as fit in the root's round, "
                                "counted in samples and in optimizer steps (strategy.balanced_epochs); off: the "
                                "paper's one epoch", "networks and local training")
    lr_decay: str = opt("cosine", "client learning rate over the rounds (cosine: from --lr down to lr/10)",
                        "networks and local training", choices=("cosine", "none"))
    aggregation: str = opt("fedavg", "fedavg | median | trimmed-mean[:SHARE] (the robust rules coordinate-wise, "
                           "unweighted)")
    influence_bound: float = opt(3.0, "a client's change counts at most this many times the expert's typical "
                                 "change (its recent accepted ones; 100 times: left out), its sample count this many "
                                 "times the fleet's median (0: off)", least=0)
    trust_reference: bool = opt(False, "FLTrust (Cao et al., NDSS 2021): each round the server trains every task "
                                "once on its validation split; a client's change counts by the ReLU of its cosine with "
                                "that reference change, rescaled to its norm (a reversed or scaled update earns "
                                "nothing; the server loads torch and the data set)")
    fleet: dict | None = opt(None, "JSON fleet file: tiers (name, share of clients, memory_mb, speed) and "
                             "deadline_s; a client is asked only for tasks whose predicted round fits its tier "
                             "(default: no limits)", "fleet (device tiers; see trainer/protocol/fleet.py)",
                             parse="fleet")
    assignment: str = opt("one", "one: a round trains the schedule's task; resource-aware: each client trains the "
                          "most useful expert it can afford, so a round can train several; spread: clients shared "
                          "among the experts in proportion to their data, at least --min-cohort each, the root "
                          "every round and the others in turn (many-class trees)",
                          "fleet (device tiers; see trainer/protocol/fleet.py)",
                          choices=("one", "resource-aware", "spread"))
    min_cohort: int = opt(2, "resource-aware: an expert other than the round's own trains only if at least this "
                          "many clients chose it (the others move on to their next choice); spread: the clients "
                          "each expert gets",
                          "fleet (device tiers; see trainer/protocol/fleet.py)", least=1)
    min_children: int = opt(2, "HMoE: a client trains an expert only if it holds samples of at least this many of "
                            "the expert's children (a client with one child's samples can only teach it that child)",
                            least=1)
    tree: dict | None = opt(None, "train on this taxonomy instead of the data set's (a .json or .csv file, or a "
                            "shipped taxonomy's name); the data set's classes outside it are left out", "data",
                            parse="tree")
    arrival: dict | None = opt(None, "LEAF,LEAF@SHARE: those leaves' samples are held only by a seeded SHARE of the "
                               "clients (new data appears where it is collected); with --extend, SHARE alone means "
                               "the leaves the new tree adds", "data", parse="arrival")
    train_only: list | None = opt(None, "HMoE: NODE,NODE: rounds train only these experts (set by --extend to the "
                                  "changed and new ones)", parse="list")
    extends: dict | None = opt(None, "a grown run's record of the run it grew from (written by --extend; as a "
                               "flag: a JSON object)", parse="json")
    server_optimizer: str = opt("none", "label skew: the server's step towards each round's aggregate (none: "
                                "FedAvg; avgm: server momentum, Hsu et al. 2019; adam, yogi: Reddi et al., ICLR 2021)",
                                SKEW, choices=SERVER_OPTIMIZERS)
    server_lr: float = opt(1.0, "label skew: the server optimizer's learning rate (avgm: 1 is FedAvg plus momentum; "
                           "adam and yogi want about 0.01)", SKEW)
    server_momentum: float = opt(0.9, "label skew: the server optimizer's momentum (avgm) or first-moment decay "
                                 "(adam, yogi), in [0, 1)", SKEW)
    epochs_cap: int = opt(0, "label skew: HMoE balanced epochs at most this many times --local-epochs (0: no cap)",
                          SKEW, flag="--balanced-epochs-cap", least=0)
    warm_start: int = opt(0, "HMoE: the root expert trains alone for this many rounds, then every other expert "
                          "starts from its parent's weights (all but its output layer) and trains at --warm-lr times "
                          "the learning rate (0: off; HD-CNN's fine-from-coarse initialisation)",
                          "networks and local training", least=0)
    trunk_blocks: int = opt(0, "HMoE: experts on a shared trunk: the root expert's first K conv blocks are shared "
                            "by every other expert, which runs on their output and trains only its own layers "
                            "(0: independent experts, the paper's)",
                            "networks and local training", least=0)
    warm_lr: float = opt(0.1, "HMoE with --warm-start: the other experts' learning rate, as a share of --lr",
                         "networks and local training", least=0)
    device: str = opt("cpu", "cpu | cuda (when available)", "networks and local training")

    def __post_init__(self) -> None:
        for f in fields(self):
            least = f.metadata.get("least")
            value = getattr(self, f.name)
            flag = f.metadata.get("flag") or "--" + f.name.replace("_", "-")
            if least is not None and value < least:
                raise UsageError(f"{flag} must be at least {least:g}; got {value}")
            choices = f.metadata.get("choices")
            if choices and value not in choices:
                raise UsageError(f"{flag} {value!r}; expected one of {', '.join(choices)}")
        if self.clients_per_round > self.clients:
            raise UsageError(f"--clients-per-round {self.clients_per_round} is more than --clients {self.clients}")
        if not 0.0 <= self.dropout < 1.0:
            raise UsageError(f"--dropout must be in [0, 1); got {self.dropout}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise UsageError(f"--val-fraction must be in [0, 1); got {self.val_fraction}")
        if self.alpha <= 0:
            raise UsageError(f"--alpha must be positive; got {self.alpha}")
        if not 0 < self.server_lr <= 10:
            raise UsageError(f"--server-lr must be in (0, 10]; got {self.server_lr}")
        if not 0 <= self.server_momentum < 1:
            raise UsageError(f"--server-momentum must be in [0, 1); got {self.server_momentum}")

    def remedy(self, name: str):
        """A label-skew setting by its ``REMEDIES`` name ('local.prox_mu' reads the local config)."""
        head, _, tail = name.partition(".")
        return getattr(self.local, tail) if tail else getattr(self, head)

    def remedy_differences(self, other: "RunConfig") -> list[str]:
        """'NAME: ours vs theirs' for every label-skew setting that differs from ``other``'s."""
        return [f"{flag_of(n)} {self.remedy(n)!r} vs {other.remedy(n)!r}" for n in REMEDIES
                if self.remedy(n) != other.remedy(n)]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        """Refuses names this release does not know, and values out of range, naming them."""
        d = dict(d)
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise UsageError(f"unknown run settings {', '.join(unknown)}")
        local = dict(d.get("local", {}))
        for name, legacy in REMEDIES.items():          # a run saved before the setting existed
            head, _, tail = name.partition(".")
            if tail and tail not in local:
                local[tail] = legacy
            elif not tail and head not in d:
                d[head] = legacy
        d["local"] = LocalConfig.from_dict(local)
        return cls(**d)

    def rounds(self, kind: str) -> int:
        return self.hmoe_rounds if kind == "hmoe" else self.flat_rounds

    def width(self, kind: str) -> int:
        return self.expert_width if kind == "hmoe" else self.flat_width

    def tasks(self, kind: str, tree: Hierarchy, in_shape: tuple[int, int, int]) -> dict[str, Task]:
        """The networks of model family ``kind``, experts sized by ``expert_widths``."""
        widths = expert_widths(tree, self.expert_widths, self.expert_width) if kind == "hmoe" else None
        return make_tasks(tree, kind, in_shape, self.width(kind), self.depth, widths=widths,
                          trunk_blocks=self.trunk_blocks if kind == "hmoe" else 0)

    def strategy(self, kind: str, tree: Hierarchy, tasks: dict[str, Task], shares: dict[str, float] | None = None,
                 schedule: str | None = None, priors: dict[str, list[float]] | None = None) -> Strategy:
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
                        min_children=self.min_children, server_optimizer=self.server_optimizer,
                        server_lr=self.server_lr, server_momentum=self.server_momentum, epochs_cap=self.epochs_cap,
                        priors=priors, warm_start=self.warm_start if hmoe else 0, warm_lr=self.warm_lr,
                        trust_reference=self.trust_reference)


def refuse_trunk(cfg: RunConfig, what: str) -> None:
    """Refuse a run whose experts share a trunk where that is not supported yet."""
    if cfg.trunk_blocks:
        raise RunError(f"{what} cannot yet take a run with --trunk-blocks {cfg.trunk_blocks} (experts on a shared "
                       "trunk); train a new run on the grown tree instead")


# The settings a data set starts from when its flags are not given (`hmoe train --dataset
# hanzi:500` alone runs the configuration docs/TRAINING.md measured best there); a flag given
# on the command line always wins. Keyed by the data set's family (its name before any ':').
DATASET_DEFAULTS: dict[str, dict] = {
    "hanzi": {"partition": "iid", "clients_per_round": 20, "assignment": "spread", "min_cohort": 2,
              "warm_start": 30, "expert_widths": "map:root=32", "trunk_blocks": 2,
              "hmoe_rounds": 100, "flat_rounds": 100},
}


def dataset_defaults(dataset: str | None) -> dict:
    """``DATASET_DEFAULTS`` of ``dataset``'s family ({} for a data set without any)."""
    return DATASET_DEFAULTS.get(str(dataset or "").split(":", 1)[0], {})


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
    changed = cfg.remedy_differences(saved)
    if changed:
        raise RunError(f"{run_dir} was created with other label-skew settings than asked now ({'; '.join(changed)}, "
                       "asked vs created): a run keeps its objective and server optimizer for life; resume it without "
                       "those flags, or start a new run with --out")
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
