"""One round protocol, two transports: the coordinator over real HTTP with real device code
trains exactly what the in-process simulation trains, for every schedule, across a kill -9."""

import json
import sqlite3
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from edge_runtime.sync import sync
from tests.conftest import CFG
from tests.test_coordinator import SECRET, Server
from trainer.transports.inprocess import Federation
from trainer.prepare import open_run

ROUNDS = 5
CLIENTS = 3


def protocol_cfg(schedule: str):
    return replace(CFG, dataset="synthetic:1,28,28:fashion-mnist:300", clients=CLIENTS, clients_per_round=CLIENTS,
                   hmoe_rounds=ROUNDS, schedule=schedule, expert_width=2, alpha=0.1, seed=1)


def simulate(run: Path, cfg) -> tuple[list[dict], list[dict | None], object]:
    """The simulation's log and, per round, the aggregated weights (None: nobody trained)."""
    cfg, prep = open_run(run, cfg, resume=False)
    fed = Federation(run, "hmoe", cfg, prep)
    weights = []
    for rnd in range(ROUNDS):
        entry = fed.step(rnd)
        weights.append({k: v.copy() for k, v in fed.weights[entry["task"]].items()} if entry["clients"] else None)
    return fed.state["log"], weights, prep


def fleet(run: Path, cfg, prep, tmp: Path, kill_after: int | None = None) -> tuple[Path, Server]:
    """The same run driven by the coordinator and one `sync` device per simulated client."""
    _, own = open_run(run, cfg, resume=False)
    Federation(run, "hmoe", cfg, own)   # initial checkpoints and the schedule's state, as `hmoe train` writes them
    db = tmp / "state.sqlite"
    server = Server(run, db, min_updates=CLIENTS, round_seconds=600)
    d = prep.data
    devices = []
    for c, part in enumerate(prep.parts):   # enrol in client order: device c is simulated client c
        data = tmp / f"client{c}.npz"
        np.savez(data, images=d.train_x[part][:, 0], labels=d.train_y[part])
        sync(server.url, SECRET, data, None, rounds=0, state_file=tmp / f"client{c}.json", log=lambda *_: None)
        devices.append(data)
    errors: list[BaseException] = []

    def device(c: int) -> None:
        try:
            sync(server.url, SECRET, devices[c], None, state_file=tmp / f"client{c}.json", poll=0.05,
                 log=lambda *_: None, until_round=ROUNDS)
        except BaseException as exc:   # reported by the test, not lost in the thread
            errors.append(exc)

    threads = [threading.Thread(target=device, args=(c,)) for c in range(CLIENTS)]
    for t in threads:
        t.start()
    if kill_after is not None:
        deadline = time.time() + 300
        while server.status()["rounds_aggregated"] < kill_after and time.time() < deadline:
            time.sleep(0.05)
        server.kill9()
        server.start()
    for t in threads:
        t.join(600)
    assert not errors, errors
    return db, server


def fleet_rounds(run: Path, db: Path) -> list[dict]:
    """Per round: task, hyper-parameters each device index trained with, excused devices, weights."""
    con = sqlite3.connect(db)
    out = []
    for rnd, expert in con.execute("SELECT round, expert FROM rounds WHERE aggregated IS NOT NULL ORDER BY round"):
        hp = {str(i): json.loads(h) for i, h in con.execute(
            "SELECT d.idx, u.hyperparameters FROM updates u JOIN devices d ON d.id = u.device WHERE u.round = ?",
            (rnd,))}
        excused = sorted(i for (i,) in con.execute(
            "SELECT d.idx FROM excused e JOIN devices d ON d.id = e.device WHERE e.round = ?", (rnd,)))
        row = con.execute("SELECT file FROM versions WHERE round = ?", (rnd,)).fetchone()
        weights = load_file(str(run / "coordinator" / "weights" / row[0])) if row else None
        out.append({"task": expert, "client_config": hp, "skipped": excused, "weights": weights})
    con.close()
    return out


def assert_same(log: list[dict], sim_weights: list, got: list[dict]) -> None:
    assert len(log) == ROUNDS and len(got) >= ROUNDS
    assert [e["task"] for e in log] == [g["task"] for g in got[:ROUNDS]]
    for e, w, g in zip(log, sim_weights, got):
        assert e["client_config"] == g["client_config"], e["round"]
        assert e["skipped"] == g["skipped"], e["round"]
        assert (w is None) == (g["weights"] is None), e["round"]
        for k in w or {}:
            np.testing.assert_allclose(g["weights"][k], w[k], rtol=0, atol=1e-6, err_msg=f"round {e['round']} {k}")


@pytest.mark.slow
@pytest.mark.parametrize("schedule", ["round-robin", "proportional", "worst-validation"])
def test_coordinator_trains_what_the_simulation_trains(schedule, tmp_path):
    cfg = protocol_cfg(schedule)
    log, sim_weights, prep = simulate(tmp_path / "sim", cfg)
    assert any(e["skipped"] for e in log) or schedule != "round-robin", "the data should make some client skip"
    assert len({e["task"] for e in log}) > 1
    db, server = fleet(tmp_path / "fleet", cfg, prep, tmp_path)
    try:
        assert_same(log, sim_weights, fleet_rounds(tmp_path / "fleet", db))
    finally:
        server.stop()


@pytest.mark.slow
def test_schedule_continues_after_kill9(tmp_path):
    cfg = protocol_cfg("worst-validation")
    log, sim_weights, prep = simulate(tmp_path / "sim", cfg)
    db, server = fleet(tmp_path / "fleet", cfg, prep, tmp_path, kill_after=2)
    try:
        assert_same(log, sim_weights, fleet_rounds(tmp_path / "fleet", db))
        assert server.status()["schedule"] == "worst-validation"
    finally:
        server.stop()


def test_restart_with_another_schedule_is_refused(tmp_path):
    from trainer.transports.coordinator.service import Coordinator, CoordinatorError
    cfg = protocol_cfg("proportional")
    _, prep = open_run(tmp_path / "run", cfg, resume=False)
    Federation(tmp_path / "run", "hmoe", cfg, prep)
    Coordinator(tmp_path / "run", tmp_path / "db.sqlite", SECRET).close()
    with pytest.raises(CoordinatorError, match="'proportional'.*'round-robin'"):
        Coordinator(tmp_path / "run", tmp_path / "db.sqlite", SECRET, schedule="round-robin")


def test_run_without_input_spec_says_how_to_repair(tmp_path):
    from trainer.transports.coordinator.service import Coordinator
    from trainer.protocol.run import RunError
    cfg = protocol_cfg("round-robin")
    _, prep = open_run(tmp_path / "run", cfg, resume=False)
    Federation(tmp_path / "run", "hmoe", cfg, prep)
    (tmp_path / "run" / "input.json").unlink()
    with pytest.raises(RunError, match="input.json.*hmoe train --out .* --resume"):
        Coordinator(tmp_path / "run", tmp_path / "db.sqlite", SECRET)


def test_balanced_epochs_never_exceed_the_roots_round_in_samples_or_steps():
    """An expert's round, in samples passed and in optimizer steps, stays within the root's
    (one pass over all the client's samples), and is at least one epoch (issue #15: counting
    samples alone gave a client with 3 samples under an expert 1000 one-batch epochs)."""
    import math

    from trainer.protocol.strategy import balanced_epochs
    for client in (1, 3, 31, 32, 33, 100, 999, 3000):
        for task in range(1, client + 1, max(1, client // 37)):
            for batch in (1, 8, 32, 64):
                e = balanced_epochs(client, task, batch)
                assert e >= 1
                if e > 1:
                    assert e * task <= client
                    assert e * math.ceil(task / batch) <= math.ceil(client / batch)
                # and it is the largest such count
                more = e + 1
                assert more * task > client or more * math.ceil(task / batch) > math.ceil(client / batch)
    assert balanced_epochs(3000, 3, 32) == 94      # samples alone would say 1000
    assert balanced_epochs(3000, 300, 32) == 9     # samples alone would say 10
    assert balanced_epochs(3000, 0, 32) == 1
