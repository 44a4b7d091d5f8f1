"""The coordinator: the round driver over HTTP for devices that have only an HTTP client.

It moves messages and decides nothing: who trains which expert in a round, each device's
hyper-parameters and seed, which replies count, how updates combine and the schedule's
state all come from ``trainer.protocol.driver`` and the run's ``Strategy``, exactly as in
the simulation. No torch is loaded (aggregation is numpy), except by a schedule that reads
validation errors, which validates each new expert on the run's validation split, and by
``--trust-reference`` (FLTrust), which trains each round's tasks once on that split.

State lives in SQLite (WAL, synchronous=FULL: a committed row survives kill -9 and power
loss). Accepted updates are appended to one log file per round and new expert versions
are files written atomically, both flushed to disk *before* the transaction that refers
to them commits (a crash in between leaves only unreferenced bytes). One writer thread makes every change:
request threads queue their writes, the writer runs them in batches, one transaction (one
fsync) a batch, and answers each request only after its batch committed (group commit).
So an acknowledged update is never lost, checking that a round is open and storing an
update are one step in the thread that closes rounds (an acknowledged update is always
in its round's aggregate), and reads never wait behind writes (WAL snapshots, memory).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import queue
import secrets
import sqlite3
import threading
import time
from concurrent.futures import Future
from pathlib import Path

import numpy as np
from safetensors.numpy import load, load_file, save

from hierarchy.errors import HmoeError
from hierarchy.manifest import Manifest, ModelEntry
from hierarchy.tree import write_bytes_atomic
from trainer.transports.coordinator.admission import AdmissionError, Limits, PeerBuckets, Secrets, TokenBucket
from trainer.protocol.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from trainer.device.config import Weights
from trainer.protocol.driver import ClientSampler, RoundDriver, RoundPlan, RunStore, config_dict
from trainer.protocol.fleet import run_fleet
from trainer.protocol.messages import Answer, ClientMetrics, InvalidMetrics
from trainer.protocol.run import load_strategy_state, run_files
from trainer.protocol.strategy import StrategyError, trunk_owner

logger = logging.getLogger("hmoe.coordinator")
KEEP_UPDATE_ROUNDS = 2   # committed rounds whose update bodies stay on disk (about 0.4 MB per device and round)

UPDATE_SLACK = 4096      # bytes an update may carry beyond its tensors (the safetensors header)
MAX_BATCH = 512          # writes committed together by the writer thread
MAX_CLOSES = 64          # rounds closed after one batch at most

SCHEMA = """
CREATE TABLE IF NOT EXISTS devices (id TEXT PRIMARY KEY, idx INTEGER NOT NULL UNIQUE, token_hash TEXT NOT NULL,
    name TEXT, created REAL);
CREATE TABLE IF NOT EXISTS rounds (round INTEGER PRIMARY KEY, expert TEXT NOT NULL, base_version INTEGER NOT NULL,
    started REAL NOT NULL, deadline REAL NOT NULL, aggregated REAL);
CREATE TABLE IF NOT EXISTS updates (id INTEGER PRIMARY KEY AUTOINCREMENT, round INTEGER NOT NULL,
    device TEXT NOT NULL, expert TEXT NOT NULL, idem_key TEXT NOT NULL, samples INTEGER NOT NULL,
    hyperparameters TEXT NOT NULL, metrics TEXT, offset INTEGER NOT NULL, length INTEGER NOT NULL,
    received REAL NOT NULL,
    UNIQUE(round, device), UNIQUE(device, idem_key));
CREATE TABLE IF NOT EXISTS excused (round INTEGER NOT NULL, device TEXT NOT NULL, reason TEXT NOT NULL,
    PRIMARY KEY (round, device));
CREATE TABLE IF NOT EXISTS versions (expert TEXT NOT NULL, version INTEGER NOT NULL, file TEXT NOT NULL,
    round INTEGER, PRIMARY KEY (expert, version));
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS counts (device TEXT PRIMARY KEY, counts TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS plans (round INTEGER PRIMARY KEY, plan TEXT NOT NULL, counts TEXT NOT NULL, entry TEXT);
CREATE TABLE IF NOT EXISTS enrol_tokens (hash TEXT PRIMARY KEY, created REAL NOT NULL, note TEXT, used_by TEXT,
    used REAL);
"""


def open_db(db: str | os.PathLike) -> sqlite3.Connection:
    """The coordinator's database with its schema (created, or brought up to date)."""
    con = _connect(db)
    con.executescript(SCHEMA)
    if "revoked" not in {row[1] for row in con.execute("PRAGMA table_info(devices)")}:
        con.execute("ALTER TABLE devices ADD COLUMN revoked REAL")
    return con


def issue_enrol_tokens(db: str | os.PathLike, count: int, note: str = "") -> list[str]:
    """``count`` one-time enrolment tokens (each enrols one device, once), stored hashed; the
    coordinator may be running. Returns the tokens: the only time they are seen."""
    if not 1 <= count <= 100_000:
        raise CoordinatorError(f"count {count}: expected 1 to 100000 tokens")
    tokens = [secrets.token_urlsafe(24) for _ in range(count)]
    con = open_db(db)
    try:
        with con:
            con.execute("BEGIN IMMEDIATE")
            con.executemany("INSERT INTO enrol_tokens (hash, created, note) VALUES (?, ?, ?)",
                            [(_hash(t), time.time(), note[:200]) for t in tokens])
    finally:
        con.close()
    return tokens


def list_devices(db: str | os.PathLike) -> list[dict]:
    con = open_db(db)
    try:
        return [{"device_id": d, "index": i, "name": n, "enrolled": c, "revoked": r} for d, i, n, c, r in
                con.execute("SELECT id, idx, name, created, revoked FROM devices ORDER BY idx")]
    finally:
        con.close()


def revoke_device(db: str | os.PathLike, device: str) -> None:
    """The device's token stops working (403) within a second, running coordinator or not;
    its samples leave the next plan. Its index stays taken (client indices never move)."""
    con = open_db(db)
    try:
        with con:
            con.execute("BEGIN IMMEDIATE")
            if con.execute("UPDATE devices SET revoked = ? WHERE id = ? AND revoked IS NULL",
                           (time.time(), device)).rowcount == 0:
                known = con.execute("SELECT revoked FROM devices WHERE id = ?", (device,)).fetchone()
                raise CoordinatorError(f"device {device!r} was already revoked" if known else
                                       f"no device {device!r} in {db}")
    finally:
        con.close()



def server_file(weights_file: Path) -> Path:
    """Where a stored weights version keeps the server optimizer's moments after it."""
    return weights_file.with_name(weights_file.stem + ".server.safetensors")

class _Bridge:
    """Event-loop waiters of the writer's futures, woken once a batch: one cross-thread wake-up
    for a whole group commit instead of one per request (``asyncio.wrap_future`` costs a
    wake-up each, which measured 8% of the coordinator's time under 1,000 devices)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.waiting: dict[int, tuple] = {}

    @staticmethod
    def _copy(pairs: list) -> None:
        for done, waiter in pairs:
            if waiter.cancelled():
                continue
            exc = done.exception()
            if exc is not None:
                waiter.set_exception(exc)
            else:
                waiter.set_result(done.result())

    def awaitable(self, done: Future, loop):
        waiter = loop.create_future()
        with self.lock:
            if not done.done():
                self.waiting[id(done)] = (done, loop, waiter)
                return waiter
        self._copy([(done, waiter)])
        return waiter

    def settle(self, futures: list[Future]) -> None:
        """After the writer completed ``futures``: wake their waiters, one call per event loop."""
        by_loop: dict = {}
        with self.lock:
            for done in futures:
                found = self.waiting.pop(id(done), None)
                if found is not None:
                    by_loop.setdefault(found[1], []).append((done, found[2]))
        for loop, pairs in by_loop.items():
            loop.call_soon_threadsafe(self._copy, pairs)


class CoordinatorError(HmoeError):
    """The coordinator cannot start as asked (its database disagrees with the run or the flags)."""


class InvalidUpdate(HmoeError, ValueError):
    """An update that can never be accepted (malformed, wrong tensors, other hyper-parameters): 422."""


class StaleUpdate(HmoeError, LookupError):
    """An update for a round or weights version that is no longer current, or a second one: 409."""


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


SAFETENSORS_DTYPES = {"F16": np.float16, "F32": np.float32, "F64": np.float64, "BF16": None, "I8": np.int8,
                      "I16": np.int16, "I32": np.int32, "I64": np.int64, "U8": np.uint8, "BOOL": np.bool_}


def parse_safetensors(body: bytes, max_header: int) -> Weights:
    """Read-only numpy views of a safetensors body's tensors (its format: 8-byte little-endian
    header size, JSON header of name -> dtype, shape, data_offsets, then the data)."""
    if len(body) < 8:
        raise InvalidUpdate("body is not a safetensors file (shorter than its 8-byte header size)")
    n = int.from_bytes(body[:8], "little")
    if n > max_header or n > len(body) - 8:
        raise InvalidUpdate(f"safetensors header of {n} bytes; expected at most {min(max_header, len(body) - 8)}")
    try:
        header = json.loads(body[8:8 + n])
    except (ValueError, RecursionError) as exc:
        raise InvalidUpdate(f"body is not a safetensors file (header: {exc.__class__.__name__})") from None
    if not isinstance(header, dict):
        raise InvalidUpdate("body is not a safetensors file (its header is not a JSON object)")
    header.pop("__metadata__", None)
    data = memoryview(body)[8 + n:]
    out = {}
    for name, info in header.items():
        try:
            dtype = np.dtype(SAFETENSORS_DTYPES[info["dtype"]])
            shape = [int(d) for d in info["shape"]]
            begin, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise InvalidUpdate(f"tensor {name!r}: malformed safetensors entry {str(info)[:100]}") from None
        if min(shape, default=0) < 0 or not 0 <= begin <= end <= len(data) or \
                end - begin != math.prod(shape) * dtype.itemsize:
            raise InvalidUpdate(f"tensor {name!r}: data offsets {begin}..{end} do not fit shape {shape} of {dtype}")
        out[str(name)] = np.frombuffer(data[begin:end], dtype=dtype).reshape(shape)
    return out


def _connect(db: str | os.PathLike) -> sqlite3.Connection:
    con = sqlite3.connect(str(db), check_same_thread=False, isolation_level=None, timeout=30)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("PRAGMA synchronous=FULL")
    return con


class Coordinator:
    """The round driver over SQLite for devices that speak HTTP; ``create_app`` is the HTTP shell.

    Rounds are the driver's: a round is planned (``RoundDriver.plan``: the seeded sample of the
    run's clients, each sampled device that has reported its samples reachable) once
    ``min_devices`` devices have reported their samples per label; every assigned device
    then gets its own task, hyper-parameters and seed (several experts a round with
    ``--assignment resource-aware``; fleet tiers with a fleet file), the others are excused
    with the plan's reason. A device's client index is its enrolment order, so the run's
    ``--clients`` bounds the fleet. The round closes when every assigned device has answered
    (an update or a decline) or its deadline passed; the driver aggregates, and the run
    directory gets the simulation's log and checkpoint layout."""

    def __init__(self, run_dir: str | os.PathLike, db: str | os.PathLike, secret: str | Secrets,
                 min_devices: int | None = None, round_seconds: float = 600.0, schedule: str | None = None,
                 limits: Limits = Limits(), keep_update_rounds: int | None = KEEP_UPDATE_ROUNDS) -> None:
        self.run_dir = Path(run_dir)
        self.cfg, self.tree, self.spec = run_files(self.run_dir)
        self.min_devices = self.cfg.clients if min_devices is None else min_devices
        if not 1 <= self.min_devices <= self.cfg.clients:
            raise CoordinatorError(f"min_devices must be in [1, {self.cfg.clients}] (the run's clients); got "
                                   f"{self.min_devices}")
        self.secrets = secret if isinstance(secret, Secrets) else Secrets(secret)
        self.limits, self._enrol_bucket = limits, TokenBucket(limits.enrol_per_second, limits.enrol_burst)
        self.round_seconds = round_seconds
        self.keep_update_rounds = keep_update_rounds   # committed rounds whose update bodies stay on disk
        self.tasks = self.cfg.tasks("hmoe", self.tree, self.spec.shape)
        self.trunk_owner = trunk_owner(self.tasks)
        strategy = self.cfg.strategy("hmoe", self.tree, self.tasks, schedule=schedule)
        try:
            fleet = run_fleet(self.run_dir, self.cfg.fleet, self.cfg.clients, self.cfg.seed, self.cfg.local)
        except HmoeError as exc:
            raise CoordinatorError(str(exc)) from None
        self.driver = RoundDriver(RunStore(self.run_dir, "hmoe", self.tasks), strategy, self.tree,
                                  ClientSampler(self.cfg.seed, self.cfg.clients, self.cfg.clients_per_round),
                                  {}, fleet, self._validation_error, self._reference)
        self.strategy = strategy
        self.expected = {k: t.net.param_shapes() for k, t in self.tasks.items()}
        self.store = self.run_dir / "coordinator"
        self.last_aggregation: dict | None = None
        self._validation = None
        self._weights_cache: dict[str, tuple[int, bytes]] = {}
        self.db = open_db(db)               # the writer's (and start-up's) connection
        self.db.execute("PRAGMA wal_autocheckpoint=0")   # checkpoint once a round, not while updates stream in
        self._reader = _connect(db)         # request threads read committed snapshots through this one
        self._read_lock = threading.Lock()
        self._failed = PeerBuckets(limits.failed_per_second, limits.failed_burst)
        self._revoked: set[str] = set()
        self._revoked_seen = (-1, 0.0)      # (the reader's data_version, when) of the last look
        self._jobs: queue.Queue = queue.Queue()
        self._bridge = _Bridge()
        self._after_commit: list = []
        self._logs: dict = {}
        self._bootstrap(Path(db))
        self._manifest = self._build_manifest()
        self._writer = threading.Thread(target=self._write_loop, name="coordinator-writer", daemon=True)
        self._writer.start()
        self.tick()

    # ------------------------------------------------------------- set-up
    def _bootstrap(self, db: Path) -> None:
        """Before the writer thread starts: nothing else touches the database yet."""
        saved = self.db.execute("SELECT value FROM meta WHERE key = 'strategy'").fetchone()
        self.driver.store.load_state()   # the run directory's log so far (weights come from the versions below)
        if saved is None:   # first start: the schedule's state as the run left it
            state = {**load_strategy_state(self.run_dir), "schedule": self.strategy.schedule_name}
            self.strategy.restore(state)
            self.db.execute("INSERT INTO meta VALUES ('strategy', ?)", (json.dumps(self.strategy.state()),))
        else:
            state = json.loads(saved[0])
            if state["schedule"] != self.strategy.schedule_name:
                raise CoordinatorError(f"{db} was created with schedule {state['schedule']!r}; this start asks "
                                       f"for {self.strategy.schedule_name!r}: restart with --schedule "
                                       f"{state['schedule']} or use a new --db")
            try:
                self.strategy.restore(state)
            except StrategyError as exc:
                raise CoordinatorError(f"{db}: {exc}") from None
        if self.db.execute("SELECT COUNT(*) FROM versions").fetchone()[0] == 0:
            for key in self.tasks:
                path = self.store / "weights" / f"{self.tasks[key].file_stem}-v0.safetensors"
                weights, _, _ = load_checkpoint(self._checkpoint_path(key))
                write_bytes_atomic(path, save(weights))
                self.db.execute("INSERT INTO versions VALUES (?, 0, ?, NULL)", (key, path.name))
        if self.db.execute("SELECT COUNT(*) FROM rounds").fetchone()[0] == 0:
            first = int(self.driver.store.state["completed_rounds"])   # the fleet continues the run's rounds
            self.db.execute("INSERT OR REPLACE INTO meta VALUES ('first_round', ?)", (str(first),))
            self._open_round(first)
        self._reload()
        self._repair_run_dir()

    def _reload(self) -> None:
        """Memory from the database: after start-up, and after a transaction that failed."""
        saved = self.db.execute("SELECT value FROM meta WHERE key = 'strategy'").fetchone()
        self.strategy.restore(json.loads(saved[0]))
        self._devices = {h: (d, i) for d, i, h in self.db.execute("SELECT id, idx, token_hash FROM devices")}
        self._revoked = {d for (d,) in self.db.execute("SELECT id FROM devices WHERE revoked IS NOT NULL")}
        self._index = {d: i for d, i in self._devices.values()}
        self._device_of = {i: d for d, i in self._index.items()}
        self._counts = {self._index[d]: np.asarray(json.loads(c), dtype=np.int64)
                        for d, c in self.db.execute("SELECT device, counts FROM counts") if d in self._index}
        self._versions = {k: self._version(self.db, k) for k in self.tasks}
        files = {k: self.store / "weights" / self.db.execute(
            "SELECT file FROM versions WHERE expert = ? AND version = ?", (k, v)).fetchone()[0]
            for k, v in self._versions.items()}
        self.driver.weights = {k: load_file(str(f)) for k, f in files.items()}
        for k, f in files.items():   # moments of versions this coordinator made (version 0's: the run's own)
            if server_file(f).exists():
                self.strategy.server_state[k] = load_file(str(server_file(f)))
        self._load_current()

    def _load_current(self) -> None:
        """The open round, its plan and who answered it, kept in memory so reads do not wait."""
        r = self.db.execute("SELECT round, expert, base_version, deadline FROM rounds WHERE aggregated IS NULL "
                            "ORDER BY round DESC LIMIT 1").fetchone()
        planned = self.db.execute("SELECT plan, counts FROM plans WHERE round = ?", (r[0],)).fetchone()
        plan = None
        if planned is not None:
            plan = RoundPlan.from_dict(json.loads(planned[0]))
            for idx, c in json.loads(planned[1]).items():   # the samples the plan was made with
                self.driver.use_counts(int(idx), np.asarray(c, dtype=np.int64))
        # one tuple, swapped in one assignment: request threads always read a round with its own plan
        self._round = ({"round": r[0], "expert": r[1], "weights_version": r[2],
                        "deadline": r[3] if planned is not None else None, "planned": planned is not None}, plan)
        self._keys = {d: (k, e) for d, k, e in
                      self.db.execute("SELECT device, idem_key, expert FROM updates WHERE round = ?", (r[0],))}
        self._answered_by = {d: Answer.UPDATE for d in self._keys}
        self._excused_why = dict(self.db.execute("SELECT device, reason FROM excused WHERE round = ?", (r[0],)))
        self._answered_by.update({d: Answer.EXCUSED for d in self._excused_why})

    @property
    def _current(self) -> dict:
        return self._round[0]

    @property
    def _plan(self) -> RoundPlan | None:
        return self._round[1]

    def _checkpoint_path(self, key: str) -> Path:
        return self.driver.store.checkpoint_path(key)

    def _repair_run_dir(self) -> list[str]:
        """Bring the run directory (log, versions, strategy state, checkpoints) up to what the
        database committed: a crash after a round's commit but before its files were written
        leaves them one round behind; on start-up, write them again. Returns the tasks whose
        checkpoints were rewritten."""
        store = self.driver.store
        first = int(self.db.execute("SELECT value FROM meta WHERE key = 'first_round'").fetchone()[0])
        entries = [json.loads(e) for (e,) in self.db.execute(
            "SELECT entry FROM plans WHERE entry IS NOT NULL ORDER BY round")]
        state = store.state
        log = [e for e in state["log"] if e["round"] < first] + entries
        repaired = []
        for key in self.tasks:
            row = self.db.execute("SELECT file, round FROM versions WHERE expert = ? ORDER BY version DESC LIMIT 1",
                                  (key,)).fetchone()
            if row[1] is None:   # version 0: the run directory's own weights
                continue
            state["versions"][key] = row[1]
            try:
                meta = load_checkpoint(self._checkpoint_path(key))[2]
            except CheckpointError:
                meta = {}
            if meta.get("round") != row[1]:
                save_checkpoint(self._checkpoint_path(key), load_file(str(self.store / "weights" / row[0])),
                                self.tasks[key].net, {"node": key, "round": row[1]})
                moments = server_file(self.store / "weights" / row[0])
                if moments.exists():
                    store.server_path(key).parent.mkdir(parents=True, exist_ok=True)
                    write_bytes_atomic(store.server_path(key), moments.read_bytes())
                repaired.append(key)
        if log != state["log"] or repaired:
            state.update(log=log, completed_rounds=first + len(entries), strategy=self.strategy.state())
            store.write_state()
        return repaired

    def _open_round(self, rnd: int) -> None:
        """A new round: its row (the schedule's task, a deadline set once it is planned), planned
        at once when enough devices have reported their samples."""
        expert = self.strategy.order(rnd)[0]
        self.db.execute("INSERT INTO rounds VALUES (?, ?, ?, ?, ?, NULL)",
                        (rnd, expert, self._version(self.db, expert), time.time(), math.inf))

    def _plan_round(self) -> None:
        """The driver plans the open round over the devices that reported their samples (writer thread)."""
        rnd = self._current["round"]
        revoked = {self._index[d] for d in self._revoked if d in self._index}
        counts = {i: c for i, c in self._counts.items() if i < self.cfg.clients and i not in revoked}
        for idx, c in counts.items():
            self.driver.use_counts(idx, c)
        plan = self.driver.plan(rnd, present=set(counts), simulate_dropout=False)
        now = time.time()
        self.db.execute("INSERT INTO plans VALUES (?, ?, ?, NULL)", (rnd, json.dumps(plan.to_dict()), json.dumps(
            {str(i): c.tolist() for i, c in counts.items()})))
        self.db.execute("UPDATE rounds SET expert = ?, base_version = ?, started = ?, deadline = ? WHERE round = ?",
                        (plan.first, self._version(self.db, plan.first), now, now + self.round_seconds, rnd))
        self._load_current()

    def _ready_to_plan(self) -> bool:
        return self._plan is None and sum(i < self.cfg.clients for i in self._counts) >= self.min_devices

    def _build_manifest(self) -> dict:
        """What a device needs to train any expert: hierarchy, the run's input spec, network configs
        (no ONNX files: a device that only trains never runs inference from this manifest)."""
        experts = {k: ModelEntry(k, [self.tree.names[c] for c in self.tree.children(t.node)], "", "", 0, 0, 0,
                                 json.loads(t.net.to_json())) for k, t in self.tasks.items()}
        return Manifest(self.tree, self.spec, experts, created_by="hmoe-edge coordinator",
                        source={"run": self.run_dir.name, "dataset": self.cfg.dataset}).to_dict()

    # ------------------------------------------------------------- queries
    @staticmethod
    def _version(con: sqlite3.Connection, expert: str) -> int:
        return con.execute("SELECT MAX(version) FROM versions WHERE expert = ?", (expert,)).fetchone()[0]

    def _read(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._read_lock:
            return self._reader.execute(sql, args).fetchall()

    def version(self, expert: str) -> int:
        """The latest committed version (the writer reads its own view with ``_version(self.db, ...)``)."""
        with self._read_lock:
            return self._version(self._reader, expert)

    def weights_file(self, expert: str, version: int | None = None) -> Path:
        version = self.version(expert) if version is None else version
        row = self._read("SELECT file FROM versions WHERE expert = ? AND version = ?", (expert, version))
        return self.store / "weights" / row[0][0]

    def current_weights(self, expert: str, with_digest: bool = False) -> tuple:
        """The expert's latest version and its safetensors bytes (read once per version), and
        with ``with_digest`` their SHA-256 in hex (a device checks what it received)."""
        version = self._versions[expert]
        cached = self._weights_cache.get(expert)
        if cached is None or cached[0] != version:
            data = self.weights_file(expert, version).read_bytes()
            cached = (version, data, hashlib.sha256(data).hexdigest())
            self._weights_cache[expert] = cached
        return cached if with_digest else cached[:2]

    def current(self) -> dict:
        return dict(self._round[0])

    def status(self) -> dict:
        cur, plan = self._round
        cur = dict(cur)
        n = self._read("SELECT COUNT(*) FROM updates WHERE round = ?", (cur["round"],))[0][0]
        done = self._read("SELECT COUNT(*) FROM rounds WHERE aggregated IS NOT NULL")[0][0]
        total = self._read("SELECT COUNT(*) FROM updates")[0][0]
        return {**cur, "updates_received": n, "answered": len(self._answered_by),
                "assigned": {str(c): k for c, k in plan.assigned.items()} if plan else None,
                "devices_reported": len(self._counts), "min_devices": self.min_devices,
                "versions": dict(self._versions), "rounds_aggregated": done, "updates_total": total,
                "schedule": self.strategy.schedule_name, "last_aggregation": self.last_aggregation}

    def manifest(self) -> dict:
        return self._manifest

    def answer_now(self, device: str, leaf_counts: list[int] | None = None, subtree: str | None = None
                   ) -> dict | None:
        """``assignment``'s answer when it needs no write (the counts are those recorded, and no
        new excusal): from memory, so the HTTP shell answers on its event loop without a
        thread. None: call ``assignment`` (in a thread; it waits for the writer)."""
        idx = self._index.get(device, -1)
        if subtree is not None and subtree not in self.tree._index:
            return None
        if leaf_counts is not None:
            known = self._counts.get(idx)
            if known is None or len(leaf_counts) != len(known) or any(int(a) != b for a, b in
                                                                       zip(leaf_counts, known.tolist())):
                return None
        out = self._answer(idx, subtree, device)
        if out["excused"] and device not in self._excused_why:
            return None
        return out

    def assignment(self, device: str | None = None, leaf_counts: list[int] | None = None,
                   excuse: bool = True, subtree: str | None = None) -> dict:
        """What the open round asks of a device: its task, the hyper-parameters and seed the plan
        gives it, or why it sits the round out (``excused``), or that the round waits for more
        devices to report their samples (``wait``).

        ``leaf_counts`` (the device's samples per label) are recorded first; the round is planned
        once ``min_devices`` devices have reported theirs. An excused device is recorded as such
        (here, or by the caller when ``excuse`` is False). A device that carries only a
        ``subtree`` (a personalised bundle) trains only experts inside it: a task outside it
        excuses the device likewise."""
        if subtree is not None and subtree not in self.tree._index:
            raise InvalidUpdate(f"unknown subtree node {subtree!r}; nodes with experts are {', '.join(self.tasks)}")
        idx = self._index.get(device, -1)
        if leaf_counts is not None:
            try:
                counts = self.strategy.check_counts(np.asarray(leaf_counts))
            except (ValueError, OverflowError) as exc:
                raise InvalidUpdate(str(exc)) from None
            if int(counts.sum()) > self.limits.max_samples:
                raise InvalidUpdate(f"{int(counts.sum())} samples declared; a device may claim at most "
                                    f"{self.limits.max_samples}")
            if device is not None and (idx not in self._counts or not np.array_equal(self._counts[idx], counts)):
                self._write(self._store_counts, device, counts)
        for _ in range(3):
            out = self._answer(idx, subtree, device)
            if not (out["excused"] and device is not None and excuse) or device in self._excused_why:
                return out   # (an excusal already recorded is not written again)
            try:
                self.excuse(device, out["round"], out["excused"])
                return out
            except StaleUpdate:   # the round closed while we answered: answer for the next one
                continue
        return out

    def _answer(self, idx: int, subtree: str | None, device: str | None = None) -> dict:
        cur, plan = self._round
        rnd = cur["round"]
        out = {**cur, "children": [], "seed": None, "hyperparameters": None, "samples": None, "excused": None,
               "wait": None, "trunk": None}
        why = self._excused_why.get(device) if device is not None else None
        if why is not None and plan is not None and plan.rnd == rnd:   # excused stays excused for the round
            out.update(samples=0, excused=f"excused from round {rnd} already ({why}); new counts count from the "
                       "next plan")
            return out
        if plan is None or plan.rnd != rnd:
            out["wait"] = (f"round {rnd} is planned once {self.min_devices} devices have reported their samples "
                           f"({len(self._counts)} have): send counts with GET /assignment")
            return out
        key = plan.assigned.get(idx)
        if key is None:
            reason = plan.excusal(idx) if idx in self._counts else \
                "no samples reported before the round was planned: send counts with GET /assignment"
            out.update(samples=0, excused=reason)
        else:
            out.update(expert=key, weights_version=self._versions[key], seed=plan.seeds[idx],
                       hyperparameters=config_dict(plan.configs[idx]), samples=self.driver.task_n[idx][key],
                       children=[self.tree.names[c] for c in self.tree.children(self.tasks[key].node)])
            if self.tasks[key].net.trunk_blocks:   # the trunk's weights: the owner's of this round
                out["trunk"] = {"expert": self.trunk_owner, "version": self._versions[self.trunk_owner]}
            if subtree is not None and not self.tree.ancestor_mask[self.tasks[key].node, self.tree.index(subtree)]:
                out.update(samples=0, excused=f"the round's expert {key} is outside the device's subtree {subtree}")
        return out

    # ------------------------------------------------------------- devices
    def enroll(self, secret: str, name: str = "", peer: str = "local") -> dict:
        return self.enroll_later(secret, name, peer).result()

    def enroll_later(self, secret: str, name: str = "", peer: str = "local") -> Future:
        """Check the secret (a fleet secret, or a one-time enrolment token), the rate and the
        ceiling now; the new device is committed by the writer (the future's result). Raises
        AdmissionError: 403, or 429 when too fast or when ``peer`` sent too many wrong secrets
        (then the secret is not even looked at)."""
        wait = self._failed.blocked(peer)
        if wait:
            raise AdmissionError(f"too many wrong enrolment secrets from {peer}; retry in {wait:.0f} s", 429, wait)
        one_time = None
        if not self.secrets.check(secret):
            row = self._read("SELECT used_by FROM enrol_tokens WHERE hash = ?", (_hash(secret),))
            if not row or row[0][0] is not None:
                self._failed.failed(peer)
                raise AdmissionError("wrong enrolment secret or token" if not row else
                                     "this enrolment token was already used; ask the operator for another")
            one_time = _hash(secret)
        wait = self._enrol_bucket.take()
        if wait:
            raise AdmissionError(f"too many enrolments (at most {self.limits.enrol_per_second:g} a second); "
                                 f"retry in {wait:.1f} s", 429, wait)
        return self._enqueue(self._store_device, name, one_time)

    def _store_device(self, name: str, one_time: str | None = None) -> dict:
        most = min(self.limits.max_devices, self.cfg.clients)
        if len(self._index) >= most:
            raise AdmissionError(f"the fleet is full: {len(self._index)} devices are enrolled and the run has "
                                 f"{self.cfg.clients} clients" if most == self.cfg.clients else
                                 f"the fleet is full: {self.limits.max_devices} devices are enrolled")
        device, token = secrets.token_hex(8), secrets.token_urlsafe(24)
        if one_time is not None and self.db.execute(
                "UPDATE enrol_tokens SET used_by = ?, used = ? WHERE hash = ? AND used_by IS NULL",
                (device, time.time(), one_time)).rowcount != 1:
            raise AdmissionError("this enrolment token was already used; ask the operator for another")
        idx = self.db.execute("SELECT COALESCE(MAX(idx) + 1, 0) FROM devices").fetchone()[0]
        self.db.execute("INSERT INTO devices (id, idx, token_hash, name, created) VALUES (?, ?, ?, ?, ?)",
                        (device, idx, _hash(token), name, time.time()))
        self._devices[_hash(token)] = (device, idx)
        self._index[device] = idx
        self._device_of[idx] = device
        return {"device_id": device, "token": token, "index": idx}

    def revoked(self, device: str) -> bool:
        """Whether the operator revoked ``device`` (``revoke_device``; looked up again at most
        once a second, and only when the database changed)."""
        version, when = self._revoked_seen
        now = time.monotonic()
        if now - when >= 1.0:
            with self._read_lock:
                current = self._reader.execute("PRAGMA data_version").fetchone()[0]
                if current != version:
                    self._revoked = {d for (d,) in self._reader.execute(
                        "SELECT id FROM devices WHERE revoked IS NOT NULL")}
                self._revoked_seen = (current, now)
        return device in self._revoked

    def _store_counts(self, device: str, counts: np.ndarray) -> None:
        """A device's samples per label (used from the next plan on); plans the open round when
        enough devices have reported."""
        self.db.execute("INSERT OR REPLACE INTO counts VALUES (?, ?)", (device, json.dumps(counts.tolist())))
        self._counts[self._index[device]] = counts
        if self._ready_to_plan():
            self._plan_round()

    def device_for(self, token: str) -> str | None:
        found = self._devices.get(_hash(token))
        return found[0] if found else None

    def excuse(self, device: str, rnd: int, reason: str) -> None:
        """The device will send nothing for round ``rnd`` (not assigned, outside its subtree, or
        its local training diverged): it counts as an answer."""
        self._write(self._store_excuse, device, rnd, reason[:200])

    def excuse_later(self, device: str, rnd: int, reason: str) -> Future:
        return self._enqueue(self._store_excuse, device, rnd, reason[:200])

    def _store_excuse(self, device: str, rnd: int, reason: str) -> None:
        if rnd != self._current["round"]:
            raise StaleUpdate(f"round {rnd} is closed; the current round is {self._current['round']}")
        if device in self._answered_by:
            if self._answered_by[device] is Answer.EXCUSED:
                return
            raise StaleUpdate(self._answered_by[device].sentence(device, rnd))
        self.db.execute("INSERT INTO excused VALUES (?, ?, ?)", (rnd, device, reason))
        self._answered_by[device] = Answer.EXCUSED
        self._excused_why[device] = reason

    # ------------------------------------------------------------- updates
    def max_update_bytes(self, expert: str | None = None) -> int:
        """The largest body an update of ``expert`` (None: of any expert) can honestly be: its
        float32 tensors and a safetensors header (1 KB and 256 bytes a tensor, what
        ``submit_later`` lets ``parse_safetensors`` read), plus ``UPDATE_SLACK``."""
        def size(key: str) -> int:
            shapes = self.expected[key]
            return 8 + 1024 + 256 * len(shapes) + sum(4 * math.prod(s) for s in shapes.values()) + UPDATE_SLACK
        return size(expert) if expert is not None else max(size(k) for k in self.tasks)

    def _check_current(self, device: str, rnd: int, expert: str, base_version: int) -> None:
        cur, plan = self._round
        if rnd != cur["round"]:
            raise StaleUpdate(f"update for round {rnd}; the current round is {cur['round']}")
        if plan is None:
            raise StaleUpdate(f"round {rnd} is not planned yet (it waits for devices to report their samples)")
        idx = self._index.get(device, -1)
        if idx not in plan.assigned:
            raise InvalidUpdate(f"device {device} has no task in round {rnd}: {plan.excusal(idx)}")
        if expert != plan.assigned[idx]:
            raise InvalidUpdate(f"update for expert {expert!r}; round {rnd} assigned this device "
                                f"{plan.assigned[idx]!r}")
        if base_version != self._versions[expert]:
            raise StaleUpdate(f"update from weights version {base_version}; round {rnd} trains {expert} from "
                              f"version {self._versions[expert]}")

    def submit(self, *args, **kwargs) -> dict:
        """Accept an update once. Raises InvalidUpdate (422) or StaleUpdate (409)."""
        return self.submit_later(*args, **kwargs).result()

    def submit_later(self, device: str, rnd: int, expert: str, base_version: int, samples: int, idem_key: str,
                     metrics: dict, body: bytes, hyperparameters: dict, client_samples: int | None = None) -> Future:
        """Validate an update now (raising InvalidUpdate or StaleUpdate); the writer checks the
        round again and stores it: the future's result, or its exception, once committed. The
        checks are the driver's (``check_reply``): the plan's task, arrays, sample count and
        hyper-parameters."""
        if not idem_key or len(idem_key) > 128:
            raise InvalidUpdate("an idempotency key of 1 to 128 characters is required")
        ceiling = self.limits.max_samples
        if not 1 <= samples <= ceiling or (client_samples is not None and not samples <= client_samples <= ceiling):
            raise InvalidUpdate(f"sample counts {samples} (under the expert) and {client_samples} (in all); "
                                f"expected 1 <= X-Samples <= X-Client-Samples <= {ceiling}")
        if expert not in self.tasks:
            raise InvalidUpdate(f"unknown expert {expert!r}; experts are {', '.join(self.tasks)}")
        try:   # parsed before it is stored: the round's close reads it, and must never fail on it
            metrics = ClientMetrics.parse(metrics).to_dict()
        except InvalidMetrics as exc:
            raise InvalidUpdate(str(exc)) from None
        self._check_current(device, rnd, expert, base_version)   # stale first: a late update is 409, however it looks
        weights = parse_safetensors(body, max_header=1024 + 256 * len(self.expected[expert]))
        cur, plan = self._round
        if plan is None or plan.rnd != rnd:   # the round closed since the checks above: stale
            raise StaleUpdate(f"update for round {rnd}; the current round is {cur['round']}")
        why = self.driver.check_reply(plan, self._index[device], weights, samples, hyperparameters)
        if why:   # (arrays, sample count, hyper-parameters, then finiteness: the driver's one check)
            raise InvalidUpdate(why)
        return self._enqueue(self._store_update, device, rnd, expert, base_version, samples, idem_key,
                             json.dumps(metrics), body, json.dumps(hyperparameters))

    def _store_update(self, device: str, rnd: int, expert: str, base_version: int, samples: int, idem_key: str,
                      metrics: str, body: bytes, hyperparameters: str) -> dict:
        sent = self._keys.get(device)   # its update of the open round, if any: no query for a retry
        dup = (rnd, sent[1]) if sent is not None and sent[0] == idem_key else None if sent is not None else \
            self.db.execute("SELECT round, expert FROM updates WHERE device = ? AND idem_key = ?",
                            (device, idem_key)).fetchone()
        if dup and dup[0] != rnd:
            raise StaleUpdate(f"idempotency key {idem_key[:128]!r} was used for this device's update of round "
                              f"{dup[0]}; a key names one update: send round {rnd}'s with a key of its own")
        if dup:
            return {"accepted": True, "duplicate": True, "round": dup[0], "expert": dup[1]}
        self._check_current(device, rnd, expert, base_version)
        if device in self._answered_by:
            raise StaleUpdate(self._answered_by[device].sentence(device, rnd))
        log = self._update_log(rnd)
        offset = log.seek(0, os.SEEK_END)
        log.write(body)
        self.db.execute("INSERT INTO updates (round, device, expert, idem_key, samples, hyperparameters, metrics, "
                        "offset, length, received) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (rnd, device, expert, idem_key, samples, hyperparameters, metrics, offset, len(body),
                         time.time()))
        self._answered_by[device] = Answer.UPDATE
        self._keys[device] = (idem_key, expert)
        return {"accepted": True, "duplicate": False, "round": rnd, "expert": expert}

    def _drop_update_logs(self, committed: int) -> None:
        """Delete the update bodies of rounds more than ``keep_update_rounds`` before ``committed``
        (their aggregates are committed; the rows that name them stay). None keeps every body."""
        if self.keep_update_rounds is None:
            return
        for path in (self.store / "updates").glob("r*.log"):
            stem = path.stem[1:]
            if stem.isdigit() and int(stem) <= committed - self.keep_update_rounds:
                path.unlink(missing_ok=True)

    def _log_path(self, rnd: int) -> Path:
        return self.store / "updates" / f"r{rnd:05d}.log"

    def _update_log(self, rnd: int):
        """The round's append-only update log (writer thread only); flushed before each commit."""
        if rnd not in self._logs:
            self._log_path(rnd).parent.mkdir(parents=True, exist_ok=True)
            self._logs[rnd] = open(self._log_path(rnd), "ab")
        return self._logs[rnd]

    def _flush_logs(self) -> None:
        for log in self._logs.values():
            log.flush()
            os.fsync(log.fileno())

    def round_updates(self, rnd: int) -> dict[int, tuple[Weights, dict]]:
        """The round's updates by client index, as the driver's results."""
        rows = self.db.execute("SELECT d.idx, u.offset, u.length, u.samples, u.metrics FROM updates u "
                               "JOIN devices d ON d.id = u.device WHERE u.round = ? ORDER BY d.idx", (rnd,)).fetchall()
        if not rows:
            return {}
        data = self._log_path(rnd).read_bytes()
        out = {}
        for idx, o, n, samples, metrics in rows:
            try:   # stored parsed; a row an older coordinator stored unparsed is left out by the driver
                result = ClientMetrics.parse(json.loads(metrics or "{}")).result(samples)
            except (InvalidMetrics, ValueError, RecursionError):
                result = {"num_samples": samples, "train_loss": None}
            out[idx] = (load(data[o:o + n]), result)
        return out

    def _validation_data(self):
        """The run's validation split, as the simulation holds it (torch and the data set load on first use)."""
        from trainer.prepare import prepare
        if self._validation is None:
            self._validation = prepare(self.cfg)
        return self._validation

    def _reference(self, key: str, weights: Weights, config, seed: int, steps: int = 0) -> Weights | None:
        """FLTrust's reference update of ``key`` (``--trust-reference``), as the simulation's."""
        from trainer.reference import reference_update
        prep = self._validation_data()
        if not len(prep.val_idx):
            return None
        x, y = prep.data.train_x[prep.val_idx], prep.data.train_y[prep.val_idx]
        trunk = self.driver.weights[self.trunk_owner] if self.tasks[key].net.trunk_blocks else None
        return reference_update(self.tasks[key], self.tree, weights, config, seed, x, y, prep.normalize, trunk=trunk,
                                steps=steps)

    def _validation_error(self, key: str, weights: Weights) -> float | None:
        """Only for a schedule that reads validation errors: the run's validation split, as the
        simulation uses it (loads torch and the data set on first use)."""
        from trainer.evaluate import validation_error
        prep = self._validation_data()
        if not len(prep.val_idx):
            return None
        x, y = prep.data.train_x[prep.val_idx], prep.data.train_y[prep.val_idx]
        trunk = self.driver.weights[self.trunk_owner] if self.tasks[key].net.trunk_blocks else None
        return validation_error(self.tree, self.tasks[key], weights, x, y, prep.normalize, trunk=trunk)

    # --------------------------------------------------------------- writer
    def _enqueue(self, fn, *args) -> Future:
        """``fn(*args)`` will run in the writer thread, inside its next transaction; the future
        holds its result (or exception) once that transaction committed."""
        done: Future = Future()
        self._jobs.put((fn, args, done))
        return done

    def _write(self, fn, *args):
        if threading.current_thread() is self._writer:
            return fn(*args)
        return self._enqueue(fn, *args).result()

    def _write_loop(self) -> None:
        while True:
            batch = [self._jobs.get()]
            while len(batch) < MAX_BATCH:
                try:
                    batch.append(self._jobs.get_nowait())
                except queue.Empty:
                    break
            stop = None in batch
            self._run_batch([job for job in batch if job is not None])
            if stop:
                return

    def _transaction(self, body) -> None:
        """``body()`` in one transaction; on any failure roll back and reload memory from the database."""
        try:
            self.db.execute("BEGIN IMMEDIATE")
            body()
            self.db.execute("COMMIT")
        except BaseException:
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
            self._after_commit.clear()
            self._reload()
            raise

    def _run_batch(self, batch: list) -> None:
        outcomes: list = []

        def run_jobs() -> None:
            for fn, args, _ in batch:   # a job checks first and writes last, so a refused one wrote nothing
                try:
                    outcomes.append((fn(*args), None))
                except Exception as exc:   # this request is refused; the rest of the batch goes on
                    outcomes.append((None, exc))
            self._flush_logs()   # the bytes the rows point to are on disk before the rows commit

        try:
            if batch:
                self._transaction(run_jobs)
        except BaseException as exc:
            for _, _, done in batch:
                done.set_exception(exc)
            self._bridge.settle([done for _, _, done in batch])
            return
        waits = []
        for (fn, _, done), (value, exc) in zip(batch, outcomes):   # committed: answer before aggregating
            if fn is self._wait_for_close:
                waits.append(done)
            elif exc is not None:
                done.set_exception(exc)
            else:
                done.set_result(value)
        self._bridge.settle([done for fn, _, done in batch if fn is not self._wait_for_close])
        for _ in range(MAX_CLOSES):   # a round nobody could take closes at once, and so may the next
            if not self.due():
                break
            try:
                self._transaction(self._close_round)
                for hook in self._after_commit:
                    hook()
                self.db.execute("PRAGMA wal_checkpoint(PASSIVE)")
            except Exception as exc:   # the updates are committed; the round closes at the next try
                self.last_aggregation = {"error": repr(exc)}
                logger.exception("closing round %s failed; it is tried again at the next batch",
                              self._current.get("round"))
                break
            finally:
                self._after_commit.clear()
        for done in waits:
            done.set_result(None)
        self._bridge.settle(waits)

    def awaitable(self, done: Future):
        """An asyncio future for the current event loop that completes with ``done`` (a future of
        the writer's), woken together with the rest of its batch."""
        import asyncio
        return self._bridge.awaitable(done, asyncio.get_running_loop())

    def due(self) -> bool:
        """The open round is planned, and every device it assigned has answered or its deadline passed."""
        cur, plan = self._round
        if plan is None or plan.rnd != cur["round"] or cur["deadline"] is None:
            return False
        if time.time() >= cur["deadline"]:
            return True
        return all(self._device_of.get(c) in self._answered_by for c in plan.assigned)

    def tick(self) -> None:
        """Plan the open round when enough devices have reported (after a restart), and close it
        when it is due (the writer closes it after its next batch; this wakes it up and waits)."""
        if self._ready_to_plan():
            self._write(self._plan_if_ready)
        if self.due():
            self._write(self._wait_for_close)

    def _plan_if_ready(self) -> None:
        if self._ready_to_plan():
            self._plan_round()

    @staticmethod
    def _wait_for_close() -> None:
        """A job that writes nothing: answered after the round it woke the writer for is closed."""

    def _close_round(self) -> None:
        """The driver aggregates, the new versions and the round's log entry are stored, and the
        next round opens (planned at once when enough devices have reported): one transaction.
        The run directory follows after the commit (``driver.commit``; repaired on start-up)."""
        plan, rnd = self._plan, self._current["round"]
        started = time.perf_counter()
        results = self.round_updates(rnd)
        excused = dict(self.db.execute("SELECT d.idx, e.reason FROM excused e JOIN devices d ON d.id = e.device "
                                       "WHERE e.round = ?", (rnd,)).fetchall())
        left_out = {str(c): f"declined: {excused[c]}" if c in excused else "no update before the round's deadline"
                    for c in plan.assigned if c not in results}
        updated, entry = self.driver.aggregate(plan, results, left_out)
        for key, new in updated.items():
            version = self._versions[key] + 1
            path = self.store / "weights" / f"{self.tasks[key].file_stem}-v{version}.safetensors"
            write_bytes_atomic(path, save(new))
            if key in self.strategy.server_state:   # the server optimizer's moments travel with the version
                write_bytes_atomic(server_file(path), save(self.strategy.server_state[key]))
            self.db.execute("INSERT OR REPLACE INTO versions VALUES (?, ?, ?, ?)", (key, version, path.name, rnd))
        self.db.execute("UPDATE rounds SET aggregated = ? WHERE round = ?", (time.time(), rnd))
        self.db.execute("UPDATE plans SET entry = ? WHERE round = ?", (json.dumps(entry), rnd))
        self.db.execute("UPDATE meta SET value = ? WHERE key = 'strategy'", (json.dumps(self.strategy.state()),))
        if rnd in self._logs:
            self._logs.pop(rnd).close()
        self._after_commit.append(lambda: self.driver.commit(rnd, updated, entry))
        self._after_commit.append(lambda: self._drop_update_logs(rnd))
        self._versions = {k: self._version(self.db, k) for k in self.tasks}
        self._open_round(rnd + 1)
        self._load_current()
        if self._ready_to_plan():
            self._plan_round()
        self.last_aggregation = {"round": rnd, "updates": len(results), "tasks": sorted(updated),
                                 "seconds": time.perf_counter() - started}

    def close(self) -> None:
        """Stop the writer (after what is queued) and close the database."""
        self._jobs.put(None)
        self._writer.join(60)
        for log in self._logs.values():
            log.close()
        self._reader.close()
        self.db.close()
