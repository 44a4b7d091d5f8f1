"""A fresh virtual environment with only the edge extra (no torch) runs predict and serve."""

import io
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_edge_extra_without_torch(bundle_dir, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    r = subprocess.run([str(py), "-m", "pip", "install", "-q", f"{REPO}[edge]"], capture_output=True, text=True,
                       env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    r = subprocess.run([str(py), "-c", "import importlib.util as u; print(u.find_spec('torch') is None)"],
                       capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "True", "the edge extra must not pull in torch"
    image = tmp_path / "x.png"
    Image.fromarray(np.zeros((28, 28), dtype=np.uint8)).save(image)
    exe = venv / "bin" / "hmoe-edge"
    r = subprocess.run([str(exe), "predict", "--bundle", str(bundle_dir), str(image), "--json"],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert '"path": ["root"' in r.stdout
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([str(exe), "serve", "--bundle", str(bundle_dir), "--port", str(port)], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        import httpx

        from tests.support import wait_for_http
        wait_for_http(f"http://127.0.0.1:{port}/health", proc)
        buf = io.BytesIO()
        Image.fromarray(np.zeros((28, 28), dtype=np.uint8)).save(buf, "PNG")
        r = httpx.post(f"http://127.0.0.1:{port}/predict", content=buf.getvalue())
        assert r.status_code == 200 and r.json()["path"][0] == "root"
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.mark.slow
def test_device_extra_trains_an_expert_without_server_packages(bundle_dir, tmp_path):
    """A device that trains installs torch, safetensors and psutil, not the server's packages.
    torch==2.13.0 picks the CPU build that lies on this kind of machine (a tenth of the CUDA build)."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    r = subprocess.run([str(py), "-m", "pip", "install", "-q", f"{REPO}[device]", "torch==2.13.0"],
                       capture_output=True, text=True, env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    r = subprocess.run([str(py), "-c", "import importlib.util as u; print([m for m in ('torchvision', 'matplotlib', "
                        "'onnx', 'onnxscript', 'onnxruntime', 'nltk', 'fastapi') if u.find_spec(m)])"],
                       capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "[]", "the device extra must not pull in server packages: " + r.stdout
    rng = np.random.default_rng(0)
    data = tmp_path / "d.npz"
    np.savez(data, images=rng.integers(0, 256, (64, 28, 28), dtype=np.uint8), labels=rng.integers(0, 10, 64))
    r = subprocess.run([str(venv / "bin" / "hmoe-edge"), "train", "--bundle", str(bundle_dir), "--expert", "Shoes",
                        "--data", str(data), "--memory-cap-mb", "256", "--out", str(tmp_path / "update")],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "update.safetensors").stat().st_size > 0
    assert '"within_cap": true' in (tmp_path / "update.json").read_text()
