"""BENCHMARKS.md against its JSON, and the Table 1 benchmark's own measures."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_benchmarks_md_matches_its_json():
    """Every number in BENCHMARKS.md comes from docs/results: rendering them again gives the file."""
    proc = subprocess.run([sys.executable, "benchmarks/render.py", "--check"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = (ROOT / "BENCHMARKS.md").read_text()
    t = json.loads((ROOT / "docs/results/bench/table1.json").read_text())
    assert set(t["shapes"]) == {"fashion-mnist", "cifar100", "tiny-imagenet"}
    for shape in t["shapes"].values():
        assert set(shape["policies"]) == {"paper", "balanced"}
        assert f"`{shape['dataset']}`" in text
    assert t["repeats"] >= 3


def test_live_tensor_peak_is_deterministic_and_follows_the_batch():
    from trainer.device.client import LocalConfig, Normalizer
    from trainer.device.config import NetConfig
    from trainer.device.cost_worker import live_tensor_peak
    from trainer.device.nets import analytic_bytes
    net = NetConfig((1, 28, 28), 10, width=8).resolved()
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 256, (64, 1, 28, 28), dtype=np.uint8), rng.integers(0, 10, 64)
    norm = Normalizer((0.5,), (0.25,))
    peaks = [live_tensor_peak(net, None, x, y, LocalConfig(batch_size=32), norm, "cpu", None) for _ in range(2)]
    assert peaks[0] == peaks[1] > 0
    small = live_tensor_peak(net, None, x, y, LocalConfig(batch_size=4), norm, "cpu", None)
    assert small < peaks[0]
    # the same order as the analytic count (parameters, gradients, momentum, one batch of activations)
    analytic = analytic_bytes(net, 32, 1)["total"]
    assert 0.3 * analytic < peaks[0] < 3 * analytic


@pytest.mark.slow
def test_table1_on_a_small_cifar100_shape(tmp_path):
    """The benchmark runs end to end (fresh processes, both policies) and renders; the
    balanced policy keeps every measured expert's round within the root's in steps."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import render
    import table1
    assert table1.main(["--out", str(tmp_path), "--shapes", "cifar100", "--scale", "0.03", "--repeats", "2",
                        "--max-measured", "3"]) == 0   # root and the largest and smallest by GMACs
    t = json.loads((tmp_path / "table1.json").read_text())
    s = t["shapes"]["cifar100"]
    assert s["experts"] == 21 and s["train_samples"] == 1500
    for policy in ("paper", "balanced"):
        per = s["policies"][policy]["per_task"]
        assert "root" in s["policies"][policy]["measured"] and len(s["policies"][policy]["measured"]) == 3
        for key in s["policies"][policy]["measured"]:
            assert len(per[key]["time_ms"]["values"]) == 2
            assert per[key]["live_mb"]["min"] == per[key]["live_mb"]["max"]   # deterministic
        if policy == "balanced":
            assert all(v["steps"] <= per["root"]["steps"] for k, v in per.items() if k != "flat")
        else:
            assert all(v["epochs"] == 1 for k, v in per.items() if k != "flat")
    text = render.render(tmp_path, ROOT / "docs/results", tmp_path / "BENCHMARKS.md")
    assert "CIFAR-100 shape" in text and "74 / 96" in text


@pytest.mark.skipif(shutil.which("wrk") is None and not os.environ.get("CI"),
                    reason="wrk is not installed (make setup installs it as root)")
def test_coordinator_load_with_wrk(tmp_path):
    """The load benchmark end to end at a small size: every request answered, every device's
    update counted once, figures for each request kind."""
    out = subprocess.run([sys.executable, "benchmarks/coordinator_load.py", "--devices", "20", "--seconds", "2",
                          "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    size = json.loads((tmp_path / "coordinator_load.json").read_text())["sizes"][0]
    assert set(size["kinds"]) == {"assignment", "weights", "update"}
    for kind, r in size["kinds"].items():
        assert r["requests"] > 20 and r["non_2xx"] == r["socket_errors"] == r["timeouts"] == 0, (kind, r)
        assert 0 < r["p50_ms"] <= r["p95_ms"] <= r["p99_ms"] <= r["max_ms"], (kind, r)
    assert size["kinds"]["update"]["new_updates"] == 20 == size["updates_received"]


def test_boards_run_inside_a_real_limit_or_say_why_not(bundle_dir, tmp_path):
    """benchmarks/boards.py: serve, predictions and a training round inside a cgroup with a hard
    memory limit, with peaks and kills reported; where no limit can be made (not root, no
    controller), exit 2 with one line saying what is missing."""
    out = subprocess.run([sys.executable, "benchmarks/boards.py", "--bundle", str(bundle_dir), "--boards", "2gb",
                          "--predictions", "20", "--train-samples", "200", "--keep-caches", "--stage-seconds", "300",
                          "--out", str(tmp_path)], capture_output=True, text=True, timeout=900)
    if out.returncode == 2:
        assert "cannot run inside a board's limits here" in out.stderr and out.stderr.count("\n") == 1, out.stderr
        assert any(w in out.stderr for w in ("root", "cgroup", "controller")), out.stderr   # says what is missing
        return
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    row = json.loads((tmp_path / "boards.json").read_text())["rows"][0]
    assert row["limit_mb"] == 1700 and row["serve"]["errors"] == 0 and row["serve"]["predictions"] == 20
    assert not row["serve"]["killed"] and row["train"]["returncode"] == 0 and not row["train"]["killed"]
    for stage in ("serve", "train"):
        assert 0 < row[stage]["cgroup_peak_mb"] <= row["limit_mb"] and row[stage]["peak_rss_mb"] > 0


@pytest.mark.slow
def test_trunk_benchmark_trains_scores_and_measures_every_model(tmp_path):
    """benchmarks/trunk.py on a small synthetic data set: the trunk, independent experts and
    flat softmax trained for the same rounds, each scored and its rounds' live tensors measured."""
    proc = subprocess.run([sys.executable, "benchmarks/trunk.py", "--out", str(tmp_path / "out"), "--work",
                           str(tmp_path / "runs"), "--dataset", "synthetic:1,28,28:fashion-mnist:300", "--rounds", "2",
                           "--trunk-blocks", "1", "--expert-width", "4", "--flat-widths", "8", "--trunk-width", "8",
                           "--jobs", "2", "--", "--clients", "3", "--clients-per-round", "3", "--expert-widths",
                           "map:root=8"], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    r = json.loads((tmp_path / "out" / "results.json").read_text())
    assert set(r["models"]) == {"hmoe-trunk1", "hmoe-independent", "flat-w8"}
    trunk = r["models"]["hmoe-trunk1"]
    assert trunk["trunk_blocks"] == 1 and trunk["rounds"] == 2 and 0 <= trunk["greedy"]["info_f1"] <= 1
    assert {v["role"] for v in trunk["live"].values()} == {"root", "largest other"}
    assert all(v["live_mb"] > 0 for m in r["models"].values() for v in m["live"].values())
    assert "| hmoe-trunk1 | 2 |" in (tmp_path / "out" / "results.md").read_text()
