"""What the coordinator lets in: enrolment secrets (rotatable) and one-time enrolment tokens,
a ceiling on devices, an enrolment rate, a rate on failed secrets per peer, and a ceiling
on the samples one device may claim (no torch)."""

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
    failed_per_second: float = 0.2     # wrong secrets a peer may try, sustained (one every 5 s) ...
    failed_burst: int = 10             # ... and at once; past that 429 without a look at the secret


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

    def peek(self) -> float:
        """The tokens saved up now, taking none."""
        with self.lock:
            return min(self.burst, self.tokens + (time.monotonic() - self.stamp) * self.rate)


class PeerBuckets:
    """A ``TokenBucket`` per peer address (at most ``most`` peers remembered: the fullest
    buckets are forgotten first, since they hold nothing against anyone)."""

    def __init__(self, rate: float, burst: int, most: int = 10_000) -> None:
        self.rate, self.burst, self.most = rate, burst, most
        self.buckets: dict[str, TokenBucket] = {}
        self.lock = threading.Lock()

    def _bucket(self, peer: str) -> TokenBucket:
        with self.lock:
            if peer not in self.buckets:
                if len(self.buckets) >= self.most:
                    for key in [k for k, b in self.buckets.items() if b.peek() >= b.burst][: self.most // 2] or \
                            list(self.buckets)[: self.most // 2]:
                        del self.buckets[key]
                self.buckets[peer] = TokenBucket(self.rate, self.burst)
            return self.buckets[peer]

    def blocked(self, peer: str) -> float:
        """Seconds until ``peer`` may try again (0: it may now)."""
        b = self._bucket(peer)
        return 0.0 if b.peek() >= 1 else (1 - b.peek()) / self.rate

    def failed(self, peer: str) -> None:
        self._bucket(peer).take()


class Secrets:
    """The enrolment secrets: one string, or a file of them (one a line, `#` comments) that is
    read again whenever it changes, so a secret is rotated by editing the file; devices
    already enrolled keep their tokens. With neither, devices enrol only with one-time
    enrolment tokens the operator issues (``hmoe coordinator-admin tokens``)."""

    def __init__(self, secret: str | None = None, path: str | os.PathLike | None = None) -> None:
        self.fixed, self.path = secret, Path(path) if path is not None else None
        self._stamp, self._values = None, []
        self.lock = threading.Lock()
        if self.path is not None:
            self.values()

    def values(self) -> list[str]:
        if self.path is None:
            return [self.fixed] if self.fixed else []
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
