"""The in-process federated loop, written once for HMoE and flat, with a resumable run directory.

Crash safety: a round's new weights go to ``<file>.pending``; the round is committed
when ``state-<kind>.json`` (atomic) records it; then the pending file is renamed into
place. On resume a pending file of a committed round is rolled forward, any other
is deleted, so a run killed at any moment continues from its last completed round.
"""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from hierarchy import Hierarchy
from hierarchy.tree import write_text_atomic
from trainer.checkpoint import load_checkpoint, read_metadata, save_checkpoint
from trainer.client import LocalConfig, Normalizer, load_numpy, local_update, to_numpy
from trainer.datasets import Dataset, load_dataset
from trainer.evaluate import evaluate_flat, evaluate_hmoe, expert_accuracy
from trainer.fedavg import Weights
from trainer.nets import ConvNet, build_net
from trainer.partition import partition
from trainer.strategy import Strategy, Task, make_tasks, stable_seed


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
    flat_width: int = 32
    depth: int = 0
    local: LocalConfig = field(default_factory=LocalConfig)
    balanced_epochs: bool = True  # HMoE: a client runs floor(its samples / its samples under the
                                  # expert) epochs, so no expert's round costs more than the root's
    lr_decay: str = "cosine"      # cosine: client lr falls from lr to lr/10 over the run; none: constant
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

    def local_for_round(self, kind: str, rnd: int) -> LocalConfig:
        """The client hyper-parameters of round ``rnd`` (learning-rate decay applied)."""
        if self.lr_decay == "none":
            return self.local
        if self.lr_decay != "cosine":
            raise ValueError(f"unknown lr decay {self.lr_decay!r}; expected cosine or none")
        frac = rnd / max(1, self.rounds(kind) - 1)
        return replace(self.local, lr=self.local.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac))))

    def width(self, kind: str) -> int:
        return self.expert_width if kind == "hmoe" else self.flat_width


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


def task_shares(tree: Hierarchy, tasks: dict[str, Task], labels: np.ndarray) -> dict[str, float]:
    return {k: float(t.select(tree, labels)[0].mean()) for k, t in tasks.items()}


class Federation:
    """One model family (``hmoe`` or ``flat``) of a run directory, round by round."""

    def __init__(self, run_dir: str | os.PathLike, kind: str, cfg: RunConfig, prep: Prepared) -> None:
        self.run_dir, self.kind, self.cfg, self.prep = Path(run_dir), kind, cfg, prep
        self.tree = prep.data.tree
        self.tasks = make_tasks(self.tree, kind, prep.data.shape, cfg.width(kind), cfg.depth)
        shares = task_shares(self.tree, self.tasks, prep.data.train_y)
        self.strategy = Strategy(self.tree, self.tasks, cfg.schedule if kind == "hmoe" else "round-robin",
                                 cfg.seed, cfg.clients, cfg.clients_per_round, cfg.dropout, shares)
        self.state_path = self.run_dir / f"state-{kind}.json"
        self.weights: dict[str, Weights] = {}
        self.state = {"completed_rounds": 0, "versions": {}, "log": [], "val_error": {}}
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
        self.strategy.context.val_error.update(self.state["val_error"])
        if not self.state["val_error"]:
            for key in self.tasks:
                self._update_val_error(key)

    def _commit(self, rnd: int, key: str, new: Weights | None, entry: dict) -> None:
        path = self.checkpoint_path(key)
        pending = path.with_name(path.name + ".pending")
        if new is not None:
            save_checkpoint(pending, new, self.tasks[key].net, {"node": key, "round": rnd})
            self.state["versions"][key] = rnd
        self.state["completed_rounds"] = rnd + 1
        self.state["log"].append(entry)
        self.state["val_error"] = dict(self.strategy.context.val_error)
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
        acc, n = expert_accuracy(self.tree, self.tasks[key].node, self.net(key), d.train_x[idx], d.train_y[idx],
                                 self.prep.normalize, self.cfg.device)
        self.strategy.context.val_error[key] = 1.0 - acc if n else 0.0

    def evaluate(self, x: np.ndarray, y: np.ndarray, decoder: str | None = None) -> dict[str, float]:
        if self.kind == "hmoe":
            return evaluate_hmoe(self.tree, self.expert_nets(), x, y, self.prep.normalize,
                                 decoder or "greedy", self.cfg.device)
        return evaluate_flat(self.tree, self.net("flat"), x, y, self.prep.normalize, decoder or "leaf",
                             self.cfg.device)

    # ---------------------------------------------------------------- rounds
    def local_config(self, key: str, rnd: int, client_samples: int = 0, task_samples: int = 0) -> LocalConfig:
        """Client hyper-parameters for training ``key`` in round ``rnd`` on a client holding
        ``client_samples`` samples, ``task_samples`` of them under the task. With balanced
        epochs an expert runs floor(client_samples / task_samples) epochs, so no expert's
        round costs that client more than the root expert's round."""
        local = self.cfg.local_for_round(self.kind, rnd)
        if self.kind == "hmoe" and self.cfg.balanced_epochs and task_samples > 0:
            local = replace(local, epochs=local.epochs * max(1, client_samples // task_samples))
        return local

    def step(self, rnd: int) -> dict:
        """Run round ``rnd``: choose the task, train sampled clients, aggregate, commit."""
        d, s = self.prep.data, self.strategy
        key = s.choose_task(rnd)
        task = self.tasks[key]
        results, skipped, dropped, diverged, seconds, losses = [], [], [], [], [], []
        for client in s.sample_clients(rnd):
            if s.drops_out(rnd, client):
                dropped.append(client)
                continue
            idx, target = s.client_data(key, d.train_y, self.prep.parts[client])
            if not len(idx):
                skipped.append(client)
                continue
            local = self.local_config(key, rnd, len(self.prep.parts[client]), len(idx))
            new, metrics = local_update(task.net, self.weights[key], d.train_x[idx], target, local,
                                        self.prep.normalize, s.client_seed(rnd, client), self.cfg.device)
            seconds.append(metrics["train_seconds"])
            if not np.isfinite(metrics["train_loss"]) or not all(np.isfinite(v).all() for v in new.values()):
                diverged.append(client)   # left out, as the coordinator refuses such an update (422)
                continue
            results.append((new, metrics["num_samples"]))
            losses.append(metrics["train_loss"])
        new = s.aggregate(results) if results else None
        entry = {"round": rnd, "task": key, "clients": len(results), "samples": sum(n for _, n in results),
                 "skipped": skipped, "dropped": dropped, "diverged": diverged,
                 "client_seconds": float(np.sum(seconds)),
                 "lr": self.cfg.local_for_round(self.kind, rnd).lr,
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


def load_run_config(run_dir: Path) -> RunConfig:
    path = run_dir / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir}: not a run directory (no config.json); train one with `hmoe train`")
    return RunConfig.from_dict(json.loads(path.read_text()))


def start_run(run_dir: Path, cfg: RunConfig, resume: bool) -> RunConfig:
    """Create a run directory, or reopen one with ``resume`` (its saved config wins,
    except the round counts, which may be raised to continue training)."""
    path = run_dir / "config.json"
    if path.exists():
        if not resume:
            raise FileExistsError(f"{run_dir} already holds a run; pass --resume to continue it "
                                  "or choose another --out")
        saved = load_run_config(run_dir)
        cfg = RunConfig.from_dict({**saved.to_dict(), "hmoe_rounds": max(saved.hmoe_rounds, cfg.hmoe_rounds),
                                   "flat_rounds": max(saved.flat_rounds, cfg.flat_rounds),
                                   "device": cfg.device})
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(cfg.to_dict(), indent=1) + "\n")
    return cfg
