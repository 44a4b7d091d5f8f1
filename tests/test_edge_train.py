"""Memory-capped local training of one expert on the device."""

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import load_file

from edge_runtime.bundle import load_bundle
from edge_runtime.local_train import TrainError, load_local_data, train_expert
from exporter.bundle import export_run
from tests.conftest import CFG
from trainer.device.client import LocalConfig
from trainer.transports.inprocess import Federation
from trainer.prepare import open_run


def edge(*args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("hmoe-edge", path=str(Path(sys.executable).parent))
    return subprocess.run([exe, *args], capture_output=True, text=True)


@pytest.fixture(scope="module")
def wide_bundle(tmp_path_factory) -> Path:
    """Experts of width 32: a batch of 512 needs well over 64 MB of activations."""
    from dataclasses import replace
    cfg = replace(CFG, expert_width=32, hmoe_rounds=1)
    run = tmp_path_factory.mktemp("wide") / "run"
    _, prep = open_run(run, cfg, resume=False)
    Federation(run, "hmoe", cfg, prep).run(progress=False)
    out = run.parent / "bundle"
    export_run(run, out, progress=False, validate_images=50)
    return out


@pytest.fixture(scope="module")
def npz(tmp_path_factory) -> Path:
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("data") / "local.npz"
    np.savez(path, images=rng.integers(0, 256, (1024, 28, 28), dtype=np.uint8),
             labels=rng.integers(0, 10, 1024))
    return path


@pytest.mark.slow
@pytest.mark.parametrize("cap", [64, 128])
def test_cap_is_kept_and_result_equals_uncapped(wide_bundle, npz, tmp_path, cap):
    common = ["train", "--bundle", str(wide_bundle), "--expert", "root", "--data", str(npz),
              "--batch-size", "512", "--epochs", "1", "--seed", "7"]
    r = edge(*common, "--memory-cap-mb", str(cap), "--out", str(tmp_path / "capped"))
    assert r.returncode == 0, r.stderr + r.stdout
    report = json.loads((tmp_path / "capped.json").read_text())
    assert report["peak_growth_mb"] < cap and report["within_cap"]
    assert report["loss_after"] < report["loss_before"]
    r = edge(*common, "--out", str(tmp_path / "free"))
    assert r.returncode == 0, r.stderr
    capped = load_file(str(tmp_path / "capped.safetensors"))
    free = load_file(str(tmp_path / "free.safetensors"))
    for k in free:
        np.testing.assert_allclose(capped[k], free[k], atol=2e-5)
    if cap == 64:
        assert report["micro_batch"] < 512


def test_cap_too_small_refuses_before_training(wide_bundle, npz, tmp_path):
    r = edge("train", "--bundle", str(wide_bundle), "--expert", "root", "--data", str(npz),
             "--memory-cap-mb", "0.5", "--out", str(tmp_path / "u"))
    assert r.returncode == 2 and "too small" in r.stderr
    assert not (tmp_path / "u.safetensors").exists()


def test_folder_data_and_bad_classes(bundle_dir, tmp_path):
    b = load_bundle(bundle_dir)
    for cls in ("T-shirt_top", "Sandal", "Sneaker"):
        (tmp_path / "d" / cls).mkdir(parents=True)
        for j in range(3):
            buf = io.BytesIO()
            Image.fromarray(np.full((28, 28), 40 * j, dtype=np.uint8)).save(buf, "PNG")
            (tmp_path / "d" / cls / f"{j}.png").write_bytes(buf.getvalue())
    x, y = load_local_data(tmp_path / "d", b)
    assert x.shape == (9, 1, 28, 28) and x.dtype == np.uint8
    assert sorted(set(b.tree.names[b.tree.leaves[i]] for i in y)) == ["Sandal", "Sneaker", "T-shirt/top"]
    new, report = train_expert(b, "Shoes", x, y, None, LocalConfig(batch_size=4))
    assert report["samples"] == 6 and set(new) == set(load_file(str(b.weights_file("Shoes"))))
    (tmp_path / "d" / "Hats").mkdir()
    with pytest.raises(TrainError, match="'Hats'.*not leaves"):
        load_local_data(tmp_path / "d", b)
    with pytest.raises(TrainError, match="unknown expert 'Bottoms'"):
        train_expert(b, "Bottoms", x, y, None)
    with pytest.raises(TrainError, match="none of the 6 local samples"):
        train_expert(b, "Tops", x[y != 0], y[y != 0], None)


@pytest.mark.slow
def test_bench_writes_table_and_json(bundle_dir, tmp_path):
    out = tmp_path / "bench.json"
    r = edge("bench", "--bundle", str(bundle_dir), "--images", "20", "--samples", "64", "--json", str(out))
    assert r.returncode == 0, r.stderr
    assert "HMoE, largest expert" in r.stdout and "path" in r.stdout
    data = json.loads(out.read_text())
    assert data["machine"]["cores"] >= 1 and set(data["inference"]) >= {"path", "all", "flat"}
    assert data["inference"]["path"]["loaded_after_one"][0] == "root"
    assert not data["inference"]["path"]["torch_loaded"]
    train = data["training"]
    assert train["flat"]["time_ms"] > 0 and train["hmoe_max"]["mem_mb"] >= train["hmoe_min"]["mem_mb"]
