"""Which expert a round trains: swappable schedules, looked up by name."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from hierarchy.errors import UsageError


@dataclass
class ScheduleContext:
    keys: list[str]                                   # the tasks, in a fixed order
    shares: dict[str, float]                          # share of training samples each task sees
    val_error: dict[str, float] = field(default_factory=dict)  # latest validation error per task


def round_robin(rnd: int, ctx: ScheduleContext) -> str:
    return ctx.keys[rnd % len(ctx.keys)]


def proportional(rnd: int, ctx: ScheduleContext) -> str:
    """Smooth weighted round robin: over any stretch of rounds each expert's count is
    proportional to its share of the training data (the root, seeing all, most often)."""
    total = sum(ctx.shares[k] for k in ctx.keys)
    credit = {k: 0.0 for k in ctx.keys}
    chosen = ctx.keys[0]
    for _ in range(rnd + 1):
        for k in ctx.keys:
            credit[k] += ctx.shares[k]
        chosen = max(ctx.keys, key=lambda k: credit[k])
        credit[chosen] -= total
    return chosen


def worst_validation_first(rnd: int, ctx: ScheduleContext) -> str:
    """The expert whose validation errors count most (error rate x share of samples
    routed to it), so a hard but tiny expert does not starve the others."""
    return max(ctx.keys, key=lambda k: (ctx.val_error.get(k, 1.0) * ctx.shares[k], -ctx.keys.index(k)))


worst_validation_first.reads_validation = True   # transports then report each new expert's validation error


SCHEDULES: dict[str, Callable[[int, ScheduleContext], str]] = {
    "round-robin": round_robin,
    "proportional": proportional,
    "worst-validation": worst_validation_first,
}


def reads_validation(schedule: Callable[[int, ScheduleContext], str]) -> bool:
    """Whether a schedule chooses by validation errors (declared by the schedule itself)."""
    return bool(getattr(schedule, "reads_validation", False))


def get_schedule(name: str) -> Callable[[int, ScheduleContext], str]:
    try:
        return SCHEDULES[name]
    except KeyError:
        raise UsageError(f"unknown schedule {name!r}; expected one of {', '.join(SCHEDULES)}") from None
