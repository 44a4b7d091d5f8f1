"""Tiny federated runs end to end on real data files, resume, crash recovery, CLI."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.support import needs_fashion
from trainer.device.client import LocalConfig
from trainer.datasets import DatasetError, load_dataset
from trainer.protocol.run import RunConfig
from trainer.transports.inprocess import Federation
from trainer.prepare import open_run

TINY = dict(clients=4, clients_per_round=2, hmoe_rounds=5, flat_rounds=2, expert_width=4, flat_width=4,
            local=LocalConfig(batch_size=16, lr=0.05))


def run_family(tmp: Path, kind: str, cfg: RunConfig, rounds: int | None = None) -> Federation:
    cfg, prep = open_run(tmp, cfg, resume=(tmp / "config.json").exists())
    fed = Federation(tmp, kind, cfg, prep)
    fed.run(rounds, progress=False)
    return fed


@needs_fashion
def test_fashion_mnist_is_real():
    d = load_dataset("fashion-mnist")
    assert d.train_x.shape == (60000, 1, 28, 28) and d.test_x.shape == (10000, 1, 28, 28)
    assert np.bincount(d.test_y).tolist() == [1000] * 10


@needs_fashion
def test_tiny_federated_run_on_fashion_mnist_learns(tmp_path):
    cfg = RunConfig(train_limit=3000, test_limit=1000, **TINY)
    fed = run_family(tmp_path / "run", "hmoe", cfg)
    log = fed.state["log"]
    assert [e["task"] for e in log] == ["root", "Clothes", "Goods", "Tops", "Shoes"]  # topological order
    assert all(e["clients"] >= 1 for e in log)
    test = fed.evaluate(fed.prep.data.test_x, fed.prep.data.test_y)
    assert test["info_f1"] > 0.4, test  # five rounds of one tiny expert each already beat chance (~0.18)
    assert 1.0 <= test["experts_per_input"] <= 3.0
    flat = run_family(tmp_path / "run", "flat", cfg)
    assert flat.evaluate(flat.prep.data.test_x, flat.prep.data.test_y)["info_f1"] > 0.3
    assert sorted(p.name for p in (tmp_path / "run" / "experts").iterdir()) == \
        ["0000-root.safetensors", "0001-Clothes.safetensors", "0002-Goods.safetensors",
         "0003-Tops.safetensors", "0008-Shoes.safetensors"]


def test_cifar100_files_end_to_end(tmp_path, cifar_root):
    cfg = RunConfig(dataset="cifar100", data_root=str(cifar_root), **{**TINY, "hmoe_rounds": 3})
    fed = run_family(tmp_path / "run", "hmoe", cfg)
    assert fed.prep.data.shape == (3, 32, 32) and len(fed.tasks) == 21
    assert fed.state["completed_rounds"] == 3
    r = fed.evaluate(fed.prep.data.test_x, fed.prep.data.test_y, "beam:2")
    assert 0.0 <= r["info_f1"] <= 1.0 and r["experts_per_input"] <= 4


def test_tiny_imagenet_files_end_to_end(tmp_path, tiny_imagenet_root):
    cfg = RunConfig(dataset="tiny-imagenet", data_root=str(tiny_imagenet_root), val_fraction=0.0,
                    **{**TINY, "hmoe_rounds": 2})
    fed = run_family(tmp_path / "run", "hmoe", cfg)
    assert fed.prep.data.shape == (3, 64, 64) and len(fed.prep.data.train_y) == 36
    flat = run_family(tmp_path / "run", "flat", cfg)
    assert flat.evaluate(flat.prep.data.test_x, flat.prep.data.test_y)["leaf_accuracy"] >= 0.0


def test_missing_data_says_where_it_looked(tmp_path):
    with pytest.raises(DatasetError, match="cifar-100-python"):
        load_dataset("cifar100", tmp_path)
    with pytest.raises(DatasetError, match="tiny-imagenet-200"):
        load_dataset("tiny-imagenet", tmp_path)
    with pytest.raises(DatasetError, match="unknown data set"):
        load_dataset("mnist-ish", tmp_path)
    with pytest.raises(DatasetError, match="synthetic:C,H,W:TAXONOMY:N"):
        load_dataset("synthetic:3,32:cifar100:10", tmp_path)


def _crash_during_round(run: Path, cfg: RunConfig, committed: bool) -> None:
    """Leave ``run`` as a kill -9 during round 4 would: the round's new weights written
    as .pending, and the state either committed (roll forward) or not (roll back)."""
    before = run_family(run, "hmoe", cfg, rounds=3)
    key = before.strategy.choose_task(3)
    path = before.checkpoint_path(key)
    old_weights, old_state = path.read_bytes(), before.state_path.read_text()
    after = run_family(run, "hmoe", cfg, rounds=4)
    os.replace(path, path.with_name(path.name + ".pending"))
    path.write_bytes(old_weights)
    if not committed:
        after.state_path.write_text(old_state)


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path):
    cfg = RunConfig(dataset="synthetic:1,28,28:fashion-mnist:600", dropout=0.3, **{**TINY, "hmoe_rounds": 6})
    straight = run_family(tmp_path / "a", "hmoe", cfg)
    run_family(tmp_path / "b", "hmoe", cfg, rounds=3)
    _crash_during_round(tmp_path / "c", cfg, committed=False)
    _crash_during_round(tmp_path / "d", cfg, committed=True)
    for d in ("b", "c", "d"):
        resumed = run_family(tmp_path / d, "hmoe", cfg)
        assert resumed.state["completed_rounds"] == 6
        assert [e["round"] for e in resumed.state["log"]] == list(range(6))
        for k in straight.weights:
            for name in straight.weights[k]:
                np.testing.assert_array_equal(straight.weights[k][name], resumed.weights[k][name], err_msg=d)
        assert not list((tmp_path / d).rglob("*.pending"))


def test_every_client_dropping_out_keeps_the_round_alive(tmp_path):
    cfg = RunConfig(dataset="synthetic:1,28,28:fashion-mnist:200", dropout=0.99, **TINY)
    fed = run_family(tmp_path / "r", "hmoe", cfg)
    assert fed.state["completed_rounds"] == 5
    assert all(e["clients"] == 0 for e in fed.state["log"])


def test_diverged_client_updates_are_left_out_and_weights_stay_finite(tmp_path, capsys):
    cfg = RunConfig(dataset="synthetic:1,28,28:fashion-mnist:200",
                    **{**TINY, "hmoe_rounds": 3, "local": LocalConfig(batch_size=16, lr=float("inf"))})
    start = run_family(tmp_path / "init", "hmoe", cfg, rounds=0).weights
    fed = run_family(tmp_path / "r", "hmoe", cfg)
    log = fed.state["log"]
    assert sum(len(e["diverged"]) for e in log) > 0
    assert all(e["clients"] + len(e["diverged"]) == cfg.clients_per_round for e in log)
    for key, w in fed.weights.items():
        assert all(np.isfinite(v).all() for v in w.values()), key
        if all(e["clients"] == 0 for e in log if e["task"] == key):   # nothing aggregated: initial weights stand
            for name in w:
                np.testing.assert_array_equal(w[name], start[key][name])
    assert "diverged (non-finite loss or weights)" in capsys.readouterr().err
    assert np.isfinite(fed.evaluate(fed.prep.data.test_x, fed.prep.data.test_y)["info_f1"])


def hmoe_cli(*args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("hmoe", path=str(Path(sys.executable).parent))
    cmd = [exe, *args] if exe else [sys.executable, "-m", "exporter.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True)


@pytest.mark.slow
def test_cli_train_then_eval(tmp_path):
    out = tmp_path / "run"
    args = ["train", "--dataset", "synthetic:1,28,28:fashion-mnist:400", "--out", str(out), "--clients", "4",
            "--clients-per-round", "2", "--hmoe-rounds", "5", "--flat-rounds", "2", "--expert-width", "4",
            "--flat-width", "8", "--cost-clients", "1", "--no-progress"]
    r = hmoe_cli(*args)
    assert r.returncode == 0, r.stderr
    assert "HMoE, largest expert" in r.stdout and "flat softmax" in r.stdout
    report = json.loads((out / "report.json").read_text())
    assert set(report["cost"]["per_task"]) == {"root", "Clothes", "Tops", "Goods", "Shoes", "flat"}
    assert report["cost"]["flat"]["mem_mb"] > 0 and report["cost"]["flat"]["time_ms"] > 0
    for task in report["cost"]["per_task"].values():   # time: the median of three repeats per client
        assert all(len(r["times_ms"]) == 3 and r["time_ms"] == np.median(r["times_ms"]) for r in task["runs"])
    assert (out / "plots" / "metric_vs_round.png").stat().st_size > 1000
    assert (out / "plots" / "cost_per_expert.png").stat().st_size > 1000
    assert Path(out / "hierarchy.json").exists()
    again = hmoe_cli(*args)
    assert again.returncode == 2 and "--resume" in again.stderr
    r = hmoe_cli("eval", "--run", str(out), "--decode", "greedy", "beam:3", "--json", str(tmp_path / "e.json"))
    assert r.returncode == 0, r.stderr
    rows = json.loads((tmp_path / "e.json").read_text())
    assert [(x["model"], x["decode"]) for x in rows] == [("hmoe", "greedy"), ("hmoe", "beam:3"),
                                                          ("flat", "leaf"), ("flat", "majority")]
    r = hmoe_cli("eval", "--run", str(tmp_path / "nothing"))
    assert r.returncode == 2 and "not a run directory" in r.stderr
