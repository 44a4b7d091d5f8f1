"""A run's data on the server: the data set split into validation and client partitions, and
the run directory opened (config, hierarchy, input spec, a fleet's measured costs)."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from hierarchy import Hierarchy
from hierarchy.errors import UsageError
from hierarchy.tree import write_text_atomic
from trainer.datasets import Dataset, load_dataset
from trainer.device.client import Normalizer
from trainer.partition import partition
from trainer.protocol.fleet import COSTS, CostBook, Fleet, FleetCosts
from trainer.protocol.run import RunConfig, merged_config, start_run, write_input_spec
from trainer.protocol.strategy import Task, stable_seed, usable_samples


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




def run_costs(run_dir: Path, tasks: list[Task], cfg: RunConfig, prep: Prepared,
              seed_book: CostBook | None = None) -> tuple[CostBook, bool]:
    """The run's measured per-round costs: those kept in ``costs.json`` from an earlier
    start of the run, else ``seed_book``'s where it has the network, else measured here
    (each network in fresh processes, on the first training samples under its task).
    Returns the book and whether it changed (the caller writes it)."""
    from trainer.device.cost import measure_profile
    from trainer.machine import machine_info
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


