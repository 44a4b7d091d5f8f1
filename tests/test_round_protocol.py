"""One round driver, three transports: the in-process simulation, the coordinator over real
HTTP with real device code, and Flower's simulation runtime run the same rounds (tasks,
hyper-parameters, excusals, weights within float tolerance, strategy state) for every
schedule and for a resource-aware run with a fleet file; the coordinator also across a kill -9."""

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
from tests.support import SECRET, STRONG, WEAK, Server, book_for, simulate_on_flower
from trainer.prepare import open_run
from trainer.transports.inprocess import Federation

ROUNDS = 5
CLIENTS = 4
SAME = ("task", "clients", "samples", "skipped", "dropped", "diverged", "lr", "client_config", "tasks", "assigned",
        "unfit", "no_cohort", "client_gmacs", "warm_started")   # what a round decided; seconds and losses are each transport's own


def protocol_cfg(schedule: str, **over):
    return replace(CFG, **{"dataset": "synthetic:1,28,28:fashion-mnist:300", "clients": CLIENTS,
                           "clients_per_round": 3, "hmoe_rounds": ROUNDS, "schedule": schedule, "expert_width": 2,
                           "alpha": 0.1, "seed": 1, **over})


CASES = {s: protocol_cfg(s) for s in ("round-robin", "proportional", "worst-validation")}
CASES["resource-aware-fleet"] = protocol_cfg("round-robin", assignment="resource-aware", min_cohort=1,
                                             expert_width=8, expert_widths="leaves:2",
                                             fleet={"deadline_s": 0, "tiers": [STRONG, WEAK]})
# Several experts a round, one per client (issue 27): the schedule's experts in turn, after
# the root has trained alone for two rounds and the others started from their parents' weights.
CASES["spread"] = protocol_cfg("round-robin", assignment="spread", min_cohort=1, warm_start=2)
# Experts on a shared trunk (issue 39): the root's first conv block is every other expert's
# trunk; a device training one of them gets the trunk's weights beside its own.
CASES["trunk"] = protocol_cfg("round-robin", assignment="spread", min_cohort=1, warm_start=2, trunk_blocks=1,
                              expert_width=4)
# FLTrust (issue 37): every transport trains the same reference update on the run's
# validation split and weighs each device's change by its direction.
CASES["trust-reference"] = protocol_cfg("round-robin", trust_reference=True)
# Every label-skew remedy at once: the local objective travels in the assignment's
# hyper-parameters, the server optimizer's moments with the run (docs/TRAINING.md, "Label skew").
CASES["label-skew-remedies"] = protocol_cfg("round-robin", server_optimizer="adam", server_lr=0.01,
                                            local=replace(CFG.local, prox_mu=0.05, restricted_softmax=0.5,
                                                          logit_adjust=1.0))


def make(run: Path, cfg):
    """The run directory, as `hmoe train --hmoe-rounds 0` leaves it (a fleet's costs from a seed book)."""
    cfg, prep = open_run(run, cfg, resume=False, kinds=("hmoe",), seed_book=book_for(cfg, ("hmoe",)))
    return Federation(run, "hmoe", cfg, prep), prep


def simulate(run: Path, cfg) -> tuple[object, list[dict]]:
    """The simulation, and per round the weights of the tasks it updated."""
    fed, _ = make(run, cfg)
    per_round = []
    for rnd in range(ROUNDS):
        before = dict(fed.state["versions"])
        fed.step(rnd)
        per_round.append({k: {n: a.copy() for n, a in fed.weights[k].items()}
                          for k, v in fed.state["versions"].items() if before.get(k) != v})
    return fed, per_round


def coordinate(run: Path, cfg, prep, tmp: Path, kill_after: int | None = None) -> tuple[Path, Server]:
    """The same run driven by the coordinator and one `sync` device per simulated client."""
    make(run, cfg)
    db = tmp / "state.sqlite"
    server = Server(run, db, round_seconds=600)
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

    # Daemon threads, watched: a device that fails ends the test at once with its error (the
    # others would wait for its update until the round's deadline), and none outlives the test.
    threads = [threading.Thread(target=device, args=(c,), daemon=True) for c in range(CLIENTS)]
    for t in threads:
        t.start()
    if kill_after is not None:
        deadline = time.time() + 300
        while server.status()["rounds_aggregated"] < kill_after and time.time() < deadline and not errors:
            time.sleep(0.05)
        server.kill9()
        server.start()
    deadline = time.time() + 300
    while any(t.is_alive() for t in threads) and not errors and time.time() < deadline:
        time.sleep(0.05)
    if errors or any(t.is_alive() for t in threads):
        status = server.status()
        server.stop()
        pytest.fail(f"devices failed: {errors!r}; still running: {[t.name for t in threads if t.is_alive()]}; "
                    f"coordinator status: {status}\ncoordinator log:\n{server.log_tail()}")
    deadline = time.time() + 60   # the last round's files follow its commit
    while json.loads((run / "state-hmoe.json").read_text())["completed_rounds"] < ROUNDS and time.time() < deadline:
        time.sleep(0.05)
    return db, server


def coordinator_weights(run: Path, db: Path) -> list[dict]:
    """Per round, the weights of the tasks the coordinator updated (its version files)."""
    con = sqlite3.connect(db)
    out = [{} for _ in range(ROUNDS)]
    for expert, rnd, file in con.execute("SELECT expert, round, file FROM versions WHERE round IS NOT NULL"):
        if rnd < ROUNDS:
            out[rnd][expert] = load_file(str(run / "coordinator" / "weights" / file))
    con.close()
    return out


def assert_same_rounds(sim_log: list[dict], other: dict, name: str) -> None:
    log = other["log"][:ROUNDS]
    assert len(log) == ROUNDS, name
    for e, g in zip(sim_log, log):
        for k in SAME:
            assert e.get(k) == g.get(k), f"{name}, round {e['round']}: {k} {e.get(k)!r} != {g.get(k)!r}"


def assert_close(ours: dict, theirs: dict, what: str) -> None:
    assert set(ours) == set(theirs), what
    for key in ours:
        for n, arr in ours[key].items():
            np.testing.assert_allclose(theirs[key][n], arr, rtol=0, atol=1e-6, err_msg=f"{what} {key}/{n}")


def assert_same_strategy(theirs: dict, ours: dict, what: str) -> None:
    """The same schedule state; the remembered update norms (six significant digits of norms
    computed on other machines) within one unit of the sixth digit: 1e-5 of the value when
    its leading digit is 1 (rtol 2e-6 failed 0.00453678 against 0.00453677)."""
    assert {k: v for k, v in theirs.items() if k != "changes"} == {k: v for k, v in ours.items() if k != "changes"}
    assert theirs["changes"].keys() == ours["changes"].keys(), what
    for key, norms in ours["changes"].items():
        np.testing.assert_allclose(theirs["changes"][key], norms, rtol=1e-5, err_msg=f"{what}: changes of {key}")


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_every_transport_runs_the_same_rounds(case, tmp_path):
    cfg = CASES[case]
    fed, sim_rounds = simulate(tmp_path / "sim", cfg)
    log = fed.state["log"]
    assert len({k for e in log for k in e.get("tasks", {e["task"]: 0})}) > 1
    if case in ("resource-aware-fleet", "spread"):
        assert any(len(e["tasks"]) > 1 for e in log), "a round should train several experts"
    if cfg.warm_start:   # the root alone, then every other expert from its parent's weights
        assert all(set(e["tasks"]) == {"root"} for e in log[:cfg.warm_start])
        assert log[cfg.warm_start - 1]["warm_started"] == sorted(set(fed.tasks) - {"root"})
    db, server = coordinate(tmp_path / "fleet", cfg, fed.prep, tmp_path)
    try:
        status = server.status()
    finally:
        server.stop()
    for rnd, (ours, theirs) in enumerate(zip(sim_rounds, coordinator_weights(tmp_path / "fleet", db))):
        assert_close(ours, theirs, f"coordinator, round {rnd}")
    coord_state = json.loads((tmp_path / "fleet" / "state-hmoe.json").read_text())
    assert_same_rounds(log, coord_state, "coordinator")
    assert_same_strategy(coord_state["strategy"], fed.state["strategy"], "coordinator")
    assert status["schedule"] == cfg.schedule
    make(tmp_path / "flower", cfg)
    fl = simulate_on_flower(tmp_path / "flower", cfg)
    assert_same_rounds(log, fl.state, "flower")
    assert_same_strategy(fl.state["strategy"], fed.state["strategy"], "flower")
    assert_close(fed.weights, fl.weights, "flower")


@pytest.mark.slow
def test_schedule_continues_after_kill9(tmp_path):
    cfg = CASES["worst-validation"]
    fed, sim_rounds = simulate(tmp_path / "sim", cfg)
    db, server = coordinate(tmp_path / "fleet", cfg, fed.prep, tmp_path, kill_after=2)
    try:
        assert server.status()["schedule"] == "worst-validation"
    finally:
        server.stop()
    for rnd, (ours, theirs) in enumerate(zip(sim_rounds, coordinator_weights(tmp_path / "fleet", db))):
        assert_close(ours, theirs, f"coordinator after kill -9, round {rnd}")
    state = json.loads((tmp_path / "fleet" / "state-hmoe.json").read_text())
    assert_same_rounds(fed.state["log"], state, "coordinator after kill -9")
    assert state["strategy"] == fed.state["strategy"]


def test_restart_with_another_schedule_is_refused(tmp_path):
    from trainer.transports.coordinator.service import Coordinator, CoordinatorError
    make(tmp_path / "run", protocol_cfg("proportional"))
    Coordinator(tmp_path / "run", tmp_path / "db.sqlite", SECRET).close()
    with pytest.raises(CoordinatorError, match="'proportional'.*'round-robin'"):
        Coordinator(tmp_path / "run", tmp_path / "db.sqlite", SECRET, schedule="round-robin")


def test_run_without_input_spec_says_how_to_repair(tmp_path):
    from trainer.transports.coordinator.service import Coordinator
    from trainer.protocol.run import RunError
    make(tmp_path / "run", protocol_cfg("round-robin"))
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
