"""Shared fixtures: real data sets in their on-disk formats, written by the tests; the test tiers."""

import pickle
from pathlib import Path

import numpy as np
import pytest

from hierarchy import load_taxonomy


# The unit tier (make test-unit, under a minute on 2 cores): files whose tests start no server,
# no subprocess and no Ray. Every other test not marked slow is integration (make test-fast).
UNIT_FILES = {"test_metrics.py", "test_decode.py", "test_hierarchy_tree.py", "test_taxonomies.py",
              "test_config_flags.py", "test_plan.py", "test_trainer_units.py",
              "test_label_skew.py"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.get_closest_marker("slow"):
            continue
        item.add_marker(pytest.mark.unit if item.path.name in UNIT_FILES else pytest.mark.integration)


@pytest.fixture(scope="session")
def cifar_root(tmp_path_factory) -> Path:
    """A small CIFAR-100 in the official `cifar-100-python` pickle format."""
    root = tmp_path_factory.mktemp("cifar")
    folder = root / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(0)
    tree = load_taxonomy("cifar100")
    names = [tree.names[i] for i in tree.leaves]
    for split, n in (("train", 400), ("test", 100)):
        fine = rng.integers(0, 100, n)
        d = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"fine_labels": fine.tolist(),
             b"coarse_labels": (fine // 5).tolist(), b"filenames": [b"x.png"] * n}
        with (folder / split).open("wb") as f:
            pickle.dump(d, f)
    with (folder / "meta").open("wb") as f:
        pickle.dump({b"fine_label_names": [n.encode() for n in names]}, f)
    return root


@pytest.fixture(scope="session")
def tiny_imagenet_root(tmp_path_factory) -> Path:
    """A small Tiny ImageNet in the official `tiny-imagenet-200` folder layout (JPEG files)."""
    from PIL import Image
    root = tmp_path_factory.mktemp("tin")
    folder = root / "tiny-imagenet-200"
    tree = load_taxonomy("tiny-imagenet")
    wnids = [tree.names[i] for i in tree.leaves]
    (folder / "val" / "images").mkdir(parents=True)
    (folder / "wnids.txt").write_text("\n".join(wnids) + "\n")
    rng = np.random.default_rng(0)
    used = wnids[:12]
    for w in used:
        d = folder / "train" / w / "images"
        d.mkdir(parents=True)
        for j in range(3):
            Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(d / f"{w}_{j}.JPEG")
    lines = []
    for j, w in enumerate(used * 2):
        name = f"val_{j}.JPEG"
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(folder / "val" / "images" / name)
        lines.append(f"{name}\t{w}\t0\t0\t63\t63")
    (folder / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return root


CFG_KW = dict(dataset="synthetic:1,28,28:fashion-mnist:400", clients=4, clients_per_round=2, hmoe_rounds=5,
              flat_rounds=1, expert_width=4, flat_width=4)


def _cfg():
    from trainer.device.client import LocalConfig
    from trainer.protocol.run import RunConfig
    return RunConfig(local=LocalConfig(batch_size=16), **CFG_KW)


CFG = _cfg()


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory) -> Path:
    """A small trained run (HMoE and flat) on synthetic Fashion-MNIST-shaped data."""
    from trainer.transports.inprocess import Federation
    from trainer.prepare import open_run
    run = tmp_path_factory.mktemp("run") / "r"
    _, prep = open_run(run, CFG, resume=False)
    for kind in ("hmoe", "flat"):
        Federation(run, kind, CFG, prep).run(progress=False)
    return run


@pytest.fixture(scope="session")
def bundle_dir(run_dir, tmp_path_factory) -> Path:
    from exporter.bundle import export_run
    out = tmp_path_factory.mktemp("b") / "bundle"
    export_run(run_dir, out, progress=False)
    return out
