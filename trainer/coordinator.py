"""The coordinator: real devices enrol, fetch their assignment and weights, push updates;
one expert per round, aggregated with the simulation's own strategy and FedAvg.

State lives in SQLite (WAL, synchronous=FULL: a committed row survives kill -9);
weights and accepted updates are files written atomically *before* the transaction
that refers to them commits, so an acknowledged update is never lost and a crash
between the two leaves only an orphan file.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import sqlite3
import threading
import time
from pathlib import Path

import numpy as np
from fastapi import FastAPI, HTTPException, Request, Response
from safetensors import SafetensorError
from safetensors.numpy import load, load_file, save

from hierarchy import Hierarchy
from hierarchy.tree import write_bytes_atomic
from trainer.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from trainer.fedavg import Weights
from trainer.simulation import load_run_config
from trainer.strategy import Strategy, make_tasks

MAX_UPDATE_BYTES = 16 * 1024 * 1024
MAX_SAMPLES = 10_000_000

SCHEMA = """
CREATE TABLE IF NOT EXISTS devices (id TEXT PRIMARY KEY, token_hash TEXT NOT NULL, name TEXT, created REAL);
CREATE TABLE IF NOT EXISTS rounds (round INTEGER PRIMARY KEY, expert TEXT NOT NULL, base_version INTEGER NOT NULL,
    started REAL NOT NULL, deadline REAL NOT NULL, aggregated REAL);
CREATE TABLE IF NOT EXISTS updates (id INTEGER PRIMARY KEY AUTOINCREMENT, round INTEGER NOT NULL,
    device TEXT NOT NULL, expert TEXT NOT NULL, idem_key TEXT NOT NULL UNIQUE, samples INTEGER NOT NULL,
    metrics TEXT, file TEXT NOT NULL, received REAL NOT NULL, UNIQUE(round, device));
CREATE TABLE IF NOT EXISTS versions (expert TEXT NOT NULL, version INTEGER NOT NULL, file TEXT NOT NULL,
    round INTEGER, PRIMARY KEY (expert, version));
"""


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class Coordinator:
    """Round logic over SQLite; the HTTP layer (``create_app``) is a thin shell around it."""

    def __init__(self, run_dir: str | os.PathLike, db: str | os.PathLike, secret: str, min_updates: int = 2,
                 round_seconds: float = 600.0, clients_hint: int = 20) -> None:
        self.run_dir = Path(run_dir)
        self.cfg = load_run_config(self.run_dir)
        self.tree = Hierarchy.from_json(self.run_dir / "hierarchy.json")
        self.secret, self.min_updates, self.round_seconds = secret, min_updates, round_seconds
        shape = self._input_shape()
        self.tasks = make_tasks(self.tree, "hmoe", shape, self.cfg.expert_width, self.cfg.depth)
        self.strategy = Strategy(self.tree, self.tasks, self.cfg.schedule, self.cfg.seed,
                                 max(clients_hint, 1), 1, 0.0)
        self.store = self.run_dir / "coordinator"
        self.last_aggregation: dict | None = None
        self._manifest: dict | None = None
        self.lock = threading.RLock()
        self.db = sqlite3.connect(str(db), check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(SCHEMA)
        self._bootstrap()
        self.expected = {k: {n: (tuple(a.shape), a.dtype) for n, a in self._initial(k).items()} for k in self.tasks}

    # ------------------------------------------------------------- set-up
    def _input_shape(self) -> tuple[int, int, int]:
        for f in sorted((self.run_dir / "experts").glob("*.safetensors")):
            _, cfg, _ = load_checkpoint(f)
            return tuple(cfg.in_shape)
        raise FileNotFoundError(f"{self.run_dir}: no expert checkpoints; train or initialise the run first")

    def _initial(self, key: str) -> Weights:
        weights, _, _ = load_checkpoint(self._checkpoint_path(key))
        return weights

    def _bootstrap(self) -> None:
        with self.lock:
            if self.db.execute("SELECT COUNT(*) FROM versions").fetchone()[0] == 0:
                for key in self.tasks:
                    path = self.store / "weights" / f"{self.tasks[key].file_stem}-v0.safetensors"
                    write_bytes_atomic(path, save(self._initial(key)))
                    self.db.execute("INSERT INTO versions VALUES (?, 0, ?, NULL)", (key, path.name))
            if self.db.execute("SELECT COUNT(*) FROM rounds").fetchone()[0] == 0:
                self._open_round(0)
            self._repair_checkpoints()
        self.tick()

    def _checkpoint_path(self, key: str) -> Path:
        return self.run_dir / "experts" / f"{self.tasks[key].file_stem}.safetensors"

    def _write_checkpoint(self, key: str, weights: Weights, rnd: int) -> None:
        save_checkpoint(self._checkpoint_path(key), weights, self.tasks[key].net, {"node": key, "round": f"fleet-{rnd}"})

    def _repair_checkpoints(self) -> list[str]:
        """Bring the run directory's checkpoints up to the latest committed versions.

        A crash after a new version's commit but before its copy to the run directory
        leaves that copy one version behind; on start-up, copy it again."""
        repaired = []
        for key in self.tasks:
            row = self.db.execute("SELECT file, round FROM versions WHERE expert = ? ORDER BY version DESC LIMIT 1",
                                  (key,)).fetchone()
            if row is None or row[1] is None:   # version 0: the run directory's own weights
                continue
            try:
                meta = load_checkpoint(self._checkpoint_path(key))[2]
            except CheckpointError:
                meta = {}
            if meta.get("round") != f"fleet-{row[1]}":
                self._write_checkpoint(key, load_file(str(self.store / "weights" / row[0])), row[1])
                repaired.append(key)
        return repaired

    def _open_round(self, rnd: int) -> None:
        expert = self.strategy.choose_task(rnd)
        now = time.time()
        self.db.execute("INSERT INTO rounds VALUES (?, ?, ?, ?, ?, NULL)",
                        (rnd, expert, self.version(expert), now, now + self.round_seconds))

    # ------------------------------------------------------------- queries
    def version(self, expert: str) -> int:
        return self.db.execute("SELECT MAX(version) FROM versions WHERE expert = ?", (expert,)).fetchone()[0]

    def weights_file(self, expert: str, version: int | None = None) -> Path:
        version = self.version(expert) if version is None else version
        row = self.db.execute("SELECT file FROM versions WHERE expert = ? AND version = ?", (expert, version)).fetchone()
        return self.store / "weights" / row[0]

    def current(self) -> dict:
        r = self.db.execute("SELECT round, expert, base_version, deadline FROM rounds WHERE aggregated IS NULL "
                            "ORDER BY round DESC LIMIT 1").fetchone()
        return {"round": r[0], "expert": r[1], "weights_version": r[2], "deadline": r[3]}

    def status(self) -> dict:
        with self.lock:
            cur = self.current()
            n = self.db.execute("SELECT COUNT(*) FROM updates WHERE round = ?", (cur["round"],)).fetchone()[0]
            versions = {k: self.version(k) for k in self.tasks}
            done = self.db.execute("SELECT COUNT(*) FROM rounds WHERE aggregated IS NOT NULL").fetchone()[0]
            total = self.db.execute("SELECT COUNT(*) FROM updates").fetchone()[0]
        return {**cur, "updates_received": n, "min_updates": self.min_updates, "versions": versions,
                "rounds_aggregated": done, "updates_total": total, "last_aggregation": self.last_aggregation}

    def assignment(self) -> dict:
        self.tick()
        with self.lock:
            cur = self.current()
        node = self.tree.index(cur["expert"])
        return {**cur, "children": [self.tree.names[c] for c in self.tree.children(node)],
                "hyperparameters": self.cfg.local_for_round("hmoe", cur["round"]).to_dict()}

    def manifest(self) -> dict:
        """What a device needs to train any expert: hierarchy, input spec, network configs."""
        if self._manifest is None:
            self._manifest = self._build_manifest()
        return self._manifest

    def _build_manifest(self) -> dict:
        from trainer.datasets import load_dataset
        shape = list(self._input_shape())
        try:
            data = load_dataset(self.cfg.dataset, self.cfg.data_root, download=False)
            norm = {"mean": list(data.mean), "std": list(data.std), "color": data.color}
        except FileNotFoundError:
            c = shape[0]
            norm = {"mean": [0.5] * c, "std": [0.25] * c, "color": "L" if c == 1 else "RGB"}
        return {"format_version": 1, "hierarchy": self.tree.to_dict(),
                "input": {"shape": shape, **norm},
                "experts": [{"node": k, "children": [self.tree.names[c] for c in self.tree.children(t.node)],
                             "file": "", "sha256": "", "params": 0, "bytes": 0, "opset": 0,
                             "net": json.loads(t.net.to_json())} for k, t in self.tasks.items()],
                "flat": None}

    # ------------------------------------------------------------- devices
    def enroll(self, secret: str, name: str = "") -> dict:
        if not hmac.compare_digest(secret.encode(), self.secret.encode()):
            raise PermissionError("wrong enrolment secret")
        device, token = secrets.token_hex(8), secrets.token_urlsafe(24)
        with self.lock:
            self.db.execute("INSERT INTO devices VALUES (?, ?, ?, ?)", (device, _hash(token), name, time.time()))
        return {"device_id": device, "token": token}

    def device_for(self, token: str) -> str | None:
        row = self.db.execute("SELECT id FROM devices WHERE token_hash = ?", (_hash(token),)).fetchone()
        return row[0] if row else None

    # ------------------------------------------------------------- updates
    def check_update(self, expert: str, body: bytes) -> Weights:
        """Parse and validate an update's tensors; raises ValueError (-> 422)."""
        try:
            weights = load(body)
        except (SafetensorError, ValueError, OSError, TypeError) as exc:
            raise ValueError(f"body is not a safetensors file ({exc})") from None
        want = self.expected[expert]
        missing, extra = sorted(set(want) - set(weights)), sorted(set(weights) - set(want))
        if missing or extra:
            raise ValueError(f"tensor names differ from expert {expert!r}: missing {missing[:3]}, extra {extra[:3]}")
        for name, arr in weights.items():
            shape, dtype = want[name]
            if tuple(arr.shape) != shape or arr.dtype != dtype:
                raise ValueError(f"tensor {name!r} is {arr.dtype}{list(arr.shape)}; expected {dtype}{list(shape)}")
            if not np.all(np.isfinite(arr)):
                raise ValueError(f"tensor {name!r} holds NaN or infinite values")
        return weights

    def submit(self, device: str, rnd: int, expert: str, base_version: int, samples: int, idem_key: str,
               metrics: dict, body: bytes) -> dict:
        """Accept an update once. Raises ValueError (422) or LookupError (409)."""
        if not idem_key or len(idem_key) > 128:
            raise ValueError("an idempotency key of 1 to 128 characters is required")
        if not 1 <= samples <= MAX_SAMPLES:
            raise ValueError(f"sample count {samples}; expected 1 to {MAX_SAMPLES}")
        with self.lock:
            dup = self.db.execute("SELECT round, expert FROM updates WHERE idem_key = ?", (idem_key,)).fetchone()
            if dup:
                return {"accepted": True, "duplicate": True, "round": dup[0], "expert": dup[1]}
            cur = self.current()
            if rnd != cur["round"]:
                raise LookupError(f"update for round {rnd}; the current round is {cur['round']}")
            if expert != cur["expert"]:
                raise LookupError(f"update for expert {expert!r}; round {rnd} trains {cur['expert']!r}")
            if base_version != cur["weights_version"]:
                raise LookupError(f"update from weights version {base_version}; round {rnd} started from "
                                  f"version {cur['weights_version']}")
            if self.db.execute("SELECT 1 FROM updates WHERE round = ? AND device = ?", (rnd, device)).fetchone():
                raise LookupError(f"device {device} already sent an update for round {rnd}")
        self.check_update(expert, body)
        path = self.store / "updates" / f"r{rnd:05d}-{device}-{hashlib.sha256(idem_key.encode()).hexdigest()[:12]}.safetensors"
        write_bytes_atomic(path, body)
        with self.lock:
            try:
                self.db.execute("INSERT INTO updates (round, device, expert, idem_key, samples, metrics, file, received) "
                                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)", (rnd, device, expert, idem_key, samples,
                                                                    json.dumps(metrics), path.name, time.time()))
            except sqlite3.IntegrityError:
                return {"accepted": True, "duplicate": True, "round": rnd, "expert": expert}
        self.tick()
        return {"accepted": True, "duplicate": False, "round": rnd, "expert": expert}

    def round_updates(self, rnd: int) -> list[tuple[Weights, int]]:
        rows = self.db.execute("SELECT file, samples FROM updates WHERE round = ? ORDER BY id", (rnd,)).fetchall()
        return [(load_file(str(self.store / "updates" / f)), n) for f, n in rows]

    def tick(self) -> None:
        """Aggregate the current round when enough updates arrived or its deadline passed."""
        with self.lock:
            cur = self.current()
            n = self.db.execute("SELECT COUNT(*) FROM updates WHERE round = ?", (cur["round"],)).fetchone()[0]
            if n < self.min_updates and not (time.time() >= cur["deadline"]):
                return
            key, rnd = cur["expert"], cur["round"]
            started = time.perf_counter()
            if n:
                new = self.strategy.aggregate(self.round_updates(rnd))
                version = cur["weights_version"] + 1
                path = self.store / "weights" / f"{self.tasks[key].file_stem}-v{version}.safetensors"
                write_bytes_atomic(path, save(new))
            self.db.execute("BEGIN IMMEDIATE")
            try:
                if n:
                    self.db.execute("INSERT OR REPLACE INTO versions VALUES (?, ?, ?, ?)", (key, version, path.name, rnd))
                self.db.execute("UPDATE rounds SET aggregated = ? WHERE round = ?", (time.time(), rnd))
                self._open_round(rnd + 1)
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            self.last_aggregation = {"round": rnd, "updates": n, "seconds": time.perf_counter() - started}
            if n:  # the run directory's checkpoint follows, so `hmoe export --run` exports the fleet's result
                self._write_checkpoint(key, new, rnd)


def create_app(coord: Coordinator, max_update_bytes: int = MAX_UPDATE_BYTES) -> FastAPI:
    app = FastAPI(title="hmoe coordinator", description="Federated rounds of one expert each, over HTTP.")
    app.state.coordinator = coord

    def device(request: Request) -> str:
        header = request.headers.get("authorization", "")
        if not header.lower().startswith("bearer "):
            raise HTTPException(401, "missing bearer token; enrol with POST /enroll",
                                headers={"WWW-Authenticate": "Bearer"})
        found = coord.device_for(header[7:].strip())
        if found is None:
            raise HTTPException(403, "unknown device token")
        return found

    @app.post("/enroll")
    async def enroll(request: Request) -> dict:
        try:
            body = await request.json()
            secret = str(body["secret"])
        except (ValueError, KeyError, TypeError):
            raise HTTPException(422, "expected JSON {\"secret\": \"...\", \"name\": \"...\"}") from None
        try:
            return coord.enroll(secret, str(body.get("name", "")))
        except PermissionError as exc:
            raise HTTPException(403, str(exc)) from None

    @app.get("/assignment")
    def assignment(request: Request) -> dict:
        device(request)
        return coord.assignment()

    @app.get("/manifest")
    def manifest(request: Request) -> dict:
        device(request)
        return coord.manifest()

    @app.get("/weights/{expert}")
    def weights(expert: str, request: Request) -> Response:
        device(request)
        if expert not in coord.tasks:
            raise HTTPException(404, f"unknown expert {expert!r}; experts are {', '.join(coord.tasks)}")
        with coord.lock:
            version = coord.version(expert)
            data = coord.weights_file(expert, version).read_bytes()
        return Response(data, media_type="application/octet-stream",
                        headers={"X-Weights-Version": str(version), "X-Expert": expert})

    @app.post("/update")
    async def update(request: Request) -> dict:
        dev = device(request)
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > max_update_bytes:
            raise HTTPException(413, f"update of {length} bytes; the limit is {max_update_bytes}")
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_update_bytes:
                raise HTTPException(413, f"update larger than the limit of {max_update_bytes} bytes")
        h = request.headers
        try:
            rnd, base, samples = int(h["x-round"]), int(h["x-base-version"]), int(h["x-samples"])
            expert, key = h["x-expert"], h["x-idempotency-key"]
            metrics = json.loads(h.get("x-metrics", "{}"))
            if not isinstance(metrics, dict):
                raise ValueError("X-Metrics must be a JSON object")
        except (KeyError, ValueError) as exc:
            raise HTTPException(422, f"bad or missing update headers ({exc}); expected X-Round, X-Expert, "
                                     "X-Base-Version, X-Samples, X-Idempotency-Key and optional X-Metrics") from None
        if expert not in coord.tasks:
            raise HTTPException(409, f"unknown expert {expert!r}")
        try:
            return coord.submit(dev, rnd, expert, base, samples, key, metrics, body)
        except LookupError as exc:
            raise HTTPException(409, str(exc)) from None
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from None

    @app.get("/status")
    def status() -> dict:
        coord.tick()
        return coord.status()

    return app
