"""The in-process federated loop, written once for HMoE and flat, with a resumable run directory.

Crash safety: a round's new weights go to ``<file>.pending``; the round is committed
when ``state-<kind>.json`` (atomic) records it; then the pending file is renamed into
place. On resume a pending file of a committed round is rolled forward, any other
is deleted, so a run killed at any moment continues from its last completed round.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from hierarchy import Hierarchy
from hierarchy.errors import UsageError
from hierarchy.tree import write_text_atomic
from trainer.checkpoint import load_checkpoint, read_metadata, save_checkpoint
from trainer.client import Normalizer, load_numpy, local_update, to_numpy
from trainer.config import LocalConfig
from trainer.datasets import Dataset, load_dataset
from trainer.evaluate import evaluate_flat, evaluate_hmoe, validation_error
from trainer.fedavg import Weights
from trainer.fleet import CostBook, Fleet, FleetCosts, Prediction
from trainer.nets import ConvNet, build_net
from trainer.partition import partition
from trainer.run import RunConfig, RunError, merged_config, start_run, write_input_spec
from trainer.strategy import Task, stable_seed, usable_samples


@dataclass
class Prepared:
    """A data set split for federated training: validation indices and client partitions."""

    data: Dataset
    val_idx: np.ndarray
    parts: list[np.ndarray]
    normalize: Normalizer


def limit(data: Dataset, train: int, test: int, seed: int) -> Dataset:
    """A seeded subsample of the splits, for quick runs and tests (0 keeps a split whole)."""
    rng = np.random.default_rng([seed, 5])
    if train and train < len(data.train_y):
        keep = np.sort(rng.choice(len(data.train_y), train, replace=False))
        data = replace(data, train_x=data.train_x[keep], train_y=data.train_y[keep])
    if test and test < len(data.test_y):
        keep = np.sort(rng.choice(len(data.test_y), test, replace=False))
        data = replace(data, test_x=data.test_x[keep], test_y=data.test_y[keep])
    return data


def prepare(cfg: RunConfig, data: Dataset | None = None) -> Prepared:
    """Split the data set: validation indices and client partitions. The split is made over
    the data set's every class, and a run with its own tree (``cfg.tree``) then leaves out the
    classes outside it, so a run that holds a class out and the run that later adds it give
    each client the same samples of the other classes."""
    data = limit(data or load_dataset(cfg.dataset, cfg.data_root), cfg.train_limit, cfg.test_limit, cfg.seed)
    rng = np.random.default_rng([cfg.seed, 3])
    order = rng.permutation(len(data.train_y))
    n_val = int(round(cfg.val_fraction * len(order)))
    val_idx, pool = np.sort(order[:n_val]), order[n_val:]
    parts = [np.sort(pool[p]) for p in partition(cfg.partition, data.train_y[pool], cfg.clients, cfg.seed, cfg.alpha)]
    if cfg.tree is not None:
        data, val_idx, parts = restrict(data, Hierarchy.from_dict(cfg.tree, "config.json tree"), val_idx, parts)
    if cfg.arrival:
        parts = arrive(data, parts, cfg.arrival, cfg.seed)
    return Prepared(data, val_idx, parts, Normalizer(data.mean, data.std))


def restrict(data: Dataset, tree: Hierarchy, val_idx: np.ndarray,
             parts: list[np.ndarray]) -> tuple[Dataset, np.ndarray, list[np.ndarray]]:
    """The data set under ``tree``: samples of its leaves only, labelled in its leaf order
    (the data set's class order), with the validation and client indices moved along."""
    classes = [data.tree.names[v] for v in data.tree.leaf_order]
    leaves = [tree.names[v] for v in tree.leaf_order]
    unknown = [n for n in leaves if n not in classes]
    if unknown:
        raise UsageError(f"the tree's leaves {unknown[:5]} are not classes of {data.name}; its classes are "
                         f"{', '.join(classes)}")
    tree = tree.with_leaf_order([c for c in classes if c in leaves])
    remap = np.full(len(classes), -1, dtype=np.int64)
    for new, name in enumerate(c for c in classes if c in leaves):
        remap[classes.index(name)] = new
    keep = remap[data.train_y] >= 0
    position = np.cumsum(keep) - 1
    keep_test = remap[data.test_y] >= 0
    data = replace(data, tree=tree, train_x=data.train_x[keep], train_y=remap[data.train_y[keep]],
                   test_x=data.test_x[keep_test], test_y=remap[data.test_y[keep_test]])
    return data, position[val_idx[keep[val_idx]]], [position[p[keep[p]]] for p in parts]


def arrive(data: Dataset, parts: list[np.ndarray], arrival: dict, seed: int) -> list[np.ndarray]:
    """Where new classes are collected: the samples of ``arrival['leaves']`` go to a seeded
    share ``arrival['clients']`` of the clients (dealt round-robin in a seeded order; the
    others' samples of those leaves move there, so the class keeps all its data)."""
    tree = data.tree
    leaves = list(arrival.get("leaves", []))
    share = float(arrival.get("clients", 1.0))
    names = [tree.names[v] for v in tree.leaf_order]
    unknown = [n for n in leaves if n not in names]
    if unknown or not leaves:
        raise UsageError(f"arrival leaves {unknown or leaves}: expected leaves of the run's tree ({', '.join(names)})")
    if not 0.0 < share <= 1.0:
        raise UsageError(f"arrival share of clients {share}; expected a number in (0, 1]")
    labels = np.array([names.index(n) for n in leaves])
    rng = np.random.default_rng(stable_seed(seed, "arrival", *leaves))
    holders = np.sort(rng.choice(len(parts), max(1, int(round(share * len(parts)))), replace=False))
    moving = np.concatenate([p[np.isin(data.train_y[p], labels)] for p in parts])
    moving = moving[rng.permutation(len(moving))]
    out = [p[~np.isin(data.train_y[p], labels)] for p in parts]
    for j, c in enumerate(holders):
        out[c] = np.sort(np.concatenate([out[c], moving[j::len(holders)]]))
    return out


def open_run(run_dir: Path, cfg: RunConfig, resume: bool, data: Dataset | None = None,
             kinds: tuple[str, ...] = ("hmoe", "flat"), seed_book: CostBook | None = None) -> tuple[RunConfig, Prepared]:
    """Create (or with ``resume`` reopen) a run directory and its data: the run records its
    hierarchy and input specification from the start, so nothing downstream loads the data
    set to learn them. With a fleet, the costs of the ``kinds``' networks are measured (or
    taken from ``seed_book``) and a fleet that cannot train is refused, before anything is
    written."""
    cfg = merged_config(run_dir, cfg, resume)
    prep = prepare(cfg, data)
    tree = prep.data.tree
    families = {k: cfg.tasks(k, tree, prep.data.shape) for k in ("hmoe", *kinds)}   # a bad --expert-widths fails here
    book = None
    if cfg.fleet:
        fleet = Fleet.from_dict(cfg.fleet, "fleet")
        tasks = [t for k in kinds for t in families[k].values()]
        book, changed = run_costs(run_dir, tasks, cfg, prep, seed_book)
        samples = {k: client_task_samples(tree, families[k], prep, cfg.min_children) for k in kinds}
        # HMoE's point is that every tier has an expert to train: a tier that fits none is an
        # error; a flat-only run is the baseline whose weak devices never train: a warning
        for warning in FleetCosts(fleet, cfg.clients, cfg.seed, book, cfg.local).check(
                [(t.key, t.net, [n[t.key] for n in samples[k]]) for k in kinds for t in families[k].values()],
                idle_tiers="hmoe" not in kinds):
            print(f"warning: {warning}", file=sys.stderr)
    cfg = start_run(run_dir, cfg, resume)
    tree.to_json(Path(run_dir) / "hierarchy.json")
    write_input_spec(run_dir, prep.data.input_spec)
    if book is not None and changed:
        write_text_atomic(Path(run_dir) / COSTS, json.dumps(book.to_dict(), indent=1) + "\n")
    return cfg, prep


@dataclass
class RoundPlan:
    """A round's decisions, made by the strategy before any client trains."""

    rnd: int
    first: str                                   # the round's own task (the schedule's choice)
    assigned: dict[int, str]                     # client -> task
    configs: dict[int, LocalConfig] = field(default_factory=dict)
    seeds: dict[int, int] = field(default_factory=dict)
    dropped: list[int] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
    unfit: list[int] = field(default_factory=list)
    no_cohort: list[int] = field(default_factory=list)
    device_seconds: float = 0.0


class SimulatedClients:
    """What only the simulated transport decides: which clients a round reaches and which
    of them drop out (a real fleet's devices decide that themselves)."""

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


COSTS = "costs.json"


def run_costs(run_dir: Path, tasks: list[Task], cfg: RunConfig, prep: Prepared,
              seed_book: CostBook | None = None) -> tuple[CostBook, bool]:
    """The run's measured per-round costs: those kept in ``costs.json`` from an earlier
    start of the run, else ``seed_book``'s where it has the network, else measured here
    (each network in fresh processes, on the first training samples under its task).
    Returns the book and whether it changed (the caller writes it)."""
    from trainer.cost import measure_profile
    from trainer.report import machine_info
    path = Path(run_dir) / COSTS
    book = CostBook.load(path) if path.exists() else CostBook()
    missing = {t.net.to_json(): t for t in tasks if book.get(t.net, cfg.local) is None}
    changed = bool(missing) or not path.exists()
    for net_json, t in list(missing.items()):
        found = seed_book.get(t.net, cfg.local) if seed_book is not None else None
        if found is not None:
            book.add(t.net, cfg.local, {k: v for k, v in found.items() if k != "key"})
            del missing[net_json]
    d = prep.data
    pool = np.setdiff1d(np.arange(len(d.train_y)), prep.val_idx)
    for t in missing.values():
        idx, target = t.select(d.tree, d.train_y[pool])
        chosen = pool[idx][:1024]
        book.add(t.net, cfg.local, {"task": t.key, **measure_profile(
            t.net, cfg.local, d.train_x[chosen], target[:1024], d.mean, d.std,
            stable_seed(cfg.seed, "fleet-cost", t.key), cfg.device)})
    if missing:
        book.meta = {"machine": machine_info(), "method": "cost worker, one torch thread, a fresh process per "
                     "figure: full batch (median of 3 epochs over up to 1024 samples) and micro-batch 1 (one epoch "
                     "over up to 256 samples); memory is the peak RSS growth over the warmed-up idle process"}
    return book, changed


def client_task_samples(tree: Hierarchy, tasks: dict[str, Task], prep: Prepared,
                        min_children: int = 1) -> list[dict[str, int]]:
    """Per client, how many of its samples each task trains on (``usable_samples``)."""
    counts = [np.bincount(prep.data.train_y[p], minlength=tree.num_leaves) for p in prep.parts]
    return [{k: usable_samples(tree, t, c, min_children) for k, t in tasks.items()} for c in counts]


def task_shares(tree: Hierarchy, tasks: dict[str, Task], labels: np.ndarray) -> dict[str, float]:
    return {k: float(t.select(tree, labels)[0].mean()) for k, t in tasks.items()}


class Federation:
    """One model family (``hmoe`` or ``flat``) of a run directory, round by round."""

    def __init__(self, run_dir: str | os.PathLike, kind: str, cfg: RunConfig, prep: Prepared) -> None:
        self.run_dir, self.kind, self.cfg, self.prep = Path(run_dir), kind, cfg, prep
        self.tree = prep.data.tree
        self.tasks = cfg.tasks(kind, self.tree, prep.data.shape)
        self.strategy = cfg.strategy(kind, self.tree, self.tasks, task_shares(self.tree, self.tasks, prep.data.train_y))
        self.clients = SimulatedClients(cfg.seed, cfg.clients, cfg.clients_per_round, cfg.dropout)
        self.state_path = self.run_dir / f"state-{kind}.json"
        self.task_n = client_task_samples(self.tree, self.tasks, prep, cfg.min_children if kind == "hmoe" else 1)
        self.client_n = [len(p) for p in prep.parts]
        self.fleet: FleetCosts | None = None
        if cfg.fleet:
            costs = self.run_dir / COSTS
            if not costs.is_file():
                raise RunError(f"{run_dir}: the run has a fleet but no {COSTS} (its measured per-round costs); "
                               "open it with `hmoe train --resume`, which measures them")
            self.fleet = FleetCosts(Fleet.from_dict(cfg.fleet, f"{run_dir}/config.json fleet"), cfg.clients,
                                    cfg.seed, CostBook.load(costs), cfg.local)
        self.weights: dict[str, Weights] = {}
        self.state = {"completed_rounds": 0, "versions": {}, "log": []}
        self._load_or_init()

    # ---------------------------------------------------------------- files
    def checkpoint_path(self, key: str) -> Path:
        stem = self.tasks[key].file_stem
        return self.run_dir / ("flat.safetensors" if key == "flat" else f"experts/{stem}.safetensors")

    def _load_or_init(self) -> None:
        if self.state_path.exists():
            self.state = json.loads(self.state_path.read_text())
        for key, task in self.tasks.items():
            path = self.checkpoint_path(key)
            pending = path.with_name(path.name + ".pending")
            if pending.exists():
                meta = json.loads(read_metadata(pending).get("meta", "{}"))
                if meta.get("round") == self.state["versions"].get(key):
                    os.replace(pending, path)  # committed round: roll forward
                else:
                    pending.unlink()           # round never committed: roll back
            if path.exists():
                self.weights[key], _, _ = load_checkpoint(path)
            else:
                torch.manual_seed(stable_seed(self.cfg.seed, "init", key))
                self.weights[key] = to_numpy(build_net(task.net))
                save_checkpoint(path, self.weights[key], task.net, {"node": key, "round": None})
        if "strategy" in self.state:
            self.strategy.restore(self.state["strategy"])
        else:   # a new run (or one saved before the strategy state was): validate every expert once
            for key in self.tasks:
                self._update_val_error(key)
            self.state["strategy"] = self.strategy.state()
            write_text_atomic(self.state_path, json.dumps(self.state, indent=1) + "\n")

    def _commit(self, rnd: int, updated: dict[str, Weights], entry: dict) -> None:
        """Write the round's new weights as pending files, commit the state, then rename."""
        pendings = {}
        for key, new in updated.items():
            path = self.checkpoint_path(key)
            pendings[key] = path.with_name(path.name + ".pending")
            save_checkpoint(pendings[key], new, self.tasks[key].net, {"node": key, "round": rnd})
            self.state["versions"][key] = rnd
        self.state["completed_rounds"] = rnd + 1
        self.state["log"].append(entry)
        self.state["strategy"] = self.strategy.state()
        write_text_atomic(self.state_path, json.dumps(self.state, indent=1) + "\n")
        for key, pending in pendings.items():
            os.replace(pending, self.checkpoint_path(key))

    # --------------------------------------------------------------- models
    def net(self, key: str) -> ConvNet:
        net = build_net(self.tasks[key].net).to(self.cfg.device)
        load_numpy(net, self.weights[key])
        return net

    def expert_nets(self) -> dict[int, ConvNet]:
        return {t.node: self.net(k) for k, t in self.tasks.items()}

    def _update_val_error(self, key: str) -> None:
        d, idx = self.prep.data, self.prep.val_idx
        if self.kind != "hmoe" or not len(idx):
            return
        self.strategy.record_validation(key, validation_error(self.tree, self.tasks[key], self.weights[key],
                                                              d.train_x[idx], d.train_y[idx], self.prep.normalize,
                                                              self.cfg.device))

    def evaluate(self, x: np.ndarray, y: np.ndarray, decoder: str | None = None) -> dict[str, float]:
        if self.kind == "hmoe":
            return evaluate_hmoe(self.tree, self.expert_nets(), x, y, self.prep.normalize,
                                 decoder or "greedy", self.cfg.device)
        return evaluate_flat(self.tree, self.net("flat"), x, y, self.prep.normalize, decoder or "leaf",
                             self.cfg.device)

    def use_counts(self, client: int, leaf_counts: np.ndarray) -> None:
        """Take a client's samples per leaf as its transport reports them (a Flower node or a
        device), instead of the simulation's own partition."""
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

    # ---------------------------------------------------------------- rounds
    def plan_round(self, rnd: int, reachable: list[int] | None = None) -> RoundPlan:
        """Who trains what in round ``rnd`` and with which hyper-parameters and seed: the
        strategy assigns tasks to the reachable clients (the simulated transport's sample,
        less drop-outs, unless a transport says who it reached) that can afford them."""
        s = self.strategy
        dropped = []
        if reachable is None:
            reachable = []
            for client in self.clients.sample(rnd):
                (dropped if self.clients.drops_out(rnd, client) else reachable).append(client)
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
                plan.no_cohort.append(c)   # could afford a task, but too few clients chose it
            elif self.task_n[c][first] if s.assignment == "one" else any(self.task_n[c].values()):
                plan.unfit.append(c)
            else:
                plan.skipped.append(c)
        return plan

    def close_round(self, plan: RoundPlan, results: dict[int, tuple[Weights, dict]], left_out: dict | None = None) -> dict:
        """Aggregate each task over its clients' results (``results[client]``: new weights and
        metrics with num_samples, train_loss, train_seconds; in client order), log, commit."""
        s, d, rnd = self.strategy, self.prep.data, plan.rnd
        by_task: dict[str, list] = {}
        diverged, losses = [], []
        for client in sorted(results):
            new, metrics = results[client]
            if not np.isfinite(metrics["train_loss"]) or not all(np.isfinite(v).all() for v in new.values()):
                diverged.append(client)   # left out, as the coordinator refuses such an update (422)
                continue
            by_task.setdefault(plan.assigned[client], []).append((client, new, metrics["num_samples"]))
            losses.append(metrics["train_loss"])
        updated = {key: s.aggregate([(w, n) for _, w, n in res], self.weights[key]) for key, res in by_task.items()}
        entry = {"round": rnd, "task": plan.first, "clients": sum(map(len, by_task.values())),
                 "samples": sum(n for res in by_task.values() for _, _, n in res),
                 "skipped": plan.skipped, "dropped": plan.dropped, "diverged": diverged,
                 "client_seconds": float(sum(m["train_seconds"] for _, m in results.values())),
                 "client_gmacs": self.client_gmacs(plan, results),
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
        for key, new in updated.items():
            self.weights[key] = new
            self._update_val_error(key)
        idx = self.prep.val_idx
        total = self.cfg.rounds(self.kind)
        every = self.cfg.eval_every or max(1, total // 20)
        if len(idx) and ((rnd + 1) % every == 0 or rnd + 1 >= total):
            entry["val_info_f1"] = self.evaluate(d.train_x[idx], d.train_y[idx])["info_f1"]
        self._commit(rnd, updated, entry)
        return entry

    def client_gmacs(self, plan: RoundPlan, results: dict[int, tuple[Weights, dict]]) -> float:
        """The round's client compute, counted (docs/COSTS.md): samples x epochs x 3 x forward MACs."""
        return float(sum(m["num_samples"] * plan.configs[c].epochs * 3 * self.tasks[plan.assigned[c]].net.forward_macs()
                         for c, (_, m) in results.items()) / 1e9)

    def step(self, rnd: int) -> dict:
        """Run round ``rnd`` in process: plan, train every assigned client, close."""
        d, s = self.prep.data, self.strategy
        plan = self.plan_round(rnd)
        results = {}
        for client, key in plan.assigned.items():
            idx, target = s.client_data(key, d.train_y, self.prep.parts[client])
            results[client] = local_update(self.tasks[key].net, self.weights[key], d.train_x[idx], target,
                                           plan.configs[client], self.prep.normalize, plan.seeds[client],
                                           self.cfg.device)
        return self.close_round(plan, results)

    def run(self, rounds: int | None = None, progress: bool = True) -> list[dict]:
        from tqdm.auto import tqdm
        total = self.cfg.rounds(self.kind) if rounds is None else rounds
        start = self.state["completed_rounds"]
        bar = tqdm(range(start, total), desc=f"{self.kind} rounds", initial=start, total=total,
                   disable=not progress, dynamic_ncols=True)
        last = next((e["val_info_f1"] for e in reversed(self.state["log"]) if "val_info_f1" in e), None)
        for rnd in bar:
            entry = self.step(rnd)
            last = entry.get("val_info_f1", last)
            bar.set_postfix(task=entry["task"], clients=entry["clients"],
                            val_f1="-" if last is None else f"{last:.3f}")
        diverged = sum(len(e.get("diverged", [])) for e in self.state["log"][start:])
        if diverged:
            print(f"warning: {self.kind}: {diverged} client update(s) diverged (non-finite loss or weights) and were left "
                  f"out of their rounds; lower --lr (now {self.cfg.local.lr:g})", file=sys.stderr)
        return self.state["log"]


def data_used(fed: Federation) -> float:
    """Share of the clients' training samples that some completed round trained on."""
    used = [np.zeros(len(p), dtype=bool) for p in fed.prep.parts]
    labels = fed.prep.data.train_y
    for e in fed.state["log"]:
        assigned = e.get("assigned") or {c: e["task"] for c in e.get("client_config", {})}
        for c, key in assigned.items():
            c = int(c)
            if c in e.get("diverged", []):
                continue
            used[c] |= fed.tasks[key].select(fed.tree, labels[fed.prep.parts[c]])[0]
    total = sum(len(p) for p in fed.prep.parts)
    return float(sum(u.sum() for u in used) / total) if total else 0.0


def fleet_report(feds: dict[str, Federation]) -> dict | None:
    """The fleet, each client's tier, the measured costs, what they predict per tier and task
    (for the tier's median client, one epoch) and what the rounds did; None without a fleet."""
    some = next(iter(feds.values()))
    fc = some.fleet
    if fc is None:
        return None
    tiers = fc.fleet.tiers
    out: dict = {"fleet": fc.fleet.to_dict(), "client_tiers": [tiers[t].name for t in fc.client_tier],
                 "costs": fc.book.to_dict(), "predictions": {}, "families": {}}
    for kind, fed in feds.items():
        preds: dict = {}
        for i, tier in enumerate(tiers):
            members = [c for c, t in enumerate(fc.client_tier) if t == i]
            if members:
                preds[tier.name] = {key: {"samples": n, **fc.predict(members[0], task.net, n).to_dict()}
                                    for key, task in fed.tasks.items()
                                    for n in [int(np.median([fed.task_n[c][key] for c in members]))]}
        log = fed.state["log"]
        trained = [int(c) for e in log for c in e.get("assigned", {}) if int(c) not in e.get("diverged", [])]
        out["predictions"][kind] = preds
        out["families"][kind] = {
            "data_used": data_used(fed),
            "unfit_client_rounds": int(sum(len(e.get("unfit", [])) for e in log)),
            "no_cohort_client_rounds": int(sum(len(e.get("no_cohort", [])) for e in log)),
            "trained_client_rounds": len(trained),
            "device_seconds": float(sum(e.get("device_seconds", 0.0) for e in log)),
            "trained_client_rounds_per_tier": {t.name: sum(fc.client_tier[c] == i for c in trained)
                                               for i, t in enumerate(tiers)},
        }
    return out
