"""Device tiers of a simulated fleet, and whether a client can afford a task's round
(numpy only: the strategy, the simulation and the reports use it without torch).

A fleet file (JSON) gives tiers and a round deadline::

    {"deadline_s": 6.0,
     "tiers": [{"name": "strong", "share": 0.5, "memory_mb": 64, "speed": 1.0},
               {"name": "weak",   "share": 0.5, "memory_mb": 4,  "speed": 0.25}]}

``memory_mb`` is the peak memory growth a training round may take on that device (as the
per-round cost measures it, docs/COSTS.md); ``speed`` is its compute speed relative to the
machine the costs were measured on; ``deadline_s`` (0: none) the time a round may take.

A task's round on a client is predicted from the task's measured cost (``CostBook``):
time per sample (from the cost worker, per sample and epoch) x the client's samples under
the task x epochs / speed; memory at full batch, or, where that does not fit, at
micro-batch 1, the smallest the memory-capped trainer uses (then the time at micro-batch 1).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from hierarchy.errors import HmoeError
from trainer.device.config import LocalConfig, NetConfig

COSTS = "costs.json"   # a run's measured per-round costs, beside its config


class FleetError(HmoeError, ValueError):
    """A fleet file, or the fleet it describes, cannot drive a run."""


TIER_KEYS = {"name", "share", "memory_mb", "speed"}
FLEET_KEYS = {"tiers", "deadline_s"}


@dataclass(frozen=True)
class Tier:
    name: str
    share: float          # share of the clients in this tier
    memory_mb: float      # peak memory growth a training round may take
    speed: float = 1.0    # compute speed relative to the machine that measured the costs


@dataclass(frozen=True)
class Fleet:
    tiers: tuple[Tier, ...]
    deadline_s: float = 0.0   # a round must finish within this many seconds (0: no deadline)

    @classmethod
    def from_dict(cls, d: dict, source: str = "fleet") -> "Fleet":
        if not isinstance(d, dict):
            raise FleetError(f"{source}: expected a JSON object with 'tiers' and optionally 'deadline_s'")
        unknown = sorted(set(d) - FLEET_KEYS)
        if unknown:
            raise FleetError(f"{source}: unknown keys {unknown}; expected {sorted(FLEET_KEYS)}")
        tiers_in = d.get("tiers")
        if not isinstance(tiers_in, list) or not tiers_in:
            raise FleetError(f"{source}: 'tiers' must be a non-empty list of tiers")
        tiers = []
        for i, t in enumerate(tiers_in):
            where = f"{source}: tier {i}"
            if not isinstance(t, dict):
                raise FleetError(f"{where}: expected an object with {sorted(TIER_KEYS)}")
            unknown = sorted(set(t) - TIER_KEYS)
            if unknown:
                raise FleetError(f"{where}: unknown keys {unknown}; expected {sorted(TIER_KEYS)}")
            missing = sorted({"name", "share", "memory_mb"} - set(t))
            if missing:
                raise FleetError(f"{where}: missing {missing}")
            name = t["name"]
            if not isinstance(name, str) or not name:
                raise FleetError(f"{where}: 'name' must be a non-empty string")
            nums = {}
            for key in ("share", "memory_mb", "speed"):
                v = t.get(key, 1.0)
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                    raise FleetError(f"{source}: tier {name!r}: {key} must be a finite number; got {v!r}")
                nums[key] = float(v)
            if not 0 <= nums["share"] <= 1:
                raise FleetError(f"{source}: tier {name!r}: share {nums['share']:g} is not in [0, 1]")
            if nums["memory_mb"] <= 0 or nums["speed"] <= 0:
                raise FleetError(f"{source}: tier {name!r}: memory_mb and speed must be positive")
            tiers.append(Tier(name, nums["share"], nums["memory_mb"], nums["speed"]))
        names = [t.name for t in tiers]
        if len(set(names)) != len(names):
            raise FleetError(f"{source}: tier names repeat: {names}")
        total = sum(t.share for t in tiers)
        if abs(total - 1.0) > 1e-6:
            raise FleetError(f"{source}: tier shares sum to {total:g}; they must sum to 1 "
                             f"({', '.join(f'{t.name}={t.share:g}' for t in tiers)})")
        deadline = d.get("deadline_s", 0.0)
        if isinstance(deadline, bool) or not isinstance(deadline, (int, float)) or not deadline >= 0 \
                or not math.isfinite(deadline):
            raise FleetError(f"{source}: deadline_s must be a non-negative number of seconds (0: none); "
                             f"got {deadline!r}")
        return cls(tuple(tiers), float(deadline))

    @classmethod
    def load(cls, path: str | Path) -> "Fleet":
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise FleetError(f"{path}: no such fleet file") from None
        except json.JSONDecodeError as exc:
            raise FleetError(f"{path}: not valid JSON ({exc})") from None
        return cls.from_dict(d, str(path))

    def to_dict(self) -> dict:
        return {"deadline_s": self.deadline_s, "tiers": [asdict(t) for t in self.tiers]}

    def assign(self, num_clients: int, seed: int) -> list[int]:
        """Each client's tier index: exact counts by share (largest remainder), placed by a
        seeded permutation that depends on nothing but the seed, not on the clients' data."""
        want = [t.share * num_clients for t in self.tiers]
        counts = [int(math.floor(w)) for w in want]
        for i in sorted(range(len(want)), key=lambda i: (counts[i] - want[i], i))[:num_clients - sum(counts)]:
            counts[i] += 1
        tiers = np.repeat(np.arange(len(self.tiers)), counts)
        return [int(t) for t in np.random.default_rng([seed, 13]).permutation(tiers)]


def _cost_key(net: NetConfig, local: LocalConfig) -> str:
    """What a measured cost depends on: the network and the optimiser's state and batch."""
    return json.dumps({"net": json.loads(net.to_json()), "batch_size": local.batch_size,
                       "optimizer": local.optimizer, "momentum": bool(local.momentum)}, sort_keys=True)


@dataclass(frozen=True)
class Prediction:
    fits: bool
    seconds: float        # predicted wall time of the round on the device
    mem_mb: float         # predicted peak memory growth
    micro_batch: int      # 0: the full batch
    reason: str = ""      # why it does not fit

    def to_dict(self) -> dict:
        return asdict(self)


class CostBook:
    """Measured per-round costs of networks, keyed by what they depend on; saved with a run
    (``costs.json``) so a resumed run, or another run given the same file, predicts the same."""

    def __init__(self, entries: dict[str, dict] | None = None, meta: dict | None = None) -> None:
        self.entries, self.meta = dict(entries or {}), dict(meta or {})

    @classmethod
    def load_dict(cls, d: dict) -> "CostBook":
        return cls({e["key"]: e for e in d["entries"]}, d.get("meta"))

    @classmethod
    def load(cls, path: str | Path) -> "CostBook":
        path = Path(path)
        try:
            return cls.load_dict(json.loads(path.read_text()))
        except FileNotFoundError:
            raise FleetError(f"{path}: no such cost file") from None
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise FleetError(f"{path}: not a cost file written by hmoe ({exc})") from None

    def to_dict(self) -> dict:
        return {"meta": self.meta, "entries": list(self.entries.values())}

    def get(self, net: NetConfig, local: LocalConfig) -> dict | None:
        return self.entries.get(_cost_key(net, local))

    def add(self, net: NetConfig, local: LocalConfig, figures: dict) -> None:
        self.entries[_cost_key(net, local)] = {"key": _cost_key(net, local), **figures}

    def predict(self, net: NetConfig, local: LocalConfig, samples: int, tier: Tier, deadline_s: float) -> Prediction:
        """Whether a device of ``tier`` can train ``net`` on ``samples`` samples for
        ``local.epochs`` epochs within the memory it has and the deadline."""
        c = self.get(net, local)
        if c is None:
            raise FleetError(f"no measured cost for network {net.to_json()}; measure it first")
        for mem, ms, mb in ((c["mem_mb"], c["ms_per_sample"], 0), (c["mem_mb_mb1"], c["ms_per_sample_mb1"], 1)):
            if mem <= tier.memory_mb:
                seconds = ms * samples * local.epochs / 1000.0 / tier.speed
                late = deadline_s > 0 and seconds > deadline_s
                return Prediction(not late, seconds, mem, mb, f"{seconds:.2f} s > deadline {deadline_s:g} s"
                                  if late else "")
        return Prediction(False, math.inf, c["mem_mb_mb1"], 1,
                          f"{c['mem_mb_mb1']:.1f} MB at micro-batch 1 > {tier.memory_mb:g} MB")

    def max_epochs(self, net: NetConfig, local: LocalConfig, samples: int, tier: Tier, deadline_s: float) -> int:
        """The most epochs of ``samples`` samples that fit the deadline (at least 1)."""
        one = self.predict(net, LocalConfig(**{**local.to_dict(), "epochs": 1}), samples, tier, 0.0)
        if deadline_s <= 0 or one.seconds <= 0:
            return local.epochs
        return max(1, int(deadline_s // one.seconds))


class FleetCosts:
    """A fleet with its clients placed in tiers and its measured costs: what each client can
    afford. ``local`` is the run's base local update (one epoch at least is asked of anyone)."""

    def __init__(self, fleet: Fleet, num_clients: int, seed: int, book: CostBook, local: LocalConfig) -> None:
        self.fleet, self.book, self.local = fleet, book, local
        self.client_tier = fleet.assign(num_clients, seed)

    def tier(self, client: int) -> Tier:
        return self.fleet.tiers[self.client_tier[client]]

    def predict(self, client: int, net: NetConfig, samples: int, local: LocalConfig | None = None) -> Prediction:
        return self.book.predict(net, local or self.local, samples, self.tier(client), self.fleet.deadline_s)

    def can_take(self, client: int, net: NetConfig, samples: int) -> bool:
        """Whether the client holds samples for the task and can afford the base local update."""
        return samples > 0 and self.predict(client, net, samples).fits

    def max_epochs(self, client: int, net: NetConfig, samples: int) -> int:
        """The most epochs the round deadline allows the client (0: no deadline, no limit)."""
        if not self.fleet.deadline_s:
            return 0
        return self.book.max_epochs(net, self.local, samples, self.tier(client), self.fleet.deadline_s)

    def check(self, tasks: list[tuple[str, NetConfig, list[int]]], idle_tiers: bool = False) -> list[str]:
        """Refuse a fleet that cannot train; ``tasks``: (name, network, samples per client) of
        every task of the run. A tier with clients in which no task fits its memory is an
        error, or with ``idle_tiers`` (the flat baseline, whose weak devices never train) a
        warning returned; a deadline that no client meets with any task is an error."""
        warnings = []
        for i, tier in enumerate(self.fleet.tiers):
            if i not in self.client_tier:
                continue
            if not any(self.book.predict(net, self.local, 1, tier, 0.0).fits for _, net, _ in tasks):
                name, net, _ = min(tasks, key=lambda t: self.book.get(t[1], self.local)["mem_mb_mb1"])
                need = self.book.get(net, self.local)["mem_mb_mb1"]
                msg = (f"tier {tier.name!r} ({tier.memory_mb:g} MB) fits no task of this run: the smallest, "
                       f"{name!r}, needs {need:.2f} MB at micro-batch 1")
                if not idle_tiers:
                    raise FleetError(f"{msg}; raise the tier's memory_mb or narrow the networks (--expert-widths, "
                                     "--flat-width)")
                warnings.append(f"{msg}: its {self.client_tier.count(i)} clients will never train")
        pairs = [(c, net, n[c]) for _, net, n in tasks for c in range(len(self.client_tier)) if n[c]]
        if self.fleet.deadline_s and pairs and not any(self.can_take(c, net, n) for c, net, n in pairs):
            fastest = min(self.predict(c, net, n).seconds for c, net, n in pairs)
            raise FleetError(f"no client can meet the round deadline of {self.fleet.deadline_s:g} s with any task: "
                             f"the fastest predicted round takes {fastest:.2f} s; raise deadline_s")
        return warnings


def run_fleet(run_dir: str | Path, fleet: dict | None, clients: int, seed: int, local: LocalConfig) -> FleetCosts | None:
    """A run's fleet with its measured per-round costs (``costs.json`` beside its config);
    None for a run without a fleet."""
    if not fleet:
        return None
    costs = Path(run_dir) / COSTS
    if not costs.is_file():
        raise FleetError(f"{run_dir}: the run has a fleet but no {COSTS} (its measured per-round costs); "
                         "open it with `hmoe train --resume`, which measures them")
    return FleetCosts(Fleet.from_dict(fleet, f"{run_dir}/config.json fleet"), clients, seed, CostBook.load(costs), local)
