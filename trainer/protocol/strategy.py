"""The verbs of a federated round, shared by every transport: what to train, with which
hyper-parameters each client trains, how results combine (numpy only, no torch)."""

from __future__ import annotations

import math
import re
import zlib
from dataclasses import dataclass, replace

import numpy as np

from hierarchy import Hierarchy
from hierarchy.errors import HmoeError, UsageError
from trainer.device.config import LocalConfig, NetConfig
from trainer.protocol.aggregate import AGGREGATORS, CHANGE_WINDOW, SERVER_OPTIMIZERS, Weights, bound_results, \
    cap_samples, lower_median, server_step, trimmed_mean
from trainer.protocol.schedules import ScheduleContext, get_schedule, reads_validation

FLAT = "flat"
LR_DECAYS = ("cosine", "none")
ASSIGNMENTS = ("one", "resource-aware", "spread")



def balanced_epochs(client_samples: int, task_samples: int, batch_size: int) -> int:
    """Local epochs of an expert whose task holds ``task_samples`` of a client's
    ``client_samples``: as many passes as fit in the root expert's round (one pass over all
    ``client_samples``), counted both in samples and in optimizer steps, and at least one.

    Counting samples alone, floor(client / task), lets a client with a handful of samples
    under an expert run hundreds of one-batch epochs: per-step overhead then makes that
    round cost several times the root's (docs/COSTS.md, "Local epochs")."""
    if task_samples <= 0:
        return 1
    by_samples = client_samples // task_samples
    by_steps = math.ceil(client_samples / batch_size) // math.ceil(task_samples / batch_size)
    return max(1, min(by_samples, by_steps))

class StrategyError(HmoeError, ValueError):
    """A strategy's saved state does not fit the run it is asked to drive."""


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


def why_unusable(tree: Hierarchy, task: Task, leaf_counts: np.ndarray, min_children: int = 1) -> str | None:
    """Why a client's samples (``leaf_counts``) give ``task`` nothing to train on, or None."""
    mask, child = task.select(tree, np.arange(tree.num_leaves))
    held = np.asarray(leaf_counts, dtype=np.int64)[mask]
    if held.sum() == 0:
        return "no samples under the expert" if task.node >= 0 else "no samples"
    least = min(min_children, task.net.num_outputs)   # an expert of two children asks at most for both
    if task.node >= 0 and least > 1 and len(np.unique(child[held > 0])) < least:
        return f"samples under fewer than {least} of the expert's children (--min-children)"
    return None


def usable_samples(tree: Hierarchy, task: Task, leaf_counts: np.ndarray, min_children: int = 1) -> int:
    """How many of a client's samples (``leaf_counts``: per label) ``task`` trains on: those
    under it, or none when they fall under fewer than ``min_children`` of an expert's
    children (such a client's update can only teach the expert to answer one child)."""
    if why_unusable(tree, task, leaf_counts, min_children):
        return 0
    mask, _ = task.select(tree, np.arange(tree.num_leaves))
    return int(np.asarray(leaf_counts, dtype=np.int64)[mask].sum())


def task_priors(tree: Hierarchy, tasks: dict[str, Task], labels: np.ndarray | None = None) -> dict[str, list[float]]:
    """Each task's share of samples per output (child or leaf) over the whole training set
    ``labels``; without labels, as if every leaf held as many samples (the tree alone). The
    prior that --logit-adjust calibrates a client's logits to."""
    labels = np.arange(tree.num_leaves) if labels is None else np.asarray(labels, dtype=np.int64)
    out = {}
    for key, task in tasks.items():
        _, target = task.select(tree, labels)
        counts = np.bincount(target, minlength=task.net.num_outputs).astype(np.float64)
        out[key] = [round(float(c), 6) for c in counts / max(1.0, counts.sum())]
    return out


def make_tasks(tree: Hierarchy, kind: str, in_shape: tuple[int, int, int], width: int,
               depth: int = 0, hidden: int = 0, widths: dict[str, int] | None = None,
               trunk_blocks: int = 0) -> dict[str, Task]:
    """``kind`` hmoe: one task per expert node (of width ``widths[name]`` where given, else
    ``width``); flat: a single task over all leaves. With ``trunk_blocks`` K, the top expert
    (the first on every path) is a whole network whose first K conv blocks are the shared
    trunk, and every other expert runs on that trunk's output."""
    if kind == "flat":
        return {FLAT: Task(FLAT, -1, NetConfig(in_shape, tree.num_leaves, width, depth, hidden).resolved())}
    if kind != "hmoe":
        raise UsageError(f"unknown model kind {kind!r}; expected hmoe or flat")
    widths = widths or {}
    top = int(min(tree.experts)) if len(tree.experts) else -1
    top_width = widths.get(tree.names[top], width) if top >= 0 else width
    return {tree.names[e]: Task(tree.names[e], int(e), NetConfig(
        in_shape, int(tree.num_children[e]), widths.get(tree.names[e], width), depth, hidden,
        trunk_blocks if e != top else 0, top_width if trunk_blocks and e != top else 0).resolved())
        for e in tree.experts}


def trunk_owner(tasks: dict[str, Task]) -> str | None:
    """The key of the expert whose first blocks are the shared trunk (None: no trunk)."""
    if not any(t.net.trunk_blocks for t in tasks.values()):
        return None
    return min((t for t in tasks.values() if t.node >= 0), key=lambda t: t.node).key


def expert_widths(tree: Hierarchy, rule: str, width: int) -> dict[str, int]:
    """Width per expert from a rule, so small subtrees get small experts:
    '' every expert ``width``; 'leaves:MIN' ``width`` scaled by the node's share of the
    leaves, at least MIN; 'map:NODE=W,NODE=W' the given nodes, the others ``width``."""
    kind, _, arg = rule.partition(":")
    names = [tree.names[e] for e in tree.experts]
    if not rule:
        return {}
    if kind == "leaves":
        try:
            least = int(arg)
        except ValueError:
            raise UsageError(f"expert widths {rule!r}: expected leaves:MIN with an integer MIN") from None
        leaves = tree.num_leaf_descendants
        return {tree.names[e]: max(least, round(width * int(leaves[e]) / int(leaves[0]))) for e in tree.experts}
    if kind == "map":
        out = {}
        for item in filter(None, arg.split(",")):
            node, _, w = item.partition("=")
            if node not in names:
                raise UsageError(f"expert widths {rule!r}: {node!r} is not an expert; experts are {', '.join(names)}")
            if not w.isdigit() or int(w) < 1:
                raise UsageError(f"expert widths {rule!r}: width {w!r} for {node!r}; expected a positive integer")
            out[node] = int(w)
        return out
    raise UsageError(f"unknown expert widths rule {rule!r}; expected leaves:MIN or map:NODE=W,...")


def stable_seed(*parts: object) -> int:
    """A seed that depends only on its parts (not on Python's hash randomisation)."""
    return zlib.crc32("/".join(map(str, parts)).encode()) & 0x7FFFFFFF


class Strategy:
    """Every decision of a round, for every transport (simulation, coordinator, Flower):
    which task a round trains, the hyper-parameters and seed a client trains with, how
    results combine, and the state that drives the schedule (data shares, the latest
    validation errors). Transports move messages and make no decision of their own.
    Every choice is derived from (seed, round, state), so a resumed run replays exactly."""

    def __init__(self, tree: Hierarchy, tasks: dict[str, Task], schedule: str, seed: int,
                 local: LocalConfig = LocalConfig(), rounds: int = 1, balanced_epochs: bool = False,
                 lr_decay: str = "none", shares: dict[str, float] | None = None,
                 val_error: dict[str, float] | None = None, aggregation: str = "fedavg",
                 influence_bound: float = 0.0, assignment: str = "one", min_clients: int = 2,
                 min_children: int = 1, server_optimizer: str = "none", server_lr: float = 1.0,
                 server_momentum: float = 0.9, epochs_cap: int = 0,
                 priors: dict[str, list[float]] | None = None, warm_start: int = 0, warm_lr: float = 1.0,
                 trust_reference: bool = False) -> None:
        if lr_decay not in LR_DECAYS:
            raise UsageError(f"unknown lr decay {lr_decay!r}; expected one of {', '.join(LR_DECAYS)}")
        rule, _, arg = aggregation.partition(":")
        if rule not in AGGREGATORS or (arg and rule != "trimmed-mean"):
            raise UsageError(f"unknown aggregation {aggregation!r}; expected fedavg, median or trimmed-mean[:SHARE]")
        if assignment not in ASSIGNMENTS:
            raise UsageError(f"unknown assignment {assignment!r}; expected one of {', '.join(ASSIGNMENTS)}")
        if server_optimizer not in SERVER_OPTIMIZERS:
            raise UsageError(f"unknown server optimizer {server_optimizer!r}; expected one of "
                             f"{', '.join(SERVER_OPTIMIZERS)}")
        self.server_optimizer, self.server_lr, self.server_momentum = server_optimizer, server_lr, server_momentum
        self.server_state: dict[str, dict[str, np.ndarray]] = {}   # per task: the server optimizer's moments
        self.changes: dict[str, list[float]] = {}   # per task: norms of its last accepted changes (the bound's)
        self.epochs_cap = epochs_cap
        self.trust_reference = trust_reference   # FLTrust: the server's own update sets a round's direction and size
        self.warm_start, self.warm_lr = warm_start, warm_lr
        self.priors = dict(priors or task_priors(tree, tasks))
        self.aggregation, self.influence_bound, self.assignment = aggregation, influence_bound, assignment
        self.min_clients, self.min_children = min_clients, min_children
        self._aggregate = (lambda r: trimmed_mean(r, float(arg))) if arg else AGGREGATORS[rule]
        self.tree, self.tasks, self.seed = tree, tasks, seed
        self.schedule_name, self.schedule = schedule, get_schedule(schedule)
        self.local, self.rounds, self.balanced_epochs, self.lr_decay = local, rounds, balanced_epochs, lr_decay
        self.context = ScheduleContext(list(tasks), dict(shares or {k: 1.0 for k in tasks}), dict(val_error or {}))

    # ------------------------------------------------------------- schedule
    def choose_task(self, rnd: int) -> str:
        return self.schedule(rnd, self.context)

    def order(self, rnd: int) -> list[str]:
        """Every task, most useful first in round ``rnd``: the schedule's choice, then the
        tasks it would choose next (worst-validation: by its priority)."""
        ctx = self.context
        if self.needs_validation:
            return sorted(ctx.keys, key=lambda k: (-ctx.val_error.get(k, 1.0) * ctx.shares[k], ctx.keys.index(k)))
        out: list[str] = []
        for step in range(rnd, rnd + 64 * len(ctx.keys)):
            key = self.schedule(step, ctx)
            if key not in out:
                out.append(key)
                if len(out) == len(ctx.keys):
                    break
        return out + [k for k in ctx.keys if k not in out]

    def assign(self, rnd: int, offers: dict[int, set[str]]) -> dict[int, str]:
        """Which task each reachable client trains in round ``rnd``; ``offers`` holds, per
        client, the tasks it can afford and has samples for. 'one': the round's task, for
        the clients that can take it. 'resource-aware': each client its most useful
        affordable task (``order``), so several experts can train in one round; a task
        other than the round's own trains only with at least ``min_clients`` clients, since
        one client's non-IID update would otherwise replace the expert outright: the most
        useful group that is too small moves on to its next choices first (choices only
        move down the order, so groups can still form further down)."""
        if rnd < self.warm_start:   # the root alone first (``warm_start``)
            offers = {c: {k for k in ks if self.tasks[k].node == 0} for c, ks in offers.items()}
        if self.assignment == "spread":
            return self._spread(rnd, offers)
        order = self.order(rnd)
        if self.assignment == "one":
            return {c: order[0] for c in sorted(offers) if order[0] in offers[c]}
        choices = {c: [k for k in order if k in offers[c]] for c in sorted(offers)}
        while True:
            plan = {c: ks[0] for c, ks in choices.items() if ks}
            counts = {k: list(plan.values()).count(k) for k in order}
            small = [k for k in order[1:] if 0 < counts[k] < self.min_clients]
            if not small:
                return plan
            for c, ks in choices.items():
                if ks and ks[0] == small[0]:
                    choices[c] = ks[1:]

    def _spread(self, rnd: int, offers: dict[int, set[str]]) -> dict[int, str]:
        """'spread': clients shared out in proportion to the tasks' shares of the data, every
        expert getting at least ``min_clients`` when it trains. An expert whose share earns it
        more than that (the root, which sees every sample) trains every round with its
        cohort; the others train in turn (round-robin, moving on each round by as many
        cohorts as the rest of the round holds). Within a cohort the lowest client indices
        come first (the round's sample is already random); clients left over join the first
        cohort they can. One task per client, so a client's round is one expert's."""
        keys, shares = self.context.keys, self.context.shares
        m, total = len(offers), sum(shares[k] for k in keys) or 1.0
        size = {k: max(self.min_clients, int(m * shares[k] / total)) for k in keys}
        big = [k for k in keys if size[k] > self.min_clients]
        small = [k for k in keys if size[k] <= self.min_clients]
        per_round = max(1, (m - sum(size[k] for k in big)) // self.min_clients)
        start = (rnd * per_round) % len(small) if small else 0
        free = sorted(offers)
        plan: dict[int, str] = {}
        for key in big + small[start:] + small[:start]:
            takers = [c for c in free if key in offers[c]]
            if len(takers) < self.min_clients:
                continue
            for c in takers[:size[key]]:
                plan[c] = key
            free = [c for c in free if c not in plan]
            if len(free) < self.min_clients:
                break
        chosen = list(dict.fromkeys(plan.values()))
        for c in free:
            key = next((k for k in chosen if k in offers[c]), None)
            if key is not None:
                plan[c] = key
        return dict(sorted(plan.items()))

    @property
    def needs_validation(self) -> bool:
        """Whether the schedule reads validation errors (the transport must then report them)."""
        return reads_validation(self.schedule)

    def record_validation(self, key: str, error: float) -> None:
        self.context.val_error[key] = float(error)

    def state(self) -> dict:
        """What drives the schedule; saved with the run, restored on resume and restart."""
        return {"schedule": self.schedule_name, "shares": dict(self.context.shares),
                "val_error": dict(self.context.val_error), "priors": dict(self.priors),
                "changes": {k: list(v) for k, v in self.changes.items()}}

    def restore(self, state: dict) -> None:
        if state.get("schedule", self.schedule_name) != self.schedule_name:
            raise StrategyError(f"the saved state was made by schedule {state['schedule']!r}; this run asks for "
                                f"{self.schedule_name!r}: keep the original schedule or start a new run")
        missing = sorted(set(self.tasks) - set(state.get("shares", {})))
        if missing:
            raise StrategyError(f"the saved state has no data share for tasks {missing[:5]}")
        self.context.shares = {k: float(state["shares"][k]) for k in self.tasks}
        self.context.val_error = {k: float(v) for k, v in state.get("val_error", {}).items() if k in self.tasks}
        if all(k in state.get("priors", {}) for k in self.tasks):   # a run saved before priors: the tree's
            self.priors = {k: list(state["priors"][k]) for k in self.tasks}
        self.changes = {k: [float(x) for x in v] for k, v in state.get("changes", {}).items() if k in self.tasks}

    # --------------------------------------------------------------- clients
    def lr(self, rnd: int) -> float:
        """The client learning rate of round ``rnd`` (cosine: from lr down to lr/10 over the run)."""
        if self.lr_decay == "none":
            return self.local.lr
        frac = min(1.0, rnd / max(1, self.rounds - 1))   # a fleet past the planned rounds stays at lr/10
        return self.local.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))

    def client_config(self, key: str, rnd: int, client_samples: int = 0, task_samples: int = 0,
                      max_epochs: int = 0) -> LocalConfig:
        """Hyper-parameters for training ``key`` in round ``rnd`` on a client holding
        ``client_samples`` samples, ``task_samples`` of them under the task. With balanced
        epochs an expert runs ``balanced_epochs(client_samples, task_samples, batch)`` times
        the configured epochs, so no expert's round costs that client more than the root
        expert's round, in samples or in optimizer steps; ``max_epochs`` (0: no limit) caps
        the balanced epochs at what the client's round deadline allows."""
        local = replace(self.local, lr=self.lr(rnd) * (self.warm_lr if self.warm_start and self.tasks[key].node > 0
                                                       else 1.0))
        if local.logit_adjust > 0:
            local = replace(local, prior=tuple(self.priors[key]))
        if self.balanced_epochs and self.tasks[key].node >= 0 and task_samples > 0:
            factor = balanced_epochs(client_samples, task_samples, local.batch_size)
            epochs = local.epochs * (min(factor, self.epochs_cap) if self.epochs_cap else factor)
            local = replace(local, epochs=min(epochs, max(local.epochs, max_epochs)) if max_epochs else epochs)
        return local

    def warm_starts(self, rnd: int, weights: dict[str, Weights]) -> dict[str, Weights]:
        """With ``warm_start`` K, at the end of round K-1 (the root has trained alone so far):
        every other expert's new weights, its parent expert's (the nearest ancestor's that has
        an expert) in every tensor but its own output layer, parents first, so a deeper expert
        inherits what its parent just inherited. The fine-from-coarse initialisation of HD-CNN
        (Yan et al., ICCV 2015): an expert that sees only its own children's samples starts
        from features learnt on all of its parent's. ``weights``: every expert's current ones."""
        if not self.warm_start or rnd != self.warm_start - 1:
            return {}
        by_node = {t.node: k for k, t in self.tasks.items()}
        out: dict[str, Weights] = {}
        for key in sorted((k for k, t in self.tasks.items() if t.node > 0), key=lambda k: self.tasks[k].node):
            v = int(self.tree.parents[self.tasks[key].node])
            while v >= 0 and v not in by_node:
                v = int(self.tree.parents[v])
            if v < 0:
                continue
            parent = out.get(by_node[v], weights[by_node[v]])
            own = weights[key]
            last = list(own)[-1].rsplit(".", 1)[0] + "."   # the output layer: the last module's tensors
            out[key] = {n: (np.array(parent[n], copy=True) if not n.startswith(last) and n in parent
                            and np.shape(parent[n]) == np.shape(a) else np.array(a, copy=True)) for n, a in own.items()}
        return out

    def task_samples(self, key: str, leaf_counts: np.ndarray) -> int:
        """How many of a client's samples (``leaf_counts``: its samples per label) ``key`` trains on
        (``usable_samples``: none when they fall under fewer than ``min_children`` children)."""
        return usable_samples(self.tree, self.tasks[key], self.check_counts(leaf_counts), self.min_children)

    def check_counts(self, leaf_counts: np.ndarray) -> np.ndarray:
        """A client's samples per label as integers, or a UsageError saying what was expected."""
        leaf_counts = np.asarray(leaf_counts, dtype=np.int64)
        if leaf_counts.shape != (self.tree.num_leaves,) or (leaf_counts < 0).any():
            raise UsageError(f"label counts must be {self.tree.num_leaves} non-negative integers, one per leaf")
        return leaf_counts

    def client_seed(self, rnd: int, client: int) -> int:
        return stable_seed(self.seed, rnd, client)

    def client_data(self, key: str, labels: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The indices (into the data set) and targets a client with samples ``idx`` trains on."""
        mask, target = self.tasks[key].select(self.tree, labels[idx])
        return idx[mask], target

    # ------------------------------------------------------------ aggregate
    def sample_cap(self, task_samples: list[int]) -> int | None:
        """The most samples one result of a task may weigh: ``influence_bound`` x the lower
        median of what the fleet's clients hold under it (``task_samples``, every client the
        transport knows, not only this round's), so a sample count claimed by one device, or
        by a minority, buys at most that much. None: no cap (bound off, or nothing known)."""
        held = [n for n in task_samples if n > 0]
        if self.influence_bound <= 0 or not held:
            return None
        return max(1, int(self.influence_bound * lower_median(held)))

    def bound(self, results: list[tuple[Weights, int]], base: Weights, key: str | None = None
              ) -> tuple[dict[int, tuple[Weights, int]], dict[int, str], list[float]]:
        """Each result of task ``key`` bounded (``aggregate.bound_results``, against the task's
        remembered changes): kept results by index, reasons for those left out, kept norms."""
        return bound_results(results, base, self.influence_bound, self.changes.get(key, []))

    def remember(self, key: str, norms: list[float]) -> None:
        """The accepted changes of a round of ``key``: the history its next bounds read, to six
        significant digits (transports whose devices train the same update on other machines
        agree on them, not on the last bits)."""
        if norms:
            self.changes[key] = (self.changes.get(key, []) + [float(f"{n:.6g}") for n in norms])[-CHANGE_WINDOW:]

    def aggregate(self, results: list[tuple[Weights, int]], base: Weights, key: str | None = None,
                  sample_cap: int | None = None) -> Weights:
        """Combine a round's results for task ``key`` whose weights were ``base``: each result's
        change bounded (``bound``; none left: ``base``), sample counts capped at
        ``sample_cap``, then the aggregation rule (FedAvg, coordinate-wise median or trimmed
        mean), then the server optimizer's step towards it (its moments kept per task in
        ``server_state``). Reads the bound's history but does not add to it (``remember``)."""
        kept, _, _ = self.bound(results, base, key)
        return self.combine(list(kept.values()), base, key, sample_cap)

    def combine(self, results: list[tuple[Weights, int]], base: Weights, key: str | None = None,
                sample_cap: int | None = None) -> Weights:
        """The aggregation rule and the server step over results already bounded, sample counts
        capped at ``sample_cap`` (None: ``sample_cap`` of the round's own counts, with three
        results or more)."""
        if not results:
            return base
        if sample_cap is None and len(results) >= 3:   # no fleet known: the round's own counts
            sample_cap = self.sample_cap([n for _, n in results])
        combined = self._aggregate(cap_samples(results, sample_cap))
        if self.server_optimizer == "none":
            return combined
        new, self.server_state[key] = server_step(self.server_optimizer, base, combined,
                                                  self.server_state.get(key, {}), self.server_lr,
                                                  self.server_momentum)
        return new
