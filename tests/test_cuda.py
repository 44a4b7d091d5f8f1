"""`--device cuda`: the trainer's device plumbing on a real GPU.

Skipped where torch sees no CUDA device (CI has none). On a GPU machine:
``HMOE_DATA=<folder holding fashion-mnist/> python -m pytest tests/test_cuda.py``.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

from trainer.device.client import LocalConfig, Normalizer, local_update  # noqa: E402
from trainer.datasets import DatasetError, load_dataset  # noqa: E402
from trainer.device.nets import NetConfig  # noqa: E402


@pytest.fixture
def exact_fp32():
    """TF32 off, so CPU and GPU compute in the same precision."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def test_local_update_on_cuda_equals_cpu(exact_fp32):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (96, 1, 28, 28), dtype=np.uint8)
    y = rng.integers(0, 3, 96)
    cfg = NetConfig((1, 28, 28), 3, width=8)
    local = LocalConfig(batch_size=32, lr=0.05)
    norm = Normalizer((0.5,), (0.25,))
    w_cpu, m_cpu = local_update(cfg, None, x, y, local, norm, seed=3)
    w_gpu, m_gpu = local_update(cfg, None, x, y, local, norm, seed=3, device="cuda")
    assert set(w_gpu) == set(w_cpu)
    for k in w_cpu:
        assert isinstance(w_gpu[k], np.ndarray) and w_gpu[k].dtype == np.float32
        np.testing.assert_allclose(w_gpu[k], w_cpu[k], rtol=1e-3, atol=1e-5, err_msg=k)
    assert m_gpu["train_loss"] == pytest.approx(m_cpu["train_loss"], abs=1e-4)


def test_federated_run_on_cuda_tracks_cpu_and_measures_cuda_memory(tmp_path):
    from exporter.bundle import export_run
    from trainer.train import train_run
    from trainer.protocol.run import RunConfig
    try:
        load_dataset("fashion-mnist", download=False)
    except DatasetError:
        pytest.skip("Fashion-MNIST files not found (set HMOE_DATA)")
    reports = {}
    for device in ("cuda", "cpu"):
        cfg = RunConfig(train_limit=6000, test_limit=2000, clients=4, clients_per_round=2, hmoe_rounds=15,
                        flat_rounds=5, device=device)
        reports[device] = train_run(tmp_path / device, cfg, ["hmoe", "flat"], resume=False,
                                    cost_clients=1 if device == "cuda" else 0, progress=False)
    gpu, cpu = reports["cuda"], reports["cpu"]
    for kind, rule in (("hmoe", "greedy"), ("flat", "leaf")):
        f1_gpu, f1_cpu = gpu[kind]["test"][rule]["info_f1"], cpu[kind]["test"][rule]["info_f1"]
        print(f"{kind}: Information F1 cuda {f1_gpu:.4f} cpu {f1_cpu:.4f}")
        assert f1_gpu > 0.6
        assert abs(f1_gpu - f1_cpu) < 0.02
    cost = gpu["cost"]
    assert "torch.cuda.max_memory_allocated" in cost["method"]
    runs = [r for task in cost["per_task"].values() for r in task["runs"]]
    assert runs and all(r["device"] == "cuda" and r["method"] == "torch.cuda.max_memory_allocated" for r in runs)
    assert all(r["mem_mb"] > 0 and r["time_ms"] > 0 for r in runs)
    print(f"cuda per-round cost: flat {cost['flat']['time_ms']:.1f} ms {cost['flat']['mem_mb']:.2f} MB; "
          f"largest expert {cost['hmoe_max']['time_ms']:.1f} ms {cost['hmoe_max']['mem_mb']:.2f} MB")
    # weights trained on the GPU export to ONNX and match torch on the CPU
    result = export_run(tmp_path / "cuda", tmp_path / "bundle", validate_images=200, progress=False)
    assert (tmp_path / "bundle" / "manifest.json").is_file() and len(result.rows) >= 6
