"""The coordinator over real HTTP with real device processes: rounds, faults, bad input."""

import json
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import httpx
import numpy as np
import pytest
from safetensors.numpy import load, load_file, save

from tests.support import ALL, BIN, COUNTS, SECRET, Server, enrol, make_run
from tests.support import serve_in_thread

def post_update(url, auth, a, weights, samples=10, key=None, **over):
    headers = {**auth, "X-Round": str(a["round"]), "X-Expert": a["expert"],
               "X-Base-Version": str(a["weights_version"]), "X-Samples": str(samples),
               "X-Idempotency-Key": key or f"k-{time.time_ns()}", "X-Metrics": "{}",
               "X-Hyperparameters": json.dumps(a["hyperparameters"])}
    headers.update({k: str(v) for k, v in over.items()})
    body = weights if isinstance(weights, bytes) else save(weights)
    return httpx.post(url + "/update", content=body, headers=headers)


def assignment(url: str, auth: dict) -> dict:
    r = httpx.get(url + "/assignment", headers=auth, params=COUNTS)
    assert r.status_code == 200, r.text
    return r.json()


@pytest.fixture
def run(tmp_path) -> Path:
    return make_run(tmp_path / "run", ALL)


def test_bad_input_is_refused_and_state_does_not_change(run, tmp_path):
    server = Server(run, tmp_path / "state.sqlite", min_devices=2)
    try:
        url = server.url
        auth = enrol(url)
        assignment(url, enrol(url))   # a second device that stays silent: the round stays open
        a = assignment(url, auth)
        w = load(httpx.get(url + f"/weights/{a['expert']}", headers=auth).content)
        before = server.status()
        name = next(iter(w))
        nan = {**w, name: np.full_like(w[name], np.nan)}
        inf = {**w, name: np.full_like(w[name], np.inf)}
        wrong_shape = {**w, name: np.zeros((1, 2), dtype=w[name].dtype)}
        wrong_dtype = {**w, name: w[name].astype(np.float64)}
        missing = {k: v for k, v in w.items() if k != name}
        extra = {**w, "bonus": np.zeros(3, dtype=np.float32)}
        cases = [
            (dict(auth={}, weights=w), 401),
            (dict(auth={"Authorization": "Bearer wrong"}, weights=w), 403),
            (dict(auth=auth, weights=b"\0" * (16 * 1024 * 1024 + 10)), 413),
            (dict(auth=auth, weights=b"definitely not safetensors"), 422),
            (dict(auth=auth, weights=missing), 422),
            (dict(auth=auth, weights=extra), 422),
            (dict(auth=auth, weights=wrong_shape), 422),
            (dict(auth=auth, weights=wrong_dtype), (413, 422)),   # float64: maybe over the expert's size
            (dict(auth=auth, weights=nan), 422),
            (dict(auth=auth, weights=inf), 422),
            (dict(auth=auth, weights=w, samples=-5), 422),
            (dict(auth=auth, weights=w, samples=10**12), 422),
            (dict(auth=auth, weights=w, **{"X-Round": a["round"] + 1}), 409),
            (dict(auth=auth, weights=w, **{"X-Expert": "Shoes" if a["expert"] != "Shoes" else "root"}), 422),
            (dict(auth=auth, weights=w, **{"X-Expert": "Hats"}), 422),
            (dict(auth=auth, weights=w, **{"X-Hyperparameters": json.dumps({**a["hyperparameters"], "lr": 9.0})}),
             422),
            (dict(auth=auth, weights=w, **{"X-Hyperparameters": json.dumps({**a["hyperparameters"], "knob": 1})}),
             422),
            (dict(auth=auth, weights=w, **{"X-Hyperparameters": "[" * 5000}), 422),
            (dict(auth=auth, weights=w, **{"X-Metrics": "[" * 5000}), 422),
            (dict(auth=auth, weights=w, **{"X-Base-Version": a["weights_version"] + 1}), 409),
            (dict(auth=auth, weights=w, **{"X-Samples": "many"}), 422),
        ]
        for kwargs, status in cases:
            r = post_update(url, kwargs.pop("auth"), a, kwargs.pop("weights"), **kwargs)
            assert r.status_code in (status if isinstance(status, tuple) else (status,)), (kwargs, r.status_code,
                                                                                          r.text)
            assert server.status() == before
        r = post_update(url, auth, a, w, **{"X-Hyperparameters": json.dumps({**a["hyperparameters"], "epochs": 7})})
        assert r.status_code == 422 and "epochs 7 (assigned 1)" in r.json()["detail"], r.text
        assert httpx.post(url + "/enroll", json={"secret": "guess"}).status_code == 403
        assert httpx.get(url + "/weights/Hats", headers=auth).status_code == 404
        ok = post_update(url, auth, a, w, key="once")
        again = post_update(url, auth, a, w, key="once")
        assert ok.json() == {**again.json(), "duplicate": False} and again.json()["duplicate"]
        assert server.status()["updates_received"] == 1
    finally:
        server.stop()


def test_sigkill_mid_round_loses_nothing_and_counts_nothing_twice(run, tmp_path):
    db = tmp_path / "state.sqlite"
    server = Server(run, db, min_devices=2)
    try:
        url = server.url
        alice, bob = enrol(url), enrol(url)
        assert assignment(url, alice)["wait"]           # planned once both have reported their samples
        b = assignment(url, bob)
        a = assignment(url, alice)
        assert a["expert"] == b["expert"] and a["hyperparameters"] == b["hyperparameters"]
        w = load(httpx.get(url + f"/weights/{a['expert']}", headers=alice).content)
        w_alice = {k: v + 0.001 for k, v in w.items()}   # small changes: inside the influence bound
        w_bob = {k: v - 0.003 for k, v in w.items()}
        assert post_update(url, alice, a, w_alice, samples=30, key="alice-0").status_code == 200
        server.kill9()
        server.start()
        s = server.status()
        assert s["round"] == a["round"] and s["updates_received"] == 1
        assert post_update(url, alice, a, w_alice, samples=30, key="alice-0").json()["duplicate"]
        assert server.status()["updates_received"] == 1
        assert post_update(url, bob, a, w_bob, samples=10, key="bob-0").status_code == 200
        s = server.status()
        assert s["round"] == a["round"] + 1 and s["rounds_aggregated"] == 1 and s["updates_total"] == 2
        new = load(httpx.get(url + f"/weights/{a['expert']}", headers=alice).content)
        for k in w:  # (30 * (w + 0.001) + 10 * (w - 0.003)) / 40 = w
            np.testing.assert_allclose(new[k], w[k], atol=1e-6)
    finally:
        server.stop()


def test_crash_between_commit_and_checkpoint_copy_is_repaired_on_restart(run, tmp_path):
    """The process dies (os._exit) right after a new version is committed, before the run
    directory's checkpoint is rewritten; the next start brings the checkpoint up to date."""
    db = tmp_path / "state.sqlite"
    crash = (
        "import os, sys\n"
        "from safetensors.numpy import save\n"
        "from trainer.transports.coordinator.service import Coordinator\n"
        f"c = Coordinator({str(run)!r}, {str(db)!r}, {SECRET!r}, min_devices=1)\n"
        "c.driver.commit = lambda *a, **k: os._exit(9)\n"   # dies before the run directory follows the commit
        "dev = c.enroll(" + repr(SECRET) + ")['device_id']\n"
        "from safetensors.numpy import load_file\n"
        "cur = c.assignment(dev, [10] * 10)\n"
        "w = {k: v + 0.5 for k, v in load_file(str(c.weights_file(cur['expert']))).items()}\n"
        "c.submit(dev, cur['round'], cur['expert'], cur['weights_version'], 10, 'k', {}, save(w), "
        "cur['hyperparameters'])\n"
        "c.tick()\n"   # waits for the round to close: the process dies in it
    )
    r = subprocess.run([sys.executable, "-c", crash], capture_output=True, text=True, timeout=120)
    assert r.returncode == 9, r.stderr
    from trainer.protocol.checkpoint import load_checkpoint
    from trainer.transports.coordinator.service import Coordinator
    coord = Coordinator(run, db, SECRET, min_devices=1)
    try:
        expert = coord.db.execute("SELECT expert FROM rounds WHERE round = 0").fetchone()[0]
        assert coord.version(expert) == 1
        committed = load_file(str(coord.weights_file(expert)))
        weights, _, meta = load_checkpoint(coord._checkpoint_path(expert))
        assert meta["round"] == 0
        for k in committed:
            np.testing.assert_array_equal(weights[k], committed[k])
        state = json.loads((run / "state-hmoe.json").read_text())   # the simulation's log format
        assert state["completed_rounds"] == 1 and state["log"][0]["task"] == expert
        assert state["log"][0]["clients"] == 1 and state["versions"][expert] == 0
        assert coord._repair_run_dir() == []   # nothing left to repair
    finally:
        coord.close()


@pytest.mark.slow
def test_four_devices_over_http_match_the_simulation(tmp_path):
    from trainer.datasets import DatasetError, load_dataset
    try:
        data = load_dataset("fashion-mnist", download=False)
    except DatasetError:
        pytest.skip("Fashion-MNIST not installed")
    from trainer.device.client import LocalConfig
    cfg = replace(ALL, dataset="fashion-mnist", expert_width=8, train_limit=0, local=LocalConfig(lr=0.02))
    run = make_run(tmp_path / "run", cfg)
    from trainer.partition import partition
    rng = np.random.default_rng(0)
    pool = rng.choice(len(data.train_y), 6000, replace=False)
    parts = partition("dirichlet", data.train_y[pool], 4, seed=1, alpha=1.0)
    files = []
    for i, p in enumerate(parts):
        f = tmp_path / f"device{i}.npz"
        np.savez(f, images=data.train_x[pool[p]][:, 0], labels=data.train_y[pool[p]])
        files.append(f)
    server = Server(run, tmp_path / "state.sqlite", None, 120, "--keep-update-rounds", "-1")   # the test reads them
    try:
        devices = [subprocess.Popen([str(BIN / "hmoe-edge"), "sync", "--server", server.url, "--token", SECRET,
                                     "--data", str(f), "--memory-cap-mb", "128", "--rounds", "3", "--poll", "0.2"],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for f in files]
        for d in devices:
            out, err = d.communicate(timeout=600)
            assert d.returncode == 0, err[-3000:]
        deadline = time.time() + 60
        while server.status()["rounds_aggregated"] < 3 and time.time() < deadline:
            time.sleep(0.5)
        s = server.status()
        assert s["rounds_aggregated"] >= 3
        touched = [k for k, v in s["versions"].items() if v > 0]
        assert len(touched) >= 2
        from trainer.transports.coordinator.service import Coordinator
        coord = Coordinator(run, tmp_path / "state.sqlite", SECRET)
        tree = coord.tree
        strategy = cfg.strategy("hmoe", tree, coord.tasks)
        for rnd in range(3):
            expert = strategy.choose_task(rnd)
            updates = coord.round_updates(rnd)
            assert len(updates) == 4
            mine = strategy.aggregate([(w, m["num_samples"]) for w, m in updates.values()],
                                      load_file(str(coord.weights_file(expert, 0))))
            theirs = load_file(str(coord.weights_file(expert, 1)))
            for k in mine:
                np.testing.assert_array_equal(mine[k], theirs[k])
        from trainer.device.client import Normalizer, load_numpy
        from trainer.evaluate import evaluate_hmoe
        from trainer.device.nets import build_net
        x, y = data.test_x[:2000], data.test_y[:2000]

        def f1(version_of):
            nets = {}
            for key, task in coord.tasks.items():
                net = build_net(task.net)
                load_numpy(net, load_file(str(coord.weights_file(key, version_of(key)))))
                nets[task.node] = net
            return evaluate_hmoe(tree, nets, x, y, Normalizer(data.mean, data.std))["info_f1"]

        start, end = f1(lambda k: 0), f1(lambda k: coord.version(k))
        assert end > start + 0.05, (start, end)
    finally:
        server.stop()


def test_sync_restart_after_sending_counts_once(run, tmp_path):
    """A device that crashed after its update was acknowledged but before it noted so
    retrains after the restart and sends again under the same idempotency key."""
    server = Server(run, tmp_path / "state.sqlite", min_devices=2)
    try:
        assignment(server.url, enrol(server.url))   # a second device reports and stays silent: round 0 stays open
        rng = np.random.default_rng(0)
        data = tmp_path / "d.npz"
        np.savez(data, images=rng.integers(0, 256, (64, 28, 28), dtype=np.uint8), labels=rng.integers(0, 10, 64))
        state = tmp_path / "device.json"
        cmd = [str(BIN / "hmoe-edge"), "sync", "--server", server.url, "--token", SECRET, "--data", str(data),
               "--rounds", "1", "--state", str(state)]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0 and "accepted" in r.stdout, r.stderr
        saved = json.loads(state.read_text())
        del saved["last_round"]
        state.write_text(json.dumps(saved))
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0 and "duplicate" in r.stdout, r.stderr + r.stdout
        s = server.status()
        assert s["updates_received"] == 1 and s["round"] == 0
    finally:
        server.stop()


def test_sync_refuses_hyperparameters_it_does_not_know(run, tmp_path):
    """A coordinator of a newer release sends a hyper-parameter this device lacks: a clear error, no training."""
    from edge_runtime.sync import SyncError, sync
    from trainer.transports.coordinator.service import Coordinator
    from trainer.transports.coordinator.http import create_app
    coord = Coordinator(run, tmp_path / "state.sqlite", SECRET, min_devices=1)
    plain = coord.assignment
    coord.assignment = lambda *args, **kw: (lambda a: {**a, "hyperparameters": {**(a["hyperparameters"] or {}),
                                                                                "future_knob": 1}})(plain(*args, **kw))
    url, server, thread = serve_in_thread(create_app(coord))
    try:
        rng = np.random.default_rng(0)
        data = tmp_path / "d.npz"
        np.savez(data, images=rng.integers(0, 256, (16, 28, 28), dtype=np.uint8), labels=rng.integers(0, 10, 16))
        with pytest.raises(SyncError, match="future_knob"):
            sync(url, SECRET, data, None, rounds=1, state_file=tmp_path / "dev.json",
                 log=lambda *_: None)
        assert coord.status()["updates_total"] == 0
    finally:
        server.should_exit = True
        thread.join(10)
        coord.close()


def test_small_requests_cannot_cost_much(run, tmp_path):
    """A large or deeply nested /enroll body, and an update whose safetensors header lists
    many tiny tensors, are refused before they are parsed whole."""
    server = Server(run, tmp_path / "state.sqlite", min_devices=1)
    try:
        url = server.url
        assert httpx.post(url + "/enroll", content=b"{" + b" " * 100_000 + b"}").status_code == 413
        nested = '{"secret": ' + "[" * 2000 + "]" * 2000 + "}"
        assert httpx.post(url + "/enroll", content=nested).status_code == 422
        auth = enrol(url)
        a = assignment(url, auth)
        many = save({f"t{i}": np.zeros(1, dtype=np.float32) for i in range(100_000)})
        r = post_update(url, auth, a, many)   # refused on its size (the expert's own), before a byte is parsed
        assert r.status_code == 413 and "limit" in r.json()["detail"], r.text
        w = load(httpx.get(url + f"/weights/{a['expert']}", headers=auth).content)
        fits = save({f"t{i}": np.zeros(1, dtype=np.float32) for i in range(400)})   # as large, many tiny tensors
        assert len(fits) < len(save(w)) + 4096
        r = post_update(url, auth, a, fits)   # refused on the header's size, before its entries are parsed
        assert r.status_code == 422 and "header" in r.json()["detail"], r.text
        assert server.status()["updates_received"] == 0
    finally:
        server.stop()
