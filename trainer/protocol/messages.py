"""What a device reports with its update, parsed once where it arrives.

A device's metrics are its own figures about its local update (losses before and after,
seconds, peak memory growth). They never decide anything but whether the update diverged
(a non-finite ``loss_after``), yet the round's close reads them: a value that is not a number
there would stop every round that follows. So every transport parses them into
``ClientMetrics`` when they arrive and refuses what does not parse, with a message that says
what was expected; the driver reads only the typed fields. numpy-free, torch-free.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

from hierarchy.errors import UsageError

#: the fields a device may report, and whether a non-finite value is allowed (a loss may be
#: NaN or infinite: that is how a diverged update says so; a duration or a size may not)
METRIC_FIELDS = {"loss_before": True, "loss_after": True, "seconds": False, "peak_growth_mb": False}
#: the largest duration or memory figure taken at face value (a year of seconds, 1 TB in MB)
MAX_FIGURE = 3.2e7


class InvalidMetrics(UsageError):
    """A device's metrics that are not an object of known, numeric fields."""


def _number(name: str, value: object, non_finite: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidMetrics(f"metric {name!r} is {type(value).__name__} {str(value)[:40]!r}; expected a number")
    x = float(value)
    if math.isnan(x) or math.isinf(x):
        if not non_finite:
            raise InvalidMetrics(f"metric {name!r} is {x}; expected a finite number")
        return x
    if not non_finite and not 0 <= x <= MAX_FIGURE:
        raise InvalidMetrics(f"metric {name!r} is {x:g}; expected 0 to {MAX_FIGURE:g}")
    return x


@dataclass(frozen=True)
class ClientMetrics:
    """A device's own figures about one local update; every field optional."""
    loss_before: float | None = None
    loss_after: float | None = None
    seconds: float | None = None
    peak_growth_mb: float | None = None

    @classmethod
    def parse(cls, obj: object) -> ClientMetrics:
        """The typed metrics of a JSON object, or ``InvalidMetrics`` naming the first bad field."""
        if obj is None:
            return cls()
        if not isinstance(obj, dict):
            raise InvalidMetrics(f"metrics are {type(obj).__name__}; expected a JSON object with any of "
                                 f"{', '.join(METRIC_FIELDS)}")
        unknown = [str(k)[:40] for k in obj if k not in METRIC_FIELDS]
        if unknown:
            raise InvalidMetrics(f"unknown metric {unknown[0]!r}; expected any of {', '.join(METRIC_FIELDS)}")
        return cls(**{k: _number(k, v, METRIC_FIELDS[k]) for k, v in obj.items()})

    def to_dict(self) -> dict:
        """The fields that were reported (JSON: non-finite losses as the strings json writes)."""
        return {k: getattr(self, k) for k in METRIC_FIELDS if getattr(self, k) is not None}

    def result(self, samples: int) -> dict:
        """The driver's view of a reply's metrics: num_samples, train_loss, train_seconds."""
        return {"num_samples": samples, "train_loss": 0.0 if self.loss_after is None else self.loss_after,
                "train_seconds": 0.0 if self.seconds is None else self.seconds}


def reported_loss(metrics: dict) -> float | None:
    """A result's ``train_loss`` as a float (NaN or infinite allowed), or None when it is not a
    number: the driver leaves such a result out instead of failing the round's close."""
    value = metrics.get("train_loss", 0.0)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        try:   # numpy scalars and 0-d arrays
            return float(value) if getattr(value, "shape", None) == () else None
        except (TypeError, ValueError):
            return None
    return float(value)


def reported_seconds(metrics: dict) -> float:
    """A result's ``train_seconds`` as a finite, non-negative float (0 when it is not one)."""
    value = reported_loss({"train_loss": metrics.get("train_seconds", 0.0)})
    return value if value is not None and math.isfinite(value) and value >= 0 else 0.0


class Answer(Enum):
    """How a device answered the open round; its sentence is made only where it is shown."""
    UPDATE = "already sent an update for"
    EXCUSED = "was excused from"

    def sentence(self, device: str, rnd: int) -> str:
        return f"device {device} {self.value} round {rnd}"
