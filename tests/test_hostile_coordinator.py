"""`hmoe-edge sync` against a hostile coordinator: a test server on 127.0.0.1 that sends,
one at a time, each bad reply the audit of issue 25 found accepted. Each ends in one clear
line (SyncError naming the server, the request and the field) in bounded time and memory,
the device sends no request it did not mean to, and its state file keeps its last good
state."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import stat
import time

import numpy as np
import psutil
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from safetensors.numpy import load, save

from edge_runtime.sync import DeviceBounds, SyncError, sync
from hierarchy.tree import write_text_atomic
from tests.conftest import CFG
from tests.support import serve_in_thread
from trainer.prepare import open_run
from trainer.transports.coordinator.service import Coordinator
from trainer.transports.inprocess import Federation

BOUNDS = DeviceBounds(reply_seconds=3.0, read_seconds=1.5)


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """What an honest coordinator would send: its manifest, an assignment and weights."""
    run = tmp_path_factory.mktemp("hostile") / "run"
    _, prep = open_run(run, CFG, resume=False)
    Federation(run, "hmoe", CFG, prep)
    coord = Coordinator(run, run.parent / "state.sqlite", "s", min_devices=1)
    try:
        dev = coord.enroll("s")["device_id"]
        a = coord.assignment(dev, [10] * 10)
        version, weights = coord.current_weights(a["expert"])
        return {"manifest": coord.manifest(), "assignment": a, "weights": weights, "version": version}
    finally:
        coord.close()


class Hostile:
    """A fake coordinator: honest except for what ``mode`` changes; it records every request."""

    def __init__(self, real: dict) -> None:
        self.real, self.mode, self.requests = real, "honest", []
        app = FastAPI()

        @app.api_route("/{path:path}", methods=["GET", "POST"])
        async def any_path(path: str, request: Request):
            self.requests.append(f"{request.method} {request.url.path}")
            return await self.answer(request.method, "/" + path, request)

        self.url, self.server, self.thread = serve_in_thread(app)

    async def answer(self, method: str, path: str, request: Request):
        m, a = self.mode, dict(self.real["assignment"])
        if path == "/enroll":
            return JSONResponse({"device_id": "dev", "token": "tok"})
        if path == "/manifest":
            if m == "a huge expert in the manifest":   # declares the assigned expert 4,096 channels wide
                manifest = json.loads(json.dumps(self.real["manifest"]))
                for entry in manifest["experts"].values() if isinstance(manifest["experts"], dict) \
                        else manifest["experts"]:
                    entry["net"]["width"], entry["net"]["hidden"] = 4096, 16384
                return JSONResponse(manifest)
            return JSONResponse({"hierarchy": "nope"} if m == "bad manifest" else self.real["manifest"])
        if path == "/assignment":
            changes = {"epochs a million": {"hyperparameters": {**a["hyperparameters"], "epochs": 1_000_000}},
                       "lr 1e6": {"hyperparameters": {**a["hyperparameters"], "lr": 1e6}},
                       "round not an integer": {"round": "zero"}, "round too large": {"round": 2**70},
                       "expert escapes the URL": {"expert": "root/../../enroll?x="},
                       "unknown hyper-parameter": {"hyperparameters": {**a["hyperparameters"], "knob": 1}},
                       "more samples than the device holds": {"samples": 10**9},
                       "seed is a string": {"seed": "7"}}
            if m in changes:
                return JSONResponse({**a, **changes[m]})
            if m == "no expert":
                return JSONResponse({k: v for k, v in a.items() if k != "expert"})
            if m == "not JSON":
                return Response(b"<html>proxy error</html>", media_type="text/html")
            if m == "a JSON list":
                return JSONResponse([1, 2, 3])
            if m == "deeply nested":
                return Response(b"[" * 100_000 + b"]" * 100_000, media_type="application/json")
            if m == "trickled":
                async def trickle():
                    for byte in json.dumps(a).encode():
                        yield bytes([byte])
                        await asyncio.sleep(0.5)
                return StreamingResponse(trickle(), media_type="application/json")
            if m == "silent" or (m == "silent once" and self.requests.count("GET /assignment") == 1):
                await asyncio.sleep(30)
            if m == "huge assignment":
                async def endless():
                    for _ in range(4096):
                        yield b" " * 65536
                return StreamingResponse(endless(), media_type="application/json")
            return JSONResponse(a)
        if path.startswith("/weights/"):
            data = self.real["weights"]
            w = load(data)
            if m in ("a gigabyte of weights", "a huge expert in the manifest"):
                async def gigabyte():
                    for _ in range(16384):
                        yield b"\0" * 65536
                return StreamingResponse(gigabyte(), media_type="application/octet-stream",
                                         headers=self.headers(data))
            if m == "weights times 1e6":
                data = save({k: v * np.float32(1e6) + np.float32(1e5) for k, v in w.items()})
            elif m == "NaN weights":
                data = save({k: np.full_like(v, np.nan) for k, v in w.items()})
            elif m == "wrong shape":
                data = save({k: np.zeros((3, 3), np.float32) for k in w})
            elif m == "corrupt safetensors":
                data = b"\x10\0\0\0\0\0\0\0{not json at all" + data[24:]
            body, headers = data, self.headers(data)
            if m == "checksum mismatch":
                headers["X-Weights-SHA256"] = hashlib.sha256(b"other").hexdigest()
            if m == "other version":
                headers["X-Weights-Version"] = str(self.real["version"] + 7)
            if m == "no checksum":
                del headers["X-Weights-SHA256"]
            return Response(body, media_type="application/octet-stream", headers=headers)
        if path == "/update":
            await request.body()
            return JSONResponse({"accepted": True, "duplicate": False})
        return JSONResponse({"detail": "no such path"}, status_code=404)

    def headers(self, data: bytes) -> dict:
        return {"X-Expert": self.real["assignment"]["expert"], "X-Weights-Version": str(self.real["version"]),
                "X-Weights-SHA256": hashlib.sha256(data).hexdigest()}

    def stop(self) -> None:
        self.server.should_exit = True
        self.server.force_exit = True   # the silent handler sleeps 30 s: do not wait for it
        self.thread.join(10)


@pytest.fixture(scope="module")
def hostile(real):
    h = Hostile(real)
    yield h
    h.stop()


@pytest.fixture
def device_data(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "data.npz"
    np.savez(path, images=rng.integers(0, 256, (100, 28, 28), dtype=np.uint8), labels=np.arange(100) % 10)
    return path


BAD = {   # mode -> what the one line must say
    "epochs a million": "epochs 1e+06 is over this device's bound",
    "lr 1e6": "lr",
    "round not an integer": "field 'round' is str",
    "round too large": "field 'round' is",
    "expert escapes the URL": "not an expert of the manifest",
    "unknown hyper-parameter": "knob",
    "more samples than the device holds": "field 'samples'",
    "seed is a string": "field 'seed' is str",
    "no expert": "field 'expert' is missing",
    "not JSON": "reply is not JSON",
    "a JSON list": "expected an object",
    "deeply nested": "reply is not JSON",
    "trickled": "not complete within 3 s",
    "silent": "no byte of the reply",
    "huge assignment": "this device takes at most",
    "a gigabyte of weights": "this device takes at most",
    "weights times 1e6": "this device takes at most 10000",
    "NaN weights": "NaN",
    "wrong shape": "expected float32",
    "corrupt safetensors": "not a safetensors file",
    "checksum mismatch": "SHA-256",
    "no checksum": "SHA-256",
    "other version": "X-Weights-Version",
    "bad manifest": "GET /manifest",
    "a huge expert in the manifest": "this device takes at most",
}


@pytest.mark.parametrize("mode", list(BAD))
def test_a_bad_reply_is_one_clear_line_in_bounded_time_and_memory(hostile, device_data, tmp_path, mode):
    state = tmp_path / "dev.json"
    write_text_atomic(state, json.dumps({"device_id": "dev", "token": "tok", "last_round": -1}), mode=0o600)
    before = state.read_bytes()
    hostile.mode, hostile.requests[:] = mode, []
    rss = psutil.Process().memory_info().rss
    t = time.monotonic()
    with pytest.raises(SyncError) as err:
        sync(hostile.url, "secret", device_data, None, rounds=1, state_file=state, log=lambda *_: None,
             bounds=BOUNDS)
    seconds = time.monotonic() - t
    message = str(err.value)
    print(f"{mode}: {seconds:.1f} s, {message}")
    assert "\n" not in message and message.startswith(hostile.url), message
    assert BAD[mode] in message, message
    assert seconds < 12, seconds   # the reply deadline (3 s) and silence bound (1.5 s) with slack
    assert psutil.Process().memory_info().rss - rss < 200 * 2**20   # a gigabyte offered, never held
    assert state.read_bytes() == before   # the last good state is kept
    allowed = {"GET /manifest", "GET /assignment", f"GET /weights/{hostile.real['assignment']['expert']}"}
    assert set(hostile.requests) <= allowed, hostile.requests   # no request it did not mean to send
    if mode == "a huge expert in the manifest":   # refused by the device's own limit, before a byte is fetched
        assert not any(r.startswith("GET /weights/") for r in hostile.requests), hostile.requests


def test_an_honest_reply_trains_and_sends(hostile, device_data, tmp_path):
    hostile.mode, hostile.requests[:] = "honest", []
    assert sync(hostile.url, "secret", device_data, None, rounds=1, state_file=tmp_path / "dev.json",
                log=lambda *_: None, bounds=BOUNDS) == 1
    assert hostile.requests[0] == "POST /enroll" and hostile.requests[-1] == "POST /update"


def test_a_silent_reply_is_asked_again_then_named(hostile, device_data, tmp_path):
    """A coordinator silent for one reply (busy aggregating) costs a retry, not the sync; one
    that stays silent is named after three tries."""
    hostile.mode, hostile.requests[:] = "silent once", []
    assert sync(hostile.url, "secret", device_data, None, rounds=1, state_file=tmp_path / "dev.json",
                log=lambda *_: None, bounds=BOUNDS) == 1
    assert hostile.requests.count("GET /assignment") == 2 and hostile.requests[-1] == "POST /update"
    hostile.mode, hostile.requests[:] = "silent", []
    with pytest.raises(SyncError, match=r"GET /assignment: no byte of the reply for 1.5 s \(3 tries\)"):
        sync(hostile.url, "secret", device_data, None, rounds=1, state_file=tmp_path / "dev.json",
             log=lambda *_: None, bounds=BOUNDS)
    assert hostile.requests.count("GET /assignment") == 3


def test_the_token_file_is_never_readable_by_others(hostile, device_data, tmp_path, monkeypatch):
    """The state file (it holds the device token) is 0600 from its first byte: every file the
    device writes it through is 0600 before the rename that makes it the state file."""
    seen = []
    real_replace = os.replace

    def checked_replace(src, dst):
        seen.append(stat.S_IMODE(os.stat(src).st_mode))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", checked_replace)
    old_umask = os.umask(0)   # the widest umask: nothing may rely on it
    try:
        hostile.mode = "honest"
        sync(hostile.url, "secret", device_data, None, rounds=1, state_file=tmp_path / "dev.json",
             log=lambda *_: None, bounds=BOUNDS)
    finally:
        os.umask(old_umask)
    assert seen and all(mode == 0o600 for mode in seen), [oct(m) for m in seen]
    assert stat.S_IMODE((tmp_path / "dev.json").stat().st_mode) == 0o600
