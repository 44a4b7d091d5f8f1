"""Device sync: enrol once, then per round get the assignment, fetch the expert's weights,
train it under the memory cap on local data, and push the update.

Restart-safe: the device's id and token, and the last round it finished, live in a
state file; the idempotency key of an update is (device, round), so an update sent
just before a crash and sent again after the restart is counted once.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import httpx
import numpy as np

from edge_runtime.bundle import Bundle
from hierarchy.errors import HmoeError
from hierarchy.manifest import Manifest, ManifestError
from hierarchy.tree import write_text_atomic


class SyncError(HmoeError, RuntimeError):
    """The server refused us in a way retrying will not fix."""


class Client:
    """HTTP with retries and exponential backoff on connection errors and 5xx."""

    def __init__(self, server: str, retries: int = 8, backoff: float = 0.5, timeout: float = 30.0) -> None:
        self.http = httpx.Client(base_url=server.rstrip("/"), timeout=timeout)
        self.retries, self.backoff, self.token = retries, backoff, None

    def request(self, method: str, url: str, **kwargs) -> httpx.Response:
        headers = dict(kwargs.pop("headers", {}))
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        delay = self.backoff
        for attempt in range(self.retries + 1):
            try:
                r = self.http.request(method, url, headers=headers, **kwargs)
                if r.status_code < 500:
                    return r
            except httpx.TransportError:
                if attempt == self.retries:
                    raise
            time.sleep(delay)
            delay = min(delay * 2, 10.0)
        return r


def _state(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def _save_state(path: Path, state: dict) -> None:
    write_text_atomic(path, json.dumps(state))
    os.chmod(path, 0o600)  # it holds the device token


def bundle_from_manifest(manifest: dict) -> Bundle:
    try:
        return Bundle(Path("."), Manifest.from_dict(manifest, "the coordinator's manifest"))
    except ManifestError as exc:
        raise SyncError(str(exc)) from None


def sync(server: str, secret: str, data: str | os.PathLike, memory_cap_mb: float | None, rounds: int | None = None,
         state_file: str | os.PathLike | None = None, poll: float = 1.0, name: str = "",
         log=print, until_round: int | None = None, subtree: str | None = None) -> int:
    """Take part in ``rounds`` rounds (None: until stopped, or until the coordinator's open round
    reaches ``until_round``). Returns the rounds this device sent an update for. A device that
    carries only a ``subtree`` (a personalised bundle) trains only the experts inside it: the
    coordinator excuses it from the others' rounds.

    The device decides nothing: it tells the coordinator its samples per label, and trains with
    the hyper-parameters and seed the run's strategy gives it, which the update carries back."""
    from safetensors.numpy import load, save

    from edge_runtime.local_train import load_local_data, train_expert
    from trainer.device.config import LocalConfig
    state_path = Path(state_file or Path(data).with_name(Path(data).name + ".hmoe-device.json"))
    state = _state(state_path)
    client = Client(server)
    if "token" not in state:
        r = client.request("POST", "/enroll", json={"secret": secret, "name": name})
        if r.status_code != 200:
            raise SyncError(f"enrolment refused ({r.status_code}): {r.text}")
        state.update(r.json())
        _save_state(state_path, state)
        log(f"enrolled as device {state['device_id']}")
    client.token = state["token"]
    r = client.request("GET", "/manifest")
    if r.status_code != 200:
        raise SyncError(f"manifest refused ({r.status_code}): {r.text}")
    bundle = bundle_from_manifest(r.json())
    x, labels = load_local_data(data, bundle)
    counts = ",".join(str(int(c)) for c in np.bincount(labels, minlength=bundle.tree.num_leaves))

    def finish(rnd: int) -> None:
        state["last_round"] = rnd
        _save_state(state_path, state)

    done = 0
    while rounds is None or done < rounds:
        r = client.request("GET", "/assignment", params={"counts": counts, **({"subtree": subtree} if subtree else {})})
        if r.status_code != 200:
            raise SyncError(f"assignment refused ({r.status_code}): {r.text}")
        a = r.json()
        if until_round is not None and a["round"] >= until_round:
            break
        if a["round"] <= state.get("last_round", -1) or a.get("wait"):   # done with it, or not planned yet
            time.sleep(poll)
            continue
        expert, rnd = a["expert"], a["round"]
        if not a.get("samples"):   # the coordinator has excused us: nothing under this expert here, or outside our subtree
            log(f"round {rnd}: {a.get('excused') or f'no local samples under {expert}'}; skipping")
            finish(rnd)
            continue
        r = client.request("GET", f"/weights/{expert}")
        if r.status_code != 200:
            raise SyncError(f"weights refused ({r.status_code}): {r.text}")
        base = int(r.headers["X-Weights-Version"])
        weights = load(r.content)
        hp = a["hyperparameters"]
        try:
            local = LocalConfig.from_dict(hp)
        except ValueError as exc:
            raise SyncError(f"the coordinator sent {exc} this device does not know; install the coordinator's "
                            "release of hmoe-edge on this device") from None
        new, report = train_expert(bundle, expert, x, labels, memory_cap_mb, local, int(a["seed"]), weights=weights)
        if not all(np.all(np.isfinite(v)) for v in new.values()):
            log(f"round {rnd}: local training of {expert} diverged (non-finite weights); declining the round")
            client.request("POST", "/decline", params={"round": rnd, "reason": "local training diverged"})
            finish(rnd)
            continue
        metrics = {k: report[k] for k in ("loss_before", "loss_after", "seconds", "peak_growth_mb") if k in report}
        r = client.request("POST", "/update", content=save({k: np.ascontiguousarray(v) for k, v in new.items()}),
                           headers={"X-Round": str(rnd), "X-Expert": expert, "X-Base-Version": str(base),
                                    "X-Samples": str(report["samples"]), "X-Client-Samples": str(len(labels)),
                                    "X-Hyperparameters": json.dumps(hp), "X-Metrics": json.dumps(metrics),
                                    "X-Idempotency-Key": f"{state['device_id']}-{rnd}"})
        if r.status_code == 409:   # stale or duplicate: the round moved on without us
            log(f"round {rnd}: update not taken ({r.json().get('detail')}); going on with the next assignment")
            finish(rnd)
            continue
        if r.status_code != 200:
            raise SyncError(f"update refused ({r.status_code}): {r.text}")
        finish(rnd)
        done += 1
        log(f"round {rnd}: trained {expert} on {report['samples']} samples, loss "
            f"{report['loss_before']:.4f} -> {report['loss_after']:.4f}, sent "
            f"({'duplicate' if r.json().get('duplicate') else 'accepted'})")
    return done
