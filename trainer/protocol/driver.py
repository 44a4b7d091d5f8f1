"""The round driver: plan -> collect -> close -> commit, written once for every transport.

A transport (in-process simulation, HTTP coordinator, Flower) only moves the messages this
module decides: ``plan`` says which reachable client trains which task with which
hyper-parameters and seed (and why each other client sits the round out); ``check_reply``
says whether a client's reply can count (names, shapes, dtype, finiteness, sample count,
hyper-parameters); ``close`` aggregates each task with the strategy's rule, records what
the schedule reads, and commits the round through ``RunStore`` (one log format, one
checkpoint layout). numpy only: torch work (initial weights, validation) comes in as
callbacks from the transport that has it.

Crash safety of the run directory: a round's new weights go to ``<file>.pending``; the
round is committed when ``state-<kind>.json`` (atomic) records it; then the pending file is
renamed into place. On open a pending file of a committed round is rolled forward, any
other is deleted, so a run killed at any moment continues from its last completed round.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np

from hierarchy import Hierarchy
from hierarchy.errors import UsageError
from hierarchy.tree import write_bytes_atomic, write_text_atomic
from safetensors.numpy import load_file, save
from trainer.device.config import LocalConfig, Weights
from trainer.protocol.checkpoint import load_checkpoint, read_metadata, save_checkpoint
from trainer.protocol.fleet import FleetCosts, Prediction
from trainer.protocol.messages import reported_loss, reported_seconds
from trainer.protocol.aggregate import trust_results
from trainer.protocol.strategy import Strategy, Task, stable_seed, usable_samples

FLAT_FILE = "flat.safetensors"


@dataclass
class RoundPlan:
    """A round's decisions, made by the strategy before any client trains."""

    rnd: int
    first: str                                   # the round's own task (the schedule's choice)
    assigned: dict[int, str]                     # client -> task
    configs: dict[int, LocalConfig] = field(default_factory=dict)
    seeds: dict[int, int] = field(default_factory=dict)
    dropped: list[int] = field(default_factory=list)     # sampled, but not reachable this round
    skipped: list[int] = field(default_factory=list)     # no samples under any task it could train
    unfit: list[int] = field(default_factory=list)       # samples, but no task it can afford
    no_cohort: list[int] = field(default_factory=list)   # could afford a task, too few chose it
    device_seconds: float = 0.0

    def excusal(self, client: int) -> str | None:
        """Why ``client`` trains nothing this round (None: it is assigned a task)."""
        if client in self.assigned:
            return None
        if client in self.no_cohort:
            return "too few clients chose the tasks it can afford (--min-cohort)"
        if client in self.unfit:
            return "its predicted round does not fit its tier's memory or deadline"
        if client in self.skipped:
            return "no usable samples under the round's tasks (none, or under fewer than --min-children children)"
        return "not sampled for this round"

    def to_dict(self) -> dict:
        return {"round": self.rnd, "first": self.first, "assigned": {str(c): k for c, k in self.assigned.items()},
                "configs": {str(c): v.to_dict() for c, v in self.configs.items()},
                "seeds": {str(c): s for c, s in self.seeds.items()}, "dropped": self.dropped,
                "skipped": self.skipped, "unfit": self.unfit, "no_cohort": self.no_cohort,
                "device_seconds": self.device_seconds}

    @classmethod
    def from_dict(cls, d: dict) -> "RoundPlan":
        return cls(int(d["round"]), d["first"], {int(c): k for c, k in d["assigned"].items()},
                   {int(c): LocalConfig.from_dict(v) for c, v in d["configs"].items()},
                   {int(c): int(s) for c, s in d["seeds"].items()}, list(d["dropped"]), list(d["skipped"]),
                   list(d["unfit"]), list(d["no_cohort"]), float(d["device_seconds"]))


class ClientSampler:
    """Which clients a round reaches (seeded sample) and which of them drop out (simulation only:
    a real fleet's devices drop out by themselves)."""

    def __init__(self, seed: int, num_clients: int, per_round: int, dropout: float = 0.0) -> None:
        if not 1 <= per_round <= num_clients:
            raise UsageError(f"clients per round must be in [1, {num_clients}]; got {per_round}")
        if not 0.0 <= dropout < 1.0:
            raise UsageError(f"dropout must be in [0, 1); got {dropout}")
        self.seed, self.num_clients, self.per_round, self.dropout = seed, num_clients, per_round, dropout

    def sample(self, rnd: int) -> list[int]:
        rng = np.random.default_rng([self.seed, rnd, 7])
        return sorted(int(c) for c in rng.choice(self.num_clients, self.per_round, replace=False))

    def drops_out(self, rnd: int, client: int) -> bool:
        return bool(np.random.default_rng([self.seed, rnd, client, 11]).random() < self.dropout)


class RunStore:
    """A model family's files in the run directory: one checkpoint per task and the state file
    (completed rounds, weights versions, the round log, the strategy's state)."""

    def __init__(self, run_dir: str | os.PathLike, kind: str, tasks: dict[str, Task]) -> None:
        self.run_dir, self.kind, self.tasks = Path(run_dir), kind, tasks
        self.state_path = self.run_dir / f"state-{kind}.json"
        self.state: dict = {"completed_rounds": 0, "versions": {}, "log": []}

    def checkpoint_path(self, key: str) -> Path:
        stem = self.tasks[key].file_stem
        return self.run_dir / (FLAT_FILE if self.tasks[key].node < 0 else f"experts/{stem}.safetensors")

    def server_path(self, key: str) -> Path:
        """The server optimizer's moments of ``key`` (--server-optimizer avgm, adam, yogi)."""
        return self.run_dir / f"server/{self.kind}-{self.tasks[key].file_stem}.safetensors"

    def _settle(self, path: Path) -> None:
        """Roll a committed round's pending file forward, delete any other (see the module)."""
        pending = path.with_name(path.name + ".pending")
        if pending.exists():
            meta = json.loads(read_metadata(pending).get("meta", "{}"))
            if meta.get("round") is not None and meta.get("round") == self.state["versions"].get(meta.get("node")):
                os.replace(pending, path)  # committed round: roll forward
            else:
                pending.unlink()           # round never committed: roll back

    def server_state(self) -> dict[str, dict[str, np.ndarray]]:
        """Every task's saved server optimizer moments (after ``open``)."""
        out = {}
        for key in self.tasks:
            path = self.server_path(key)
            self._settle(path)
            if path.exists():
                out[key] = load_file(str(path))
        return out

    def open(self, init: Callable[[str], Weights] | None) -> dict[str, Weights]:
        """Every task's latest committed weights (rolling a committed round's pending files
        forward); a task without a checkpoint gets ``init(key)``, saved at once."""
        self.load_state()
        weights = {}
        for key, task in self.tasks.items():
            path = self.checkpoint_path(key)
            self._settle(path)
            if path.exists():
                weights[key], _, _ = load_checkpoint(path)
            elif init is None:
                raise FileNotFoundError(f"{path}: the run has no checkpoint of {key}; create the run with "
                                        "`hmoe plan` or `hmoe train`")
            else:
                weights[key] = init(key)
                save_checkpoint(path, weights[key], task.net, {"node": key, "round": None})
        return weights

    def load_state(self) -> dict:
        """The state file as saved (a new run's empty state when there is none)."""
        if self.state_path.exists():
            self.state = json.loads(self.state_path.read_text())
        return self.state

    def write_state(self) -> None:
        write_text_atomic(self.state_path, json.dumps(self.state, indent=1) + "\n")

    def commit(self, rnd: int, updated: dict[str, Weights], entry: dict, strategy_state: dict,
               server: dict[str, dict[str, np.ndarray]] | None = None) -> None:
        """Write the round's new weights (and the server optimizer's moments of the tasks it
        updated) as pending files, commit the state, then rename."""
        pendings = {}
        for key, new in updated.items():
            path = self.checkpoint_path(key)
            pendings[path] = path.with_name(path.name + ".pending")
            save_checkpoint(pendings[path], new, self.tasks[key].net, {"node": key, "round": rnd})
            self.state["versions"][key] = rnd
            if server and key in server:
                spath = self.server_path(key)
                spath.parent.mkdir(parents=True, exist_ok=True)
                pendings[spath] = spath.with_name(spath.name + ".pending")
                write_bytes_atomic(pendings[spath], save({k: np.ascontiguousarray(v) for k, v in server[key].items()},
                                                         metadata={"meta": json.dumps({"node": key, "round": rnd})}))
        self.state["completed_rounds"] = rnd + 1
        self.state["log"].append(entry)
        self.state["strategy"] = strategy_state
        self.write_state()
        for path, pending in pendings.items():
            os.replace(pending, path)


Validator = Callable[[str, Weights], "float | None"]
# (task, its weights at the round's start, the round's hyper-parameters, seed, the optimizer steps of
# the round's median client) -> the server's own update of the task on its validation split, as
# many steps long, or None (FLTrust's reference; torch, so a callback)
Referee = Callable[[str, Weights, LocalConfig, int, int], "Weights | None"]
DIVERGED = "diverged: non-finite loss or weights"
MALFORMED_METRICS = "malformed metrics: train_loss is not a number"


def check_arrays(task: Task, weights: Weights, finite: bool = True) -> str | None:
    """Why ``weights`` cannot be ``task``'s arrays (names, shapes, float32, and with ``finite``
    finiteness), or None: the one check of every transport's replies."""
    want = task.net.param_shapes()
    if set(weights) != set(want):
        missing, extra = sorted(set(want) - set(weights)), sorted(set(weights) - set(want))
        return f"tensor names differ from expert {task.key!r}: missing {missing[:3]}, extra {extra[:3]}"
    for name, shape in want.items():
        arr = np.asarray(weights[name])
        if tuple(arr.shape) != tuple(shape) or arr.dtype != np.float32:
            return f"tensor {name!r} is {arr.dtype}{list(arr.shape)}; expected float32{list(shape)}"
        if finite and not np.isfinite(arr).all():
            return f"tensor {name!r} holds NaN or infinite values"
    return None


@lru_cache(maxsize=1024)
def config_dict(local: LocalConfig) -> dict:
    """``local.to_dict()``, once per distinct config (a round's clients mostly share one; a
    coordinator answers thousands of requests with it). Callers must not change it."""
    return local.to_dict()


def check_hyperparameters(used: dict, assigned: LocalConfig, rnd: int) -> str | None:
    """Why a reply trained with ``used`` does not count for an assignment of ``assigned``, or None."""
    if used == config_dict(assigned):   # the common case, without building a config
        return None
    try:
        got = LocalConfig.from_dict(used)
    except (TypeError, ValueError) as exc:
        return f"hyper-parameters: {exc}; expected the assignment's hyperparameters"
    diff = got.differences(assigned)
    if not diff:
        return None
    return "trained with other hyper-parameters than round {} assigned: {}".format(
        rnd, ", ".join(f"{f} {getattr(got, f)!r} (assigned {getattr(assigned, f)!r})" for f in diff))


class RoundDriver:
    """One model family's rounds, for every transport: the strategy decides, the driver keeps
    what clients hold (their samples per task), plans, checks replies, closes and commits.

    ``counts`` are the clients' samples per leaf as far as known (the simulation knows its
    partition; the coordinator and Flower learn them from their devices, ``use_counts``).
    ``validate(key, weights)`` gives a task's validation error (only called when the schedule
    reads it); ``evaluate()`` a periodic validation F1 for the log (in-process only)."""

    def __init__(self, store: RunStore, strategy: Strategy, tree: Hierarchy, sampler: ClientSampler,
                 counts: dict[int, np.ndarray], fleet: FleetCosts | None = None,
                 validate: Validator | None = None, reference: Referee | None = None) -> None:
        self.store, self.strategy, self.tree, self.sampler, self.fleet = store, strategy, tree, sampler, fleet
        self.tasks = store.tasks
        self.validate = validate
        self.reference = reference
        self.task_n: dict[int, dict[str, int]] = {}
        self.client_n: dict[int, int] = {}
        for client, c in counts.items():
            self.use_counts(client, c)
        self.weights: dict[str, Weights] = {}

    @property
    def state(self) -> dict:
        return self.store.state

    def open(self, init: Callable[[str], Weights] | None) -> None:
        """Load the weights and the schedule's state; a new run records every validation error once."""
        self.weights = self.store.open(init)
        self.strategy.server_state = self.store.server_state()
        if "strategy" in self.store.state:
            self.strategy.restore(self.store.state["strategy"])
        else:
            for key in self.tasks:
                self._record_validation(key)
            self.store.state["strategy"] = self.strategy.state()
            self.store.write_state()

    def use_counts(self, client: int, leaf_counts: np.ndarray) -> None:
        """A client's samples per leaf (its partition, or what its device or node reported)."""
        leaf_counts = self.strategy.check_counts(leaf_counts)
        self.task_n[client] = {k: usable_samples(self.tree, t, leaf_counts, self.strategy.min_children)
                               for k, t in self.tasks.items()}
        self.client_n[client] = int(np.sum(leaf_counts))

    # ----------------------------------------------------------------- fleet
    def predict(self, client: int, key: str, local: LocalConfig) -> Prediction | None:
        """The predicted cost of ``client``'s round of ``key`` (None without a fleet)."""
        if self.fleet is None:
            return None
        return self.fleet.predict(client, self.tasks[key].net, self.task_n[client][key], local)

    def can_take(self, client: int, key: str) -> bool:
        """Whether the client holds samples under ``key`` and, in a fleet, can afford one epoch of it."""
        if self.fleet is None:
            return self.task_n[client][key] > 0
        return self.fleet.can_take(client, self.tasks[key].net, self.task_n[client][key])

    def max_epochs(self, client: int, key: str) -> int:
        return self.fleet.max_epochs(client, self.tasks[key].net, self.task_n[client][key]) if self.fleet else 0

    # ------------------------------------------------------------------ plan
    def reachable(self, rnd: int, present: set[int] | None = None, simulate_dropout: bool = True
                  ) -> tuple[list[int], list[int]]:
        """The round's sample split into reachable and dropped clients: a sampled client is
        dropped when its transport cannot reach it (``present``: the clients a transport can
        reach, None: all) or, in simulation, when it drops out."""
        reachable, dropped = [], []
        for client in self.sampler.sample(rnd):
            ok = (present is None or client in present) and client in self.task_n
            if ok and simulate_dropout:
                ok = not self.sampler.drops_out(rnd, client)
            (reachable if ok else dropped).append(client)
        return reachable, dropped

    def plan(self, rnd: int, present: set[int] | None = None, simulate_dropout: bool = True) -> RoundPlan:
        """Who trains what in round ``rnd`` and with which hyper-parameters and seed: the
        strategy assigns tasks to the reachable clients that can afford them."""
        s = self.strategy
        reachable, dropped = self.reachable(rnd, present, simulate_dropout)
        offers = {c: {k for k in self.tasks if self.can_take(c, k)} for c in reachable}
        assigned = s.assign(rnd, offers)
        first = s.order(rnd)[0]
        plan = RoundPlan(rnd, first, assigned, dropped=dropped)
        for c in reachable:
            if c in assigned:
                key = assigned[c]
                local = s.client_config(key, rnd, self.client_n[c], self.task_n[c][key], self.max_epochs(c, key))
                plan.configs[c] = local
                plan.seeds[c] = s.client_seed(rnd, c)
                pred = self.predict(c, key, local)
                if pred is not None:
                    plan.device_seconds += pred.seconds
            elif offers[c] and s.assignment != "one":
                plan.no_cohort.append(c)
            elif self.task_n[c][first] if s.assignment == "one" else any(self.task_n[c].values()):
                plan.unfit.append(c)
            else:
                plan.skipped.append(c)
        return plan

    # --------------------------------------------------------------- collect
    def check_reply(self, plan: RoundPlan, client: int, weights: Weights, num_samples: object,
                    hyperparameters: dict | None = None) -> str | None:
        """Why a client's reply cannot count, or None. Checked on every transport: the client was
        assigned a task, the arrays are the task's (names, shapes, float32), the sample count is
        an integer in [1, the client's samples under the task] and, where the transport carries
        them, the hyper-parameters are the plan's. Non-finite arrays are reported as
        'diverged' (a reason of their own: the run's warning names them)."""
        key = plan.assigned.get(client)
        if key is None:
            return f"client {client} has no task in round {plan.rnd}"
        why = check_arrays(self.tasks[key], weights, finite=False)
        if why:
            return why
        most = self.task_n[client][key]
        if isinstance(num_samples, bool) or not isinstance(num_samples, (int, np.integer)) \
                or not 0 < num_samples <= most:
            return (f"num-examples {num_samples!r}: expected an integer in [1, {most}] "
                    f"(the client's samples under {key})")
        if hyperparameters is not None:
            why = check_hyperparameters(hyperparameters, plan.configs[client], plan.rnd)
            if why:
                return why
        if not all(np.isfinite(np.asarray(v)).all() for v in weights.values()):
            return DIVERGED
        return None

    # ----------------------------------------------------------------- close
    def close(self, plan: RoundPlan, results: dict[int, tuple[Weights, dict]], left_out: dict | None = None,
              extra: Callable[[], dict] | None = None) -> dict:
        """``aggregate`` then ``commit``: the round's end, in one call."""
        updated, entry = self.aggregate(plan, results, left_out, extra)
        self.commit(plan.rnd, updated, entry)
        return entry

    def commit(self, rnd: int, updated: dict[str, Weights], entry: dict) -> None:
        """The round's files (``RunStore.commit``), with the strategy's state after it."""
        self.store.commit(rnd, updated, entry, self.strategy.state(), self.strategy.server_state)

    def aggregate(self, plan: RoundPlan, results: dict[int, tuple[Weights, dict]], left_out: dict | None = None,
                  extra: Callable[[], dict] | None = None) -> tuple[dict[str, Weights], dict]:
        """Aggregate each task over its clients' results (``results[client]``: new weights and
        metrics with num_samples, train_loss, train_seconds), record the schedule's inputs and
        build the round's log entry; returns the new weights and the entry (``commit`` writes
        them). Replies that fail ``check_reply`` are left out with their reason (a
        non-finite one, or a non-finite loss, as 'diverged'). ``extra()``, called once the new
        weights are in place, adds a transport's own figures to the log entry."""
        s, rnd = self.strategy, plan.rnd
        left_out = dict(left_out or {})
        by_task: dict[str, list] = {}
        diverged, losses = [], []
        for client in sorted(results):
            new, metrics = results[client]
            why = self.check_reply(plan, client, new, metrics.get("num_samples"))
            loss = reported_loss(metrics)
            if why is None and loss is None:
                why = MALFORMED_METRICS
            elif why is None and not np.isfinite(loss):
                why = DIVERGED
            if why == DIVERGED:
                diverged.append(client)
                continue
            if why is not None:
                left_out[str(client)] = why
                continue
            by_task.setdefault(plan.assigned[client], []).append((client, new, int(metrics["num_samples"])))
            losses.append(loss)
        updated = {}
        for key in list(by_task):   # each result's influence bounded: by the server's reference, or by history
            res = by_task[key]
            trusted = self._trusted(plan, key, res)
            if trusted is not None:   # FLTrust: weighted by direction, no longer than the server's own change
                (kept, rejected, _), norms, cap = trusted, None, 0
            else:
                kept, rejected, norms = s.bound([(w, n) for _, w, n in res], self.weights[key], key)
                cap = s.sample_cap([n[key] for n in self.task_n.values()])
            for i, why in rejected.items():
                left_out[str(res[i][0])] = why
            by_task[key] = [res[i] for i in kept]
            if not kept:
                del by_task[key]
                continue
            updated[key] = s.combine(list(kept.values()), self.weights[key], key, cap)
            if norms is not None:
                s.remember(key, norms)
        entry = {"round": rnd, "task": plan.first, "clients": sum(map(len, by_task.values())),
                 "samples": sum(n for res in by_task.values() for _, _, n in res),
                 "skipped": plan.skipped, "dropped": plan.dropped, "diverged": diverged,
                 "client_seconds": float(sum(reported_seconds(m) for _, m in results.values())),
                 "client_gmacs": float(sum(n * (plan.configs[c].epochs * 3 * self.tasks[k].net.forward_macs()
                                                + self.tasks[k].net.trunk_passes(n, plan.configs[c].epochs)
                                                * self.tasks[k].net.trunk_macs())
                                           for k, res in by_task.items() for c, _, n in res) / 1e9),
                 "lr": s.lr(rnd), "client_config": {str(c): local.to_dict() for c, local in plan.configs.items()},
                 "train_loss": float(np.mean(losses)) if losses else None}
        if s.assignment != "one" or self.fleet is not None:
            entry.update(tasks={k: [c for c, _, _ in res] for k, res in by_task.items()},
                         assigned={str(c): k for c, k in plan.assigned.items()}, unfit=plan.unfit,
                         no_cohort=plan.no_cohort)
        if self.fleet is not None:
            entry["device_seconds"] = plan.device_seconds
        if left_out:
            entry["left_out"] = left_out
        warm = s.warm_starts(rnd, {**self.weights, **updated})
        if warm:   # stored as new versions like the round's aggregates, so every transport serves them
            updated.update(warm)
            entry["warm_started"] = sorted(warm)
        for key, new in updated.items():
            self.weights[key] = new
            self._record_validation(key)
        entry.update(extra() if extra else {})
        return updated, entry

    def _trusted(self, plan: RoundPlan, key: str, res: list):
        """``trust_results`` against the server's reference update of ``key`` this round, or None
        (FLTrust off, no reference from this transport, or the reference is no change)."""
        if not self.strategy.trust_reference or self.reference is None:
            return None
        config = plan.configs[res[0][0]]   # the round's hyper-parameters for the task (a client's)
        steps = sorted(plan.configs[c].epochs * -(-n // plan.configs[c].batch_size) for c, _, n in res)
        seed = stable_seed(self.strategy.seed, plan.rnd, "reference", key)
        reference = self.reference(key, self.weights[key], config, seed, steps[(len(steps) - 1) // 2])
        return None if reference is None else trust_results([(w, n) for _, w, n in res], self.weights[key], reference)

    def _record_validation(self, key: str) -> None:
        """The task's validation error, on every transport alike, when the schedule reads it."""
        if self.validate is None or not self.strategy.needs_validation:
            return
        error = self.validate(key, self.weights[key])
        if error is not None:
            self.strategy.record_validation(key, error)


