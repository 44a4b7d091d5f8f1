"""The verbs of a federated round, shared by the simulation and the coordinator:
choose what to train, whom to ask, what each client trains on, and aggregate."""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass

import numpy as np

from hierarchy import Hierarchy
from trainer.fedavg import Weights, fedavg
from trainer.schedules import ScheduleContext, get_schedule
from trainer.nets import NetConfig

FLAT = "flat"


@dataclass(frozen=True)
class Task:
    """A trainable network of the federation: one expert, or the flat model."""

    key: str          # expert node name, or "flat"
    node: int         # expert node index, -1 for the flat model
    net: NetConfig

    def select(self, tree: Hierarchy, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Mask of the samples this task trains on and their targets (LCPN for experts)."""
        labels = np.asarray(labels, dtype=np.int64)
        if self.node < 0:
            return np.ones(len(labels), dtype=bool), labels
        return tree.lcpn(self.node, labels)

    @property
    def file_stem(self) -> str:
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", self.key).strip("._") or "node"
        return FLAT if self.node < 0 else f"{self.node:04d}-{slug}"


def make_tasks(tree: Hierarchy, kind: str, in_shape: tuple[int, int, int], width: int,
               depth: int = 0, hidden: int = 0) -> dict[str, Task]:
    """``kind`` hmoe: one task per expert node; flat: a single task over all leaves."""
    if kind == "flat":
        return {FLAT: Task(FLAT, -1, NetConfig(in_shape, tree.num_leaves, width, depth, hidden).resolved())}
    if kind != "hmoe":
        raise ValueError(f"unknown model kind {kind!r}; expected hmoe or flat")
    return {tree.names[e]: Task(tree.names[e], int(e),
                                NetConfig(in_shape, int(tree.num_children[e]), width, depth, hidden).resolved())
            for e in tree.experts}


def stable_seed(*parts: object) -> int:
    """A seed that depends only on its parts (not on Python's hash randomisation)."""
    return zlib.crc32("/".join(map(str, parts)).encode()) & 0x7FFFFFFF


class Strategy:
    """Which task a round trains, which clients it asks, and how results combine.
    Every random choice is derived from (seed, round), so a resumed run replays exactly."""

    def __init__(self, tree: Hierarchy, tasks: dict[str, Task], schedule: str, seed: int,
                 num_clients: int, clients_per_round: int, dropout: float = 0.0,
                 shares: dict[str, float] | None = None) -> None:
        if not 1 <= clients_per_round <= num_clients:
            raise ValueError(f"clients per round must be in [1, {num_clients}]; got {clients_per_round}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1); got {dropout}")
        self.tree, self.tasks, self.seed = tree, tasks, seed
        self.num_clients, self.clients_per_round, self.dropout = num_clients, clients_per_round, dropout
        self.schedule = get_schedule(schedule)
        self.context = ScheduleContext(list(tasks), shares or {k: 1.0 for k in tasks})

    def choose_task(self, rnd: int) -> str:
        return self.schedule(rnd, self.context)

    def sample_clients(self, rnd: int) -> list[int]:
        rng = np.random.default_rng([self.seed, rnd, 7])
        return sorted(int(c) for c in rng.choice(self.num_clients, self.clients_per_round, replace=False))

    def drops_out(self, rnd: int, client: int) -> bool:
        return bool(np.random.default_rng([self.seed, rnd, client, 11]).random() < self.dropout)

    def client_seed(self, rnd: int, client: int) -> int:
        return stable_seed(self.seed, rnd, client)

    def client_data(self, key: str, labels: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The indices (into the data set) and targets a client with samples ``idx`` trains on."""
        mask, target = self.tasks[key].select(self.tree, labels[idx])
        return idx[mask], target

    @staticmethod
    def aggregate(results: list[tuple[Weights, int]]) -> Weights:
        return fedavg(results)
