"""Import direction at run time, checked in fresh interpreters: each side loads only what it
needs (the static layers are contracts in pyproject.toml, checked by tests/test_architecture.py)."""

import subprocess
import sys

DEVICE_CORE = "trainer.device"
SERVER_ONLY = ("torchvision", "matplotlib", "onnx", "onnxscript", "nltk")


def loaded_modules(statement: str) -> set[str]:
    code = f"import sys\n{statement}\nprint(' '.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return set(out.stdout.split())


def ours(mods: set[str], package: str) -> set[str]:
    return {m for m in mods if m == package or m.startswith(package + ".")}


def test_hierarchy_loads_neither_torch_nor_onnxruntime():
    mods = loaded_modules("import hierarchy; hierarchy.load_taxonomy('cifar100')")
    assert "torch" not in mods and "onnxruntime" not in mods and "nltk" not in mods


def test_edge_inference_loads_no_torch_trainer_or_exporter(bundle_dir):
    mods = loaded_modules(
        "import numpy as np\n"
        "import edge_runtime.app, edge_runtime.cli\n"
        "from edge_runtime.engine import Engine\n"
        f"e = Engine({str(bundle_dir)!r})\n"
        "e.decode(np.zeros((2, *e.bundle.input_spec.shape), dtype=np.float32))")
    assert "onnxruntime" in mods   # the check ran the real inference path
    assert "torch" not in mods and not ours(mods, "trainer") and not ours(mods, "exporter")


def test_device_training_loads_only_the_device_core(bundle_dir, tmp_path):
    data = tmp_path / "d.npz"
    mods = loaded_modules(
        "import numpy as np\n"
        "rng = np.random.default_rng(0)\n"
        f"np.savez({str(data)!r}, images=rng.integers(0, 256, (32, 28, 28), dtype=np.uint8), "
        "labels=rng.integers(0, 10, 32))\n"
        "import edge_runtime.sync\n"
        "from edge_runtime.bundle import load_bundle\n"
        "from edge_runtime.local_train import load_local_data, train_expert\n"
        f"b = load_bundle({str(bundle_dir)!r})\n"
        f"x, y = load_local_data({str(data)!r}, b)\n"
        "train_expert(b, 'root', x, y, 256)")
    assert "torch" in mods   # it trained
    assert ours(mods, "trainer") - ours(mods, DEVICE_CORE) == {"trainer"}, ours(mods, "trainer")
    assert not ours(mods, "exporter") and not [m for m in SERVER_ONLY if m in mods]


def test_coordinator_process_loads_no_torch(run_dir, tmp_path):
    mods = loaded_modules(
        "from exporter.cli import build_parser\n"
        "build_parser()\n"
        "from trainer.transports.coordinator.service import Coordinator\n"
        "from trainer.transports.coordinator.http import create_app\n"
        f"c = Coordinator({str(run_dir)!r}, {str(tmp_path / 'db.sqlite')!r}, 's')\n"
        "create_app(c)\n"
        "c.assignment(c.enroll('s')['device_id'], [3] * 10); c.tick(); c.status()")
    assert "torch" not in mods and "onnx" not in mods
