"""Device sync: enrol once, then per round get the assignment, fetch the expert's weights,
train it under the memory cap on local data, and push the update.

Restart-safe: the device's id and token, and the last round it finished, live in a
state file (mode 0600 from its first byte: it holds the token); the idempotency key of an
update is (device, round), so an update sent just before a crash and sent again after
the restart is counted once.

The device trusts nothing it is sent. Every reply has a size limit and a deadline for
all of it to arrive; every value an assignment carries is checked against bounds the
device sets (``DeviceBounds``: epochs, learning rate, batch size, the work of a round,
sample counts); weights arrive with the version they belong to and a SHA-256, and are
checked for names, shapes, dtype, finiteness and magnitude before training; names go into
URLs escaped, and only for experts the device's manifest has. A bad reply ends the sync
with one line (``SyncError``) naming the server, the request and the field; the state file
is written only after a round is done, so the device keeps its last good state. Connection
errors and 5xx answers are retried with backoff, and so is a reply that stays silent, up to
three times (a coordinator busy aggregating is not a hostile one).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import numpy as np

from edge_runtime.bundle import Bundle
from hierarchy.errors import HmoeError
from hierarchy.manifest import Manifest, ManifestError
from hierarchy.tree import write_text_atomic

MAX_INT = 2**31 - 1


class SyncError(HmoeError, RuntimeError):
    """The server refused us, or sent what this device will not use: retrying will not fix it."""


@dataclass(frozen=True)
class DeviceBounds:
    """What this device agrees to, whatever a coordinator asks (``hmoe-edge sync`` flags)."""
    max_epochs: int = 100                  # local epochs of one round
    max_batch_size: int = 4096
    max_lr: float = 10.0
    max_sample_passes: int = 10_000_000    # epochs x samples of one round (its work)
    max_abs_weight: float = 1e4            # no weight of a sane expert is near this
    max_json_bytes: int = 1 << 20          # an assignment, enrolment or update answer
    max_manifest_bytes: int = 64 << 20     # the manifest (a 4,000-class tree is a few MB)
    max_weights_bytes: int = 64 << 20      # one expert's weights, whatever the manifest declares (the
                                           # largest shipped expert is about 2 MB; --memory-cap-mb lowers it)
    reply_seconds: float = 60.0            # a whole reply, from the request to its last byte
    read_seconds: float = 10.0             # silence between two bytes of a reply


class Reply:
    def __init__(self, status: int, headers, body: bytes) -> None:
        self.status_code, self.headers, self.content = status, headers, body

    @property
    def text(self) -> str:
        return self.content[:300].decode(errors="replace").replace("\n", " ")


class Client:
    """HTTP with retries and exponential backoff on connection errors and 5xx, and a size
    limit and deadline on every reply (``request``)."""

    def __init__(self, server: str, retries: int = 8, backoff: float = 0.5,
                 bounds: DeviceBounds = DeviceBounds()) -> None:
        import httpx   # here, not at import: `hmoe-edge predict` and `serve` never sync
        self.server = server.rstrip("/")
        self.bounds = bounds
        timeout = httpx.Timeout(bounds.read_seconds, connect=bounds.read_seconds)
        self.http = httpx.Client(base_url=self.server, timeout=timeout, follow_redirects=False,
                                 headers={"Accept-Encoding": "identity"})   # the bytes as sent, never inflated
        self.retries, self.backoff, self.token = retries, backoff, None

    def fail(self, what: str, problem: str) -> SyncError:
        return SyncError(f"{self.server}: {what}: {problem}")

    def _once(self, method: str, url: str, limit: int, what: str, headers: dict, **kwargs) -> Reply:
        deadline = time.monotonic() + self.bounds.reply_seconds
        with self.http.stream(method, url, headers=headers, **kwargs) as r:
            declared = r.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > limit:
                raise self.fail(what, f"reply of {declared} bytes; this device takes at most {limit}")
            chunks, size = [], 0
            for chunk in r.iter_raw():
                size += len(chunk)
                if size > limit:
                    raise self.fail(what, f"reply over {limit} bytes; this device takes at most that")
                if time.monotonic() > deadline:
                    raise self.fail(what, f"reply not complete within {self.bounds.reply_seconds:g} s")
                chunks.append(chunk)
            return Reply(r.status_code, r.headers, b"".join(chunks))

    def request(self, method: str, url: str, limit: int | None = None, what: str = "", silent_tries: int = 3,
                **kwargs) -> Reply:
        """``silent_tries``: how many times a request whose reply stays silent for ``read_seconds``
        is sent (a busy coordinator, aggregating while other devices send; the requests a sync
        repeats are idempotent: reads, and updates with their idempotency key). Enrolment
        passes 1: a second enrolment would be a second device."""
        import httpx
        what = what or f"{method} {url}"
        limit = self.bounds.max_json_bytes if limit is None else limit
        headers = dict(kwargs.pop("headers", {}))
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        delay, silent = self.backoff, 0
        for attempt in range(self.retries + 1):
            try:
                r = self._once(method, url, limit, what, headers, **kwargs)
                if r.status_code < 500:
                    return r
            except httpx.TimeoutException:
                silent += 1
                if silent >= silent_tries:
                    raise self.fail(what, f"no byte of the reply for {self.bounds.read_seconds:g} s "
                                    f"({silent} {'try' if silent == 1 else 'tries'})") from None
            except httpx.TransportError as exc:
                if attempt == self.retries:
                    raise self.fail(what, f"cannot reach the server ({exc.__class__.__name__}: {exc})") from None
            time.sleep(delay)
            delay = min(delay * 2, 10.0)
        raise self.fail(what, f"server error {r.status_code} after {self.retries + 1} tries: {r.text}")

    def json(self, r: Reply, what: str) -> dict:
        """A reply's JSON object, or one line saying what it was instead."""
        try:
            out = json.loads(r.content)
        except (ValueError, RecursionError) as exc:
            raise self.fail(what, f"reply is not JSON ({exc.__class__.__name__}): {r.text[:100]!r}") from None
        if not isinstance(out, dict):
            raise self.fail(what, f"reply is JSON {type(out).__name__}; expected an object")
        return out


def field(client: Client, obj: dict, name: str, kind, what: str, optional: bool = False, least: float | None = None,
          most: float | None = None):
    """``obj[name]`` if it is a ``kind`` (int: not bool) within [least, most], else one line
    naming the server, the request and the field."""
    if name not in obj or obj[name] is None:
        if optional:
            return None
        raise client.fail(what, f"field {name!r} is missing")
    value = obj[name]
    ok = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        ok, value = True, float(value)
    if not ok:
        raise client.fail(what, f"field {name!r} is {type(value).__name__} {str(value)[:60]!r}; expected "
                          f"{getattr(kind, '__name__', kind)}")
    if (least is not None and value < least) or (most is not None and value > most):
        raise client.fail(what, f"field {name!r} is {value!r}; this device takes {least} to {most}")
    return value


def _state(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        state = json.loads(path.read_text())
    except ValueError as exc:
        raise SyncError(f"{path}: the device's state file is not JSON ({exc}); move it away to enrol again") from None
    if not isinstance(state, dict):
        raise SyncError(f"{path}: the device's state file is not a JSON object; move it away to enrol again")
    return state


def _save_state(path: Path, state: dict) -> None:
    write_text_atomic(path, json.dumps(state), mode=0o600)   # it holds the device token: 0600 from the first byte


def bundle_from_manifest(manifest: dict, server: str = "the coordinator") -> Bundle:
    try:
        return Bundle(Path("."), Manifest.from_dict(manifest, f"{server}'s manifest"))
    except (ManifestError, KeyError, TypeError, ValueError) as exc:
        raise SyncError(f"{server}: GET /manifest: {exc}") from None


def fetch_weights(client: Client, bundle: Bundle, expert: str, version: int, bounds: DeviceBounds,
                  own: int) -> dict[str, np.ndarray]:
    """``expert``'s weights of ``version``, checked (``check_weights``); refused before a byte is
    fetched when the manifest declares more than ``own`` bytes, the device's own limit (the
    manifest is the coordinator's word)."""
    what = f"GET /weights/{expert}"
    shapes = expected_shapes(bundle, expert)
    limit = 8 + 1024 + 256 * len(shapes) + sum(4 * int(np.prod(s)) for s in shapes.values()) + 4096
    if limit > own:
        raise client.fail(what, f"the manifest declares {limit} bytes of weights for {expert}; this device takes at "
                          f"most {own} (its own limit: --max-weights-mb, a quarter of --memory-cap-mb)")
    r = client.request("GET", f"/weights/{quote(expert, safe='')}", limit=limit, what=what)
    if r.status_code != 200:
        raise client.fail(what, f"refused ({r.status_code}): {r.text}")
    return check_weights(client, r, expert, version, shapes, bounds)


def fetch_trunk(client: Client, bundle: Bundle, a: dict, what: str, bounds: DeviceBounds,
                own: int) -> dict[str, np.ndarray]:
    """The shared trunk's weights an expert on it trains above: the assignment names the expert
    whose weights hold it and their version; fetched and checked like the expert's own."""
    t = field(client, a, "trunk", dict, what)
    owner = field(client, t, "expert", str, what)
    if owner not in bundle.experts or bundle.experts[owner].net.get("trunk_blocks"):
        raise client.fail(what, f"field 'trunk' names {owner[:100]!r}, not the manifest's expert that holds the trunk")
    return fetch_weights(client, bundle, owner, field(client, t, "version", int, what, least=0, most=MAX_INT),
                         bounds, own)


def expected_shapes(bundle: Bundle, expert: str) -> dict[str, tuple[int, ...]]:
    """The tensors an expert's weights must hold, from the network config in the manifest."""
    from trainer.device.nets import NetConfig
    return {k: tuple(v) for k, v in NetConfig.from_json(json.dumps(bundle.experts[expert].net)).param_shapes().items()}


def check_weights(client: Client, r: Reply, expert: str, version: int, shapes: dict[str, tuple[int, ...]],
                  bounds: DeviceBounds) -> dict[str, np.ndarray]:
    """The weights a reply carries, once they are the expert's, of the assigned version, as
    sent (SHA-256), and sane (names, shapes, float32, finite, no weight over the bound)."""
    from safetensors import SafetensorError
    from safetensors.numpy import load
    what = f"GET /weights/{expert}"
    if r.headers.get("x-expert") != expert:
        raise client.fail(what, f"header X-Expert is {r.headers.get('x-expert')!r}; expected {expert!r}")
    if r.headers.get("x-weights-version") != str(version):
        raise client.fail(what, f"header X-Weights-Version is {r.headers.get('x-weights-version')!r}; the "
                          f"assignment is for version {version}")
    digest = hashlib.sha256(r.content).hexdigest()
    if r.headers.get("x-weights-sha256") != digest:
        raise client.fail(what, f"the body's SHA-256 is {digest[:16]}...; header X-Weights-SHA256 is "
                          f"{str(r.headers.get('x-weights-sha256'))[:16]!r}: damaged or not what was sent")
    try:
        weights = load(r.content)
    except (SafetensorError, ValueError, TypeError, OverflowError) as exc:
        raise client.fail(what, f"body is not a safetensors file ({str(exc)[:100]})") from None
    if set(weights) != set(shapes):
        raise client.fail(what, f"tensors {sorted(set(weights) ^ set(shapes))[:3]} differ from the expert's "
                          f"network in the manifest")
    for name, w in weights.items():
        if w.dtype != np.float32 or tuple(w.shape) != shapes[name]:
            raise client.fail(what, f"tensor {name!r} is {w.dtype}{list(w.shape)}; expected float32"
                              f"{list(shapes[name])}")
        if not np.isfinite(w).all():
            raise client.fail(what, f"tensor {name!r} holds NaN or infinite values")
        if w.size and float(np.abs(w).max()) > bounds.max_abs_weight:
            raise client.fail(what, f"tensor {name!r} holds a weight of {float(np.abs(w).max()):.3g}; this device "
                              f"takes at most {bounds.max_abs_weight:g}")
    return weights


def sync(server: str, secret: str, data: str | os.PathLike, memory_cap_mb: float | None, rounds: int | None = None,
         state_file: str | os.PathLike | None = None, poll: float = 1.0, name: str = "",
         log=print, until_round: int | None = None, subtree: str | None = None,
         bounds: DeviceBounds = DeviceBounds()) -> int:
    """Take part in ``rounds`` rounds (None: until stopped, or until the coordinator's open round
    reaches ``until_round``). Returns the rounds this device sent an update for. A device that
    carries only a ``subtree`` (a personalised bundle) trains only the experts inside it: the
    coordinator excuses it from the others' rounds. ``secret`` is the fleet's enrolment secret
    or a one-time enrolment token (used only when the state file holds no token yet).

    The device decides nothing: it tells the coordinator its samples per label, and trains with
    the hyper-parameters and seed the run's strategy gives it, which the update carries back;
    but it takes them only within ``bounds``."""
    from safetensors.numpy import save

    from edge_runtime.local_train import TrainError, load_local_data, train_expert
    from trainer.device.config import LocalConfig
    state_path = Path(state_file or Path(data).with_name(Path(data).name + ".hmoe-device.json"))
    state = _state(state_path)
    client = Client(server, bounds=bounds)
    if "token" not in state:
        r = client.request("POST", "/enroll", json={"secret": secret, "name": name}, what="POST /enroll",
                           silent_tries=1)
        if r.status_code != 200:
            raise client.fail("POST /enroll", f"enrolment refused ({r.status_code}): {r.text}")
        e = client.json(r, "POST /enroll")
        state.update(device_id=field(client, e, "device_id", str, "POST /enroll")[:64],
                     token=field(client, e, "token", str, "POST /enroll")[:256])
        _save_state(state_path, state)
        log(f"enrolled as device {state['device_id']}")
    client.token = state["token"]
    r = client.request("GET", "/manifest", limit=bounds.max_manifest_bytes)
    if r.status_code != 200:
        raise client.fail("GET /manifest", f"refused ({r.status_code}): {r.text}")
    bundle = bundle_from_manifest(client.json(r, "GET /manifest"), client.server)
    x, labels = load_local_data(data, bundle)
    counts = ",".join(str(int(c)) for c in np.bincount(labels, minlength=bundle.tree.num_leaves))

    def finish(rnd: int) -> None:
        state["last_round"] = rnd
        _save_state(state_path, state)

    done = 0
    what = "GET /assignment"
    while rounds is None or done < rounds:
        r = client.request("GET", "/assignment", params={"counts": counts, **({"subtree": subtree} if subtree else {})})
        if r.status_code != 200:
            raise client.fail(what, f"refused ({r.status_code}): {r.text}")
        a = client.json(r, what)
        rnd = field(client, a, "round", int, what, least=0, most=MAX_INT)
        if until_round is not None and rnd >= until_round:
            break
        wait = field(client, a, "wait", str, what, optional=True)
        if rnd <= state.get("last_round", -1) or wait:   # done with it, or not planned yet
            time.sleep(poll)
            continue
        samples = field(client, a, "samples", int, what, optional=True, least=0, most=len(labels))
        expert = field(client, a, "expert", str, what)
        if not samples:   # the coordinator has excused us: nothing under this expert here, or outside our subtree
            excused = field(client, a, "excused", str, what, optional=True)
            log(f"round {rnd}: {(excused or f'no local samples under {expert}')[:300]}; skipping")
            finish(rnd)
            continue
        if expert not in bundle.experts:
            raise client.fail(what, f"field 'expert' is {expert[:100]!r}, not an expert of the manifest")
        version = field(client, a, "weights_version", int, what, least=0, most=MAX_INT)
        seed = field(client, a, "seed", int, what, least=0, most=2**63 - 1)
        hp = field(client, a, "hyperparameters", dict, what)
        try:
            local = LocalConfig.from_dict(hp)
        except (ValueError, TypeError) as exc:
            raise client.fail(what, f"field 'hyperparameters': {exc}; if this is a setting this device does not "
                              "know, install the coordinator's release of hmoe-edge on this device") from None
        for name_, value, most in (("epochs", local.epochs, bounds.max_epochs),
                                   ("batch_size", local.batch_size, bounds.max_batch_size),
                                   ("lr", local.lr, bounds.max_lr),
                                   ("epochs x samples", local.epochs * samples, bounds.max_sample_passes)):
            if value > most:
                raise client.fail(what, f"hyperparameters {name_} {value:g} is over this device's bound {most:g}")
        own = bounds.max_weights_bytes if memory_cap_mb is None else min(bounds.max_weights_bytes,
                                                                           int(memory_cap_mb * (1 << 20)) // 4)
        weights = fetch_weights(client, bundle, expert, version, bounds, own)
        trunk = fetch_trunk(client, bundle, a, what, bounds, own) \
            if bundle.experts[expert].net.get("trunk_blocks") else None
        try:
            new, report = train_expert(bundle, expert, x, labels, memory_cap_mb, local, seed, weights=weights,
                                       trunk=trunk)
        except TrainError as exc:
            raise SyncError(f"round {rnd}: cannot train {expert}: {exc}") from None
        if not all(np.all(np.isfinite(v)) for v in new.values()):
            log(f"round {rnd}: local training of {expert} diverged (non-finite weights); declining the round")
            client.request("POST", "/decline", params={"round": rnd, "reason": "local training diverged"})
            finish(rnd)
            continue
        metrics = {k: report[k] for k in ("loss_before", "loss_after", "seconds", "peak_growth_mb") if k in report}
        r = client.request("POST", "/update", content=save({k: np.ascontiguousarray(v) for k, v in new.items()}),
                           headers={"X-Round": str(rnd), "X-Expert": expert, "X-Base-Version": str(version),
                                    "X-Samples": str(report["samples"]), "X-Client-Samples": str(len(labels)),
                                    "X-Hyperparameters": json.dumps(hp), "X-Metrics": json.dumps(metrics),
                                    "X-Idempotency-Key": f"{state['device_id']}-{rnd}"}, what="POST /update")
        if r.status_code == 409:   # stale or duplicate: the round moved on without us
            detail = client.json(r, "POST /update").get("detail") if r.content[:1] == b"{" else r.text
            log(f"round {rnd}: update not taken ({str(detail)[:300]}); going on with the next assignment")
            finish(rnd)
            continue
        if r.status_code != 200:
            raise client.fail("POST /update", f"refused ({r.status_code}): {r.text}")
        answer = client.json(r, "POST /update")
        finish(rnd)
        done += 1
        log(f"round {rnd}: trained {expert} on {report['samples']} samples, loss "
            f"{report['loss_before']:.4f} -> {report['loss_after']:.4f}, sent "
            f"({'duplicate' if answer.get('duplicate') is True else 'accepted'})")
    return done
