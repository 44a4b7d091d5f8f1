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
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from hierarchy import Hierarchy
from hierarchy.errors import UsageError
from hierarchy.tree import write_text_atomic
from trainer.checkpoint import load_checkpoint, read_metadata, save_checkpoint
from trainer.client import Normalizer, load_numpy, local_update, to_numpy
from trainer.datasets import Dataset, load_dataset
from trainer.evaluate import evaluate_flat, evaluate_hmoe, validation_error
from trainer.fedavg import Weights
from trainer.nets import ConvNet, build_net
from trainer.partition import partition
from trainer.run import RunConfig, merged_config, start_run, write_input_spec
from trainer.strategy import Task, stable_seed


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
    data = limit(data or load_dataset(cfg.dataset, cfg.data_root), cfg.train_limit, cfg.test_limit, cfg.seed)
    rng = np.random.default_rng([cfg.seed, 3])
    order = rng.permutation(len(data.train_y))
    n_val = int(round(cfg.val_fraction * len(order)))
    val_idx, pool = np.sort(order[:n_val]), order[n_val:]
    parts = [np.sort(pool[p]) for p in partition(cfg.partition, data.train_y[pool], cfg.clients, cfg.seed, cfg.alpha)]
    return Prepared(data, val_idx, parts, Normalizer(data.mean, data.std))


def open_run(run_dir: Path, cfg: RunConfig, resume: bool, data: Dataset | None = None) -> tuple[RunConfig, Prepared]:
    """Create (or with ``resume`` reopen) a run directory and its data: the run records its
    hierarchy and input specification from the start, so nothing downstream loads the data
    set to learn them."""
    cfg = merged_config(run_dir, cfg, resume)
    prep = prepare(cfg, data)
    cfg.tasks("hmoe", prep.data.tree, prep.data.shape)   # a bad --expert-widths fails before anything is written
    cfg = start_run(run_dir, cfg, resume)
    prep.data.tree.to_json(Path(run_dir) / "hierarchy.json")
    write_input_spec(run_dir, prep.data.input_spec)
    return cfg, prep


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

    def _commit(self, rnd: int, key: str, new: Weights | None, entry: dict) -> None:
        path = self.checkpoint_path(key)
        pending = path.with_name(path.name + ".pending")
        if new is not None:
            save_checkpoint(pending, new, self.tasks[key].net, {"node": key, "round": rnd})
            self.state["versions"][key] = rnd
        self.state["completed_rounds"] = rnd + 1
        self.state["log"].append(entry)
        self.state["strategy"] = self.strategy.state()
        write_text_atomic(self.state_path, json.dumps(self.state, indent=1) + "\n")
        if new is not None:
            os.replace(pending, path)
            self.weights[key] = new

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

    # ---------------------------------------------------------------- rounds
    def step(self, rnd: int) -> dict:
        """Run round ``rnd``: choose the task, train sampled clients, aggregate, commit."""
        d, s = self.prep.data, self.strategy
        key = s.choose_task(rnd)
        task = self.tasks[key]
        results, skipped, dropped, diverged, seconds, losses, configs = [], [], [], [], [], [], {}
        for client in self.clients.sample(rnd):
            if self.clients.drops_out(rnd, client):
                dropped.append(client)
                continue
            idx, target = s.client_data(key, d.train_y, self.prep.parts[client])
            if not len(idx):
                skipped.append(client)
                continue
            local = s.client_config(key, rnd, len(self.prep.parts[client]), len(idx))
            configs[str(client)] = local.to_dict()
            new, metrics = local_update(task.net, self.weights[key], d.train_x[idx], target, local,
                                        self.prep.normalize, s.client_seed(rnd, client), self.cfg.device)
            seconds.append(metrics["train_seconds"])
            if not np.isfinite(metrics["train_loss"]) or not all(np.isfinite(v).all() for v in new.values()):
                diverged.append(client)   # left out, as the coordinator refuses such an update (422)
                continue
            results.append((new, metrics["num_samples"]))
            losses.append(metrics["train_loss"])
        new = s.aggregate(results, self.weights[key]) if results else None
        entry = {"round": rnd, "task": key, "clients": len(results), "samples": sum(n for _, n in results),
                 "skipped": skipped, "dropped": dropped, "diverged": diverged,
                 "client_seconds": float(np.sum(seconds)),
                 "lr": s.lr(rnd), "client_config": configs,
                 "train_loss": float(np.mean(losses)) if losses else None}
        if new is not None:
            self.weights[key] = new
            self._update_val_error(key)
        idx = self.prep.val_idx
        total = self.cfg.rounds(self.kind)
        every = self.cfg.eval_every or max(1, total // 20)
        if len(idx) and ((rnd + 1) % every == 0 or rnd + 1 >= total):
            entry["val_info_f1"] = self.evaluate(d.train_x[idx], d.train_y[idx])["info_f1"]
        self._commit(rnd, key, new, entry)
        return entry

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
