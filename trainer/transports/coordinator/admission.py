"""What the coordinator lets in: enrolment secrets (rotatable), a ceiling on devices, an
enrolment rate, and a ceiling on the samples one device may claim (no torch)."""

from __future__ import annotations

import hmac
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from hierarchy.errors import HmoeError


class AdmissionError(HmoeError):
    """An enrolment refused by policy; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 403, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status, self.retry_after = status, retry_after


@dataclass(frozen=True)
class Limits:
    max_devices: int = 10_000          # enrolled devices, all time
    enrol_per_second: float = 100.0    # sustained enrolment rate ...
    enrol_burst: int = 1_000           # ... and how many may come at once
    max_samples: int = 100_000         # samples one device may claim (label counts, X-Samples)


class TokenBucket:
    """``rate`` tokens a second, at most ``burst`` saved up; thread-safe."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate, self.burst = rate, burst
        self.tokens, self.stamp = float(burst), time.monotonic()
        self.lock = threading.Lock()

    def take(self) -> float:
        """0 when a token was taken, else the seconds until one is free."""
        with self.lock:
            now = time.monotonic()
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now
            if self.tokens >= 1:
                self.tokens -= 1
                return 0.0
            return (1 - self.tokens) / self.rate


class Secrets:
    """The enrolment secrets: one string, or a file of them (one a line, `#` comments) that is
    read again whenever it changes, so a secret is rotated by editing the file; devices
    already enrolled keep their tokens."""

    def __init__(self, secret: str | None = None, path: str | os.PathLike | None = None) -> None:
        if not secret and path is None:
            raise AdmissionError("an enrolment secret is required: --secret S, --secret-file F or $HMOE_ENROL_SECRET")
        self.fixed, self.path = secret, Path(path) if path is not None else None
        self._stamp, self._values = None, []
        self.lock = threading.Lock()
        if self.path is not None:
            self.values()

    def values(self) -> list[str]:
        if self.path is None:
            return [self.fixed]
        with self.lock:
            try:
                stamp = self.path.stat().st_mtime_ns
            except OSError as exc:
                raise AdmissionError(f"{self.path}: cannot read the enrolment secrets ({exc})", 500) from None
            if stamp != self._stamp:
                lines = [x.strip() for x in self.path.read_text().splitlines()]
                values = [x for x in lines if x and not x.startswith("#")]
                if not values:
                    raise AdmissionError(f"{self.path}: no enrolment secret in the file", 500)
                self._stamp, self._values = stamp, values
            return list(self._values)

    def check(self, secret: str) -> bool:
        return any(hmac.compare_digest(secret.encode(), s.encode()) for s in self.values())
