"""The coordinator: the round protocol over HTTP for devices that have only an HTTP client.

It moves messages and decides nothing: which expert a round trains, each device's
hyper-parameters and seed, how updates combine and the schedule's state all come from
the run's ``Strategy``, exactly as in the simulation. No torch is loaded (aggregation is
numpy), except by a schedule that reads validation errors, which validates each new
expert on the run's validation split.

State lives in SQLite (WAL, synchronous=FULL: a committed row survives kill -9);
weights and accepted updates are files written atomically *before* the transaction
that refers to them commits, so an acknowledged update is never lost and a crash
between the two leaves only an orphan file. Checking that a round is open and storing
an update are one step under the same lock that closes rounds, so an acknowledged
update is always in its round's aggregate.
"""

from __future__ import annotations

import copy
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
from safetensors import SafetensorError
from safetensors.numpy import load, load_file, save

from hierarchy.errors import HmoeError
from hierarchy.manifest import Manifest, ModelEntry
from hierarchy.tree import write_bytes_atomic
from trainer.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from trainer.config import LocalConfig
from trainer.fedavg import Weights
from trainer.run import load_strategy_state, run_files
from trainer.strategy import StrategyError, make_tasks

MAX_UPDATE_BYTES = 16 * 1024 * 1024
MAX_SAMPLES = 10_000_000

SCHEMA = """
CREATE TABLE IF NOT EXISTS devices (id TEXT PRIMARY KEY, idx INTEGER NOT NULL UNIQUE, token_hash TEXT NOT NULL,
    name TEXT, created REAL);
CREATE TABLE IF NOT EXISTS rounds (round INTEGER PRIMARY KEY, expert TEXT NOT NULL, base_version INTEGER NOT NULL,
    started REAL NOT NULL, deadline REAL NOT NULL, aggregated REAL);
CREATE TABLE IF NOT EXISTS updates (id INTEGER PRIMARY KEY AUTOINCREMENT, round INTEGER NOT NULL,
    device TEXT NOT NULL, expert TEXT NOT NULL, idem_key TEXT NOT NULL, samples INTEGER NOT NULL,
    hyperparameters TEXT NOT NULL, metrics TEXT, file TEXT NOT NULL, received REAL NOT NULL,
    UNIQUE(round, device), UNIQUE(device, idem_key));
CREATE TABLE IF NOT EXISTS excused (round INTEGER NOT NULL, device TEXT NOT NULL, reason TEXT NOT NULL,
    PRIMARY KEY (round, device));
CREATE TABLE IF NOT EXISTS versions (expert TEXT NOT NULL, version INTEGER NOT NULL, file TEXT NOT NULL,
    round INTEGER, PRIMARY KEY (expert, version));
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


class CoordinatorError(HmoeError):
    """The coordinator cannot start as asked (its database disagrees with the run or the flags)."""


class InvalidUpdate(HmoeError, ValueError):
    """An update that can never be accepted (malformed, wrong tensors, other hyper-parameters): 422."""


class StaleUpdate(HmoeError, LookupError):
    """An update for a round or weights version that is no longer current, or a second one: 409."""


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class Coordinator:
    """Round logic over SQLite; the HTTP layer (``create_app``) is a thin shell around it."""

    def __init__(self, run_dir: str | os.PathLike, db: str | os.PathLike, secret: str, min_updates: int = 2,
                 round_seconds: float = 600.0, schedule: str | None = None) -> None:
        if min_updates < 1:
            raise CoordinatorError(f"min_updates must be at least 1; got {min_updates}")
        self.run_dir = Path(run_dir)
        self.cfg, self.tree, self.spec = run_files(self.run_dir)
        self.secret, self.min_updates, self.round_seconds = secret, min_updates, round_seconds
        self.tasks = make_tasks(self.tree, "hmoe", self.spec.shape, self.cfg.expert_width, self.cfg.depth)
        self.strategy = self.cfg.strategy("hmoe", self.tree, self.tasks, schedule=schedule)
        self.expected = {k: {n: (s, np.dtype(np.float32)) for n, s in t.net.param_shapes().items()}
                         for k, t in self.tasks.items()}
        self.store = self.run_dir / "coordinator"
        self.last_aggregation: dict | None = None
        self._validation = None
        self.lock = threading.RLock()
        self.db = sqlite3.connect(str(db), check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(SCHEMA)
        self._bootstrap(Path(db))
        self._manifest = self._build_manifest()

    # ------------------------------------------------------------- set-up
    def _bootstrap(self, db: Path) -> None:
        with self.lock:
            saved = self.db.execute("SELECT value FROM meta WHERE key = 'strategy'").fetchone()
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
                self._open_round(0)
            self._repair_checkpoints()
            self._devices = {h: (d, i) for d, i, h in self.db.execute("SELECT id, idx, token_hash FROM devices")}
            self._load_current()
        self.tick()

    def _load_current(self) -> None:
        """The open round and its answer count, kept in memory so reads do not wait on the database."""
        r = self.db.execute("SELECT round, expert, base_version, deadline FROM rounds WHERE aggregated IS NULL "
                            "ORDER BY round DESC LIMIT 1").fetchone()
        self._current = {"round": r[0], "expert": r[1], "weights_version": r[2], "deadline": r[3]}
        self._answered = self._count("updates", r[0]) + self._count("excused", r[0])

    def _count(self, table: str, rnd: int) -> int:
        return self.db.execute(f"SELECT COUNT(*) FROM {table} WHERE round = ?", (rnd,)).fetchone()[0]

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

    def _build_manifest(self) -> dict:
        """What a device needs to train any expert: hierarchy, the run's input spec, network configs
        (no ONNX files: a device that only trains never runs inference from this manifest)."""
        experts = {k: ModelEntry(k, [self.tree.names[c] for c in self.tree.children(t.node)], "", "", 0, 0, 0,
                                 json.loads(t.net.to_json())) for k, t in self.tasks.items()}
        return Manifest(self.tree, self.spec, experts, created_by="hmoe-edge coordinator",
                        source={"run": str(self.run_dir.resolve()), "dataset": self.cfg.dataset}).to_dict()

    # ------------------------------------------------------------- queries
    def version(self, expert: str) -> int:
        return self.db.execute("SELECT MAX(version) FROM versions WHERE expert = ?", (expert,)).fetchone()[0]

    def weights_file(self, expert: str, version: int | None = None) -> Path:
        version = self.version(expert) if version is None else version
        row = self.db.execute("SELECT file FROM versions WHERE expert = ? AND version = ?", (expert, version)).fetchone()
        return self.store / "weights" / row[0]

    def current(self) -> dict:
        return dict(self._current)

    def status(self) -> dict:
        with self.lock:
            cur = self.current()
            n = self._count("updates", cur["round"])
            versions = {k: self.version(k) for k in self.tasks}
            done = self.db.execute("SELECT COUNT(*) FROM rounds WHERE aggregated IS NOT NULL").fetchone()[0]
            total = self.db.execute("SELECT COUNT(*) FROM updates").fetchone()[0]
        return {**cur, "updates_received": n, "answered": self._answered, "min_updates": self.min_updates,
                "versions": versions, "rounds_aggregated": done, "updates_total": total,
                "schedule": self.strategy.schedule_name, "last_aggregation": self.last_aggregation}

    def manifest(self) -> dict:
        return self._manifest

    def assignment(self, device: str | None = None, leaf_counts: list[int] | None = None) -> dict:
        """The open round for a device, with the hyper-parameters and seed the strategy gives it.

        ``leaf_counts`` (the device's samples per label) let the strategy balance epochs as the
        simulation does; a device with no sample under the round's expert is excused from it."""
        self.tick()
        cur = self.current()
        key, rnd = cur["expert"], cur["round"]
        idx = self._index_of(device)
        out = {**cur, "children": [self.tree.names[c] for c in self.tree.children(self.tasks[key].node)],
               "seed": self.strategy.client_seed(rnd, idx)}
        if leaf_counts is None:
            out.update(hyperparameters=self.strategy.client_config(key, rnd).to_dict(), samples=None)
            return out
        try:
            samples = self.strategy.task_samples(key, np.asarray(leaf_counts))
        except ValueError as exc:
            raise InvalidUpdate(str(exc)) from None
        out.update(hyperparameters=self.strategy.client_config(key, rnd, int(sum(leaf_counts)), samples).to_dict(),
                   samples=samples)
        if samples == 0 and device is not None:
            self.excuse(device, rnd, "no samples under the expert")
        return out

    def _index_of(self, device: str | None) -> int:
        return next((i for d, i in self._devices.values() if d == device), -1)

    # ------------------------------------------------------------- devices
    def enroll(self, secret: str, name: str = "") -> dict:
        if not hmac.compare_digest(secret.encode(), self.secret.encode()):
            raise PermissionError("wrong enrolment secret")
        device, token = secrets.token_hex(8), secrets.token_urlsafe(24)
        with self.lock:
            idx = self.db.execute("SELECT COALESCE(MAX(idx) + 1, 0) FROM devices").fetchone()[0]
            self.db.execute("INSERT INTO devices VALUES (?, ?, ?, ?, ?)", (device, idx, _hash(token), name, time.time()))
            self._devices[_hash(token)] = (device, idx)
        return {"device_id": device, "token": token, "index": idx}

    def device_for(self, token: str) -> str | None:
        found = self._devices.get(_hash(token))
        return found[0] if found else None

    def excuse(self, device: str, rnd: int, reason: str) -> None:
        """The device will send nothing for round ``rnd`` (no samples under its expert, or its
        local training diverged): it counts as an answer, as the simulation skips such a client."""
        with self.lock:
            if rnd != self._current["round"]:
                raise StaleUpdate(f"round {rnd} is closed; the current round is {self._current['round']}")
            if self.db.execute("SELECT 1 FROM updates WHERE round = ? AND device = ?", (rnd, device)).fetchone():
                raise StaleUpdate(f"device {device} already sent an update for round {rnd}")
            cur = self.db.execute("INSERT OR IGNORE INTO excused VALUES (?, ?, ?)", (rnd, device, reason[:200]))
            self._answered += cur.rowcount
        self.tick()

    # ------------------------------------------------------------- updates
    def check_update(self, expert: str, body: bytes) -> Weights:
        """Parse and validate an update's tensors; raises InvalidUpdate (-> 422)."""
        try:
            weights = load(body)
        except (SafetensorError, ValueError, OSError, TypeError) as exc:
            raise InvalidUpdate(f"body is not a safetensors file ({exc})") from None
        want = self.expected[expert]
        missing, extra = sorted(set(want) - set(weights)), sorted(set(weights) - set(want))
        if missing or extra:
            raise InvalidUpdate(f"tensor names differ from expert {expert!r}: missing {missing[:3]}, extra {extra[:3]}")
        for name, arr in weights.items():
            shape, dtype = want[name]
            if tuple(arr.shape) != shape or arr.dtype != dtype:
                raise InvalidUpdate(f"tensor {name!r} is {arr.dtype}{list(arr.shape)}; expected {dtype}{list(shape)}")
            if not np.all(np.isfinite(arr)):
                raise InvalidUpdate(f"tensor {name!r} holds NaN or infinite values")
        return weights

    def check_hyperparameters(self, expert: str, rnd: int, hyperparameters: dict, samples: int,
                              client_samples: int | None) -> None:
        """The update must have been trained with what the strategy assigned to this client."""
        try:
            used = LocalConfig.from_dict(hyperparameters)
        except (TypeError, ValueError) as exc:
            raise InvalidUpdate(f"X-Hyperparameters: {exc}; expected the assignment's hyperparameters") from None
        if client_samples is None:
            assigned = self.strategy.client_config(expert, rnd)
        else:
            if client_samples < samples:
                raise InvalidUpdate(f"X-Client-Samples {client_samples} is below X-Samples {samples}")
            assigned = self.strategy.client_config(expert, rnd, client_samples, samples)
        diff = used.differences(assigned)
        if diff:
            raise InvalidUpdate("trained with other hyper-parameters than round {} assigned: {}".format(
                rnd, ", ".join(f"{f} {getattr(used, f)!r} (assigned {getattr(assigned, f)!r})" for f in diff)))

    def _check_current(self, rnd: int, expert: str, base_version: int) -> None:
        cur = self._current
        if rnd != cur["round"]:
            raise StaleUpdate(f"update for round {rnd}; the current round is {cur['round']}")
        if expert != cur["expert"]:
            raise InvalidUpdate(f"update for expert {expert!r}; round {rnd} trains {cur['expert']!r}")
        if base_version != cur["weights_version"]:
            raise StaleUpdate(f"update from weights version {base_version}; round {rnd} started from "
                              f"version {cur['weights_version']}")

    def submit(self, device: str, rnd: int, expert: str, base_version: int, samples: int, idem_key: str,
               metrics: dict, body: bytes, hyperparameters: dict, client_samples: int | None = None) -> dict:
        """Accept an update once. Raises InvalidUpdate (422) or StaleUpdate (409)."""
        if not idem_key or len(idem_key) > 128:
            raise InvalidUpdate("an idempotency key of 1 to 128 characters is required")
        if not 1 <= samples <= MAX_SAMPLES:
            raise InvalidUpdate(f"sample count {samples}; expected 1 to {MAX_SAMPLES}")
        if expert not in self.tasks:
            raise InvalidUpdate(f"unknown expert {expert!r}; experts are {', '.join(self.tasks)}")
        self._check_current(rnd, expert, base_version)   # stale first: a late update is 409, however it looks
        self.check_hyperparameters(expert, rnd, hyperparameters, samples, client_samples)
        self.check_update(expert, body)
        path = self.store / "updates" / f"r{rnd:05d}-{device}-{secrets.token_hex(6)}.safetensors"
        write_bytes_atomic(path, body)
        try:
            with self.lock:   # the round check and the insert are one step: acknowledged means counted
                dup = self.db.execute("SELECT round, expert FROM updates WHERE device = ? AND idem_key = ?",
                                      (device, idem_key)).fetchone()
                if dup:
                    path.unlink()
                    return {"accepted": True, "duplicate": True, "round": dup[0], "expert": dup[1]}
                self._check_current(rnd, expert, base_version)
                for table, what in (("updates", "already sent an update for"), ("excused", "was excused from")):
                    if self.db.execute(f"SELECT 1 FROM {table} WHERE round = ? AND device = ?", (rnd, device)).fetchone():
                        raise StaleUpdate(f"device {device} {what} round {rnd}")
                self.db.execute("INSERT INTO updates (round, device, expert, idem_key, samples, hyperparameters, "
                                "metrics, file, received) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                                (rnd, device, expert, idem_key, samples, json.dumps(hyperparameters),
                                 json.dumps(metrics), path.name, time.time()))
                self._answered += 1
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        self.tick()
        return {"accepted": True, "duplicate": False, "round": rnd, "expert": expert}

    def round_updates(self, rnd: int) -> list[tuple[Weights, int]]:
        """The round's updates in device enrolment order (the simulation's client order)."""
        rows = self.db.execute("SELECT u.file, u.samples FROM updates u JOIN devices d ON d.id = u.device "
                               "WHERE u.round = ? ORDER BY d.idx", (rnd,)).fetchall()
        return [(load_file(str(self.store / "updates" / f)), n) for f, n in rows]

    def _validation_error(self, key: str, weights: Weights) -> float | None:
        """Only for a schedule that reads validation errors: the run's validation split, as the
        simulation uses it (loads torch and the data set on first use)."""
        from trainer.evaluate import validation_error
        from trainer.simulation import prepare
        if self._validation is None:
            self._validation = prepare(self.cfg)
        prep = self._validation
        if not len(prep.val_idx):
            return None
        x, y = prep.data.train_x[prep.val_idx], prep.data.train_y[prep.val_idx]
        return validation_error(self.tree, self.tasks[key], weights, x, y, prep.normalize)

    def tick(self) -> None:
        """Close the open round when ``min_updates`` devices answered it or its deadline passed:
        aggregate, let the strategy see the result, open the next round, all in one commit."""
        cur = self._current
        if self._answered < self.min_updates and time.time() < cur["deadline"]:
            return
        with self.lock:
            cur = self._current
            if self._answered < self.min_updates and time.time() < cur["deadline"]:
                return
            key, rnd = cur["expert"], cur["round"]
            started = time.perf_counter()
            updates = self.round_updates(rnd)
            saved_state = copy.deepcopy(self.strategy.state())
            if updates:
                new = self.strategy.aggregate(updates)
                version = cur["weights_version"] + 1
                path = self.store / "weights" / f"{self.tasks[key].file_stem}-v{version}.safetensors"
                write_bytes_atomic(path, save(new))
                if self.strategy.needs_validation:
                    error = self._validation_error(key, new)
                    if error is not None:
                        self.strategy.record_validation(key, error)
            self.db.execute("BEGIN IMMEDIATE")
            try:
                if updates:
                    self.db.execute("INSERT OR REPLACE INTO versions VALUES (?, ?, ?, ?)", (key, version, path.name, rnd))
                self.db.execute("UPDATE rounds SET aggregated = ? WHERE round = ?", (time.time(), rnd))
                self.db.execute("UPDATE meta SET value = ? WHERE key = 'strategy'", (json.dumps(self.strategy.state()),))
                self._open_round(rnd + 1)
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                self.strategy.restore(saved_state)
                raise
            self._load_current()
            self.last_aggregation = {"round": rnd, "updates": len(updates), "seconds": time.perf_counter() - started}
            if updates:  # the run directory's checkpoint follows, so `hmoe export --run` exports the fleet's result
                self._write_checkpoint(key, new, rnd)
