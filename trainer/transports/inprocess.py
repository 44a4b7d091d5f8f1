"""The in-process transport: the round driver's plan carried out by calling the device core's
local update for every assigned client, with the run's own data split (the fast reference)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import torch

from trainer.device.client import load_numpy, local_update, to_numpy
from trainer.device.config import Weights
from trainer.device.nets import ConvNet, OnTrunk, build_net, build_trunk
from trainer.evaluate import evaluate_flat, evaluate_hmoe, fit_temperatures, validation_error
from trainer.prepare import Prepared, task_shares
from trainer.protocol.driver import ClientSampler, RoundDriver, RoundPlan, RunStore
from trainer.reference import reference_update
from trainer.protocol.fleet import run_fleet
from trainer.protocol.run import RunConfig
from trainer.protocol.strategy import stable_seed, task_priors, trunk_owner


class Federation:
    """One model family (``hmoe`` or ``flat``) of a run directory, round by round, in process.
    The round's decisions are the driver's (``self.driver``); this class trains and evaluates."""

    def __init__(self, run_dir: str | os.PathLike, kind: str, cfg: RunConfig, prep: Prepared) -> None:
        self.run_dir, self.kind, self.cfg, self.prep = Path(run_dir), kind, cfg, prep
        self.tree = prep.data.tree
        self.tasks = cfg.tasks(kind, self.tree, prep.data.shape)
        self.trunk_owner = trunk_owner(self.tasks)
        strategy = cfg.strategy(kind, self.tree, self.tasks, task_shares(self.tree, self.tasks, prep.data.train_y),
                                priors=task_priors(self.tree, self.tasks, prep.data.train_y))
        counts = {c: np.bincount(prep.data.train_y[p], minlength=self.tree.num_leaves) for c, p in enumerate(prep.parts)}
        self.driver = RoundDriver(RunStore(run_dir, kind, self.tasks), strategy, self.tree,
                                  ClientSampler(cfg.seed, cfg.clients, cfg.clients_per_round, cfg.dropout), counts,
                                  run_fleet(run_dir, cfg.fleet, cfg.clients, cfg.seed, cfg.local),
                                  self._validation_error if kind == "hmoe" else None, self._reference)
        self.driver.open(self._init)

    # ------------------------------------------------- the driver's state, by name
    strategy = property(lambda self: self.driver.strategy)
    clients = property(lambda self: self.driver.sampler)
    fleet = property(lambda self: self.driver.fleet)
    weights = property(lambda self: self.driver.weights)
    state = property(lambda self: self.driver.state)
    task_n = property(lambda self: self.driver.task_n)
    state_path = property(lambda self: self.driver.store.state_path)
    client_n = property(lambda self: self.driver.client_n)

    def checkpoint_path(self, key: str) -> Path:
        return self.driver.store.checkpoint_path(key)

    def use_counts(self, client: int, leaf_counts: np.ndarray) -> None:
        self.driver.use_counts(client, leaf_counts)

    def can_take(self, client: int, key: str) -> bool:
        return self.driver.can_take(client, key)

    def predict(self, client: int, key: str, local):
        return self.driver.predict(client, key, local)

    # --------------------------------------------------------------- models
    def _init(self, key: str) -> Weights:
        torch.manual_seed(stable_seed(self.cfg.seed, "init", key))
        return to_numpy(build_net(self.tasks[key].net))

    def net(self, key: str, weights: Weights | None = None) -> ConvNet | OnTrunk:
        """The network of ``key`` on images (on the shared trunk's current weights where it has one)."""
        cfg = self.tasks[key].net
        net = build_net(cfg)
        load_numpy(net, self.weights[key] if weights is None else weights)
        if cfg.trunk_blocks:
            net = OnTrunk(build_trunk(cfg, self.weights[self.trunk_owner]), net)
        return net.to(self.cfg.device)

    def trunk(self, key: str) -> Weights | None:
        """The trunk's weights an update of ``key`` runs on (None: an independent expert)."""
        return self.weights[self.trunk_owner] if self.tasks[key].net.trunk_blocks else None

    def expert_nets(self) -> dict[int, ConvNet]:
        return {t.node: self.net(k) for k, t in self.tasks.items()}

    def _validation_error(self, key: str, weights: Weights) -> float | None:
        d, idx = self.prep.data, self.prep.val_idx
        if not len(idx):
            return None
        return validation_error(self.tree, self.tasks[key], weights, d.train_x[idx], d.train_y[idx],
                                self.prep.normalize, self.cfg.device, trunk=self.trunk(key))

    def _reference(self, key: str, weights: Weights, config, seed: int, steps: int = 0) -> Weights | None:
        """FLTrust's reference update of ``key``: trained here on the validation split."""
        d, idx = self.prep.data, self.prep.val_idx
        if not len(idx):
            return None
        return reference_update(self.tasks[key], self.tree, weights, config, seed, d.train_x[idx], d.train_y[idx],
                                self.prep.normalize, self.cfg.device, trunk=self.trunk(key), steps=steps)

    def evaluate(self, x: np.ndarray, y: np.ndarray, decoder: str | None = None) -> dict[str, float]:
        """Scores on ``x``: HMoE decoded with ``decoder`` (greedy | beam:K | threshold:T | soft:K, the
        last a beam of K over probabilities calibrated by a temperature per expert, fitted on the
        validation split), flat with a leaf rule."""
        if self.kind == "hmoe":
            decoder, temperatures = decoder or "greedy", None
            if decoder.startswith("soft:"):
                d, idx = self.prep.data, self.prep.val_idx
                nets = self.expert_nets()
                temperatures = fit_temperatures(self.tree, nets, d.train_x[idx], d.train_y[idx],
                                                self.prep.normalize, self.cfg.device)
                decoder = "beam:" + decoder.split(":", 1)[1]
            return evaluate_hmoe(self.tree, self.expert_nets(), x, y, self.prep.normalize,
                                 decoder, self.cfg.device, temperatures)
        return evaluate_flat(self.tree, self.net("flat"), x, y, self.prep.normalize, decoder or "leaf",
                             self.cfg.device)

    # ---------------------------------------------------------------- rounds
    def plan_round(self, rnd: int) -> RoundPlan:
        return self.driver.plan(rnd)

    def close_round(self, plan: RoundPlan, results: dict[int, tuple[Weights, dict]],
                    left_out: dict | None = None) -> dict:
        """The driver's close, with the periodic validation F1 that only this transport computes."""
        d, idx, total = self.prep.data, self.prep.val_idx, self.cfg.rounds(self.kind)
        every = self.cfg.eval_every or max(1, total // 20)
        if len(idx) and ((plan.rnd + 1) % every == 0 or plan.rnd + 1 >= total):
            return self.driver.close(plan, results, left_out,
                                     lambda: {"val_info_f1": self.evaluate(d.train_x[idx], d.train_y[idx])["info_f1"]})
        return self.driver.close(plan, results, left_out)

    def train_client(self, plan: RoundPlan, client: int) -> tuple[Weights, dict]:
        """What a device does with its assignment: the device core's local update on its data."""
        key, d = plan.assigned[client], self.prep.data
        idx, target = self.strategy.client_data(key, d.train_y, self.prep.parts[client])
        return local_update(self.tasks[key].net, self.weights[key], d.train_x[idx], target, plan.configs[client],
                            self.prep.normalize, plan.seeds[client], self.cfg.device, trunk=self.trunk(key))

    def step(self, rnd: int) -> dict:
        """Run round ``rnd`` in process: plan, train every assigned client, close."""
        plan = self.plan_round(rnd)
        return self.close_round(plan, {c: self.train_client(plan, c) for c in plan.assigned})

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


def prepared_feds(run_dir: Path, cfg: RunConfig, prep: Prepared, kinds: list[str]) -> dict[str, Federation]:
    """The run's model families over one data split."""
    return {k: Federation(run_dir, k, cfg, prep) for k in kinds}
