"""Personalised devices: a subtree bundle is served with the subtree's root as its root, says
so in every answer, decides as the full model does inside the subtree, and a device carrying
it trains only the experts inside it."""

import json
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest

from edge_runtime.engine import Engine
from exporter.bundle import export_run
from tests.support import ALL, SECRET, Server, enrol, make_run, png, start_serve
from trainer.protocol.run import load_hierarchy

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def goods(run_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sub") / "goods"
    export_run(run_dir, out, subtree="Goods", progress=False)
    return out


def test_a_subtree_bundle_decides_as_the_full_model_inside_its_subtree(run_dir, bundle_dir, goods):
    from trainer.protocol.run import run_files
    from trainer.prepare import prepare
    cfg, tree, spec = run_files(run_dir)
    prep = prepare(cfg)
    d = prep.data
    under = np.flatnonzero(tree.ancestor_mask[tree.leaf_order[d.test_y], tree.index("Goods")])
    assert len(under) > 10
    x = spec.normalize(d.test_x[under])
    full, sub = Engine(bundle_dir), Engine(goods)
    assert sub.tree.names[0] == "Goods" and sub.bundle.manifest.subtree_of == "Goods"
    assert [p.node for p in sub.predict(x)] == full.greedy_from("Goods", x)
    # an input of another class gets the best node inside the subtree
    others = spec.normalize(d.test_x[np.setdiff1d(np.arange(len(d.test_y)), under)[:20]])
    leaves = {sub.tree.names[v] for v in sub.tree.leaf_order}
    assert {p.leaf for p in sub.predict(others)} <= leaves
    assert set(sub.entries) == {"Goods", "Shoes"} and sub.loaded == ["Goods", "Shoes"][:len(sub.loaded)]


def test_serving_a_subtree_bundle_says_so(goods, bundle_dir):
    proc, url = start_serve(goods)
    try:
        health = httpx.get(url + "/health").json()
        assert health["subtree"] is True and health["bundle_root"] == "Goods"
        assert set(health["leaves"]) == {"Bag", "Sandal", "Sneaker", "Ankle boot"}
        r = httpx.post(url + "/predict", content=png(seed=3), headers={"content-type": "image/png"})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["subtree"] is True and body["bundle_root"] == "Goods" and body["path"][0] == "Goods"
        assert body["leaf"] in health["leaves"]
    finally:
        proc.terminate()
        proc.wait(10)
    img = goods.parent / "x.png"
    img.write_bytes(png(seed=4))
    for bundle, sub in ((bundle_dir, False), (goods, True)):   # the CLI's answers say it too
        r = subprocess.run([str(BIN / "hmoe-edge"), "predict", "--bundle", str(bundle), str(img), "--json"],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["subtree"] is sub


def test_a_device_with_a_subtree_bundle_trains_only_experts_inside_it(tmp_path, goods):
    run = make_run(tmp_path / "run", ALL)   # the one device is sampled every round
    tree = load_hierarchy(run)
    server = Server(run, tmp_path / "state.sqlite", min_devices=1)
    try:
        auth = enrol(server.url)
        counts = ",".join(["3"] * tree.num_leaves)
        seen = {}
        r = httpx.get(server.url + "/assignment", params={"counts": counts, "subtree": "Hats"}, headers=auth)
        assert r.status_code == 422 and "unknown subtree node 'Hats'" in r.text
        # the device syncs with its Goods bundle: rounds of experts outside Goods are excused, not trained
        rng = np.random.default_rng(0)
        data = tmp_path / "d.npz"
        np.savez(data, images=rng.integers(0, 256, (48, 28, 28), dtype=np.uint8), labels=rng.integers(0, 10, 48))
        r = subprocess.run([str(BIN / "hmoe-edge"), "sync", "--server", server.url, "--token", SECRET, "--data",
                            str(data), "--bundle", str(goods), "--until-round", "5", "--state",
                            str(tmp_path / "dev.json"), "--poll", "0.05"], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        assert "carries the subtree Goods" in r.stdout
        for line in r.stdout.splitlines():
            if line.startswith("round "):
                rnd, rest = line[6:].split(":", 1)
                seen[int(rnd)] = rest
        s = server.status()
        assert s["round"] >= 5   # (round 5 closes at once when its expert is outside: the asking excuses)
        import sqlite3
        with sqlite3.connect(tmp_path / "state.sqlite") as con:
            rounds = dict(con.execute("SELECT round, expert FROM rounds WHERE round < 5"))
            trained = {r for (r,) in con.execute("SELECT round FROM updates")}
        inside = {"Goods", "Shoes"}
        for rnd, expert in rounds.items():
            if expert in inside:
                assert rnd in trained and "trained" in seen[rnd], (rnd, expert, seen)
            else:
                assert rnd not in trained and "outside the device's subtree Goods" in seen[rnd], (rnd, expert, seen)
        assert set(rounds.values()) - inside   # some rounds were outside
    finally:
        server.stop()
