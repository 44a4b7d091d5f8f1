"""What several test modules share: free loopback ports, servers that must come up (or the
test fails loudly with the server's own words), and the README's quick-start blocks."""

from __future__ import annotations

import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.conftest import CFG
from trainer.datasets import DatasetError, load_dataset
from trainer.prepare import open_run
from trainer.protocol.fleet import CostBook
from trainer.transports.inprocess import Federation


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_http(url: str, proc: subprocess.Popen | None = None, seconds: float = 30.0) -> None:
    """Until ``url`` answers 200; else the process is killed and its stderr raised."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            break
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    err = ""
    if proc is not None:
        proc.kill()
        err = proc.communicate(timeout=10)[1]
        err = err.decode(errors="replace") if isinstance(err, bytes) else (err or "")
    raise RuntimeError(f"{url} never answered within {seconds:g} s: {err[-3000:]}")


def serve_in_thread(app, seconds: float = 30.0, **config):
    """An ASGI app under uvicorn on a free loopback port in this process: (url, server, thread)."""
    import uvicorn
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", **config))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + seconds
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            server.should_exit = True
            raise RuntimeError(f"uvicorn did not start on 127.0.0.1:{port} within {seconds:g} s")
        time.sleep(0.02)
    return f"http://127.0.0.1:{port}", server, thread


# ------------------------------------------------------------ data sets
def fashion_available() -> bool:
    try:
        load_dataset("fashion-mnist", download=False)
        return True
    except DatasetError:
        return False


needs_fashion = pytest.mark.skipif(not fashion_available() and not os.environ.get("CI"),
                                   reason="Fashion-MNIST files not installed (make setup installs them)")


# ------------------------------------------------------------ the edge app
def png(size=(28, 28), mode="L", seed=0) -> bytes:
    rng = np.random.default_rng(seed)
    shape = size[::-1] + ((3,) if mode == "RGB" else ())
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(buf, "PNG")
    return buf.getvalue()


def edge_exe() -> str:
    return shutil.which("hmoe-edge", path=str(Path(sys.executable).parent))


def start_serve(bundle, *flags: str) -> tuple[subprocess.Popen, str]:
    """`hmoe-edge serve` on a free loopback port, once /health answers."""
    port = free_port()
    proc = subprocess.Popen([edge_exe(), "serve", "--bundle", str(bundle), "--port", str(port), *flags],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    wait_for_http(url + "/health", proc)
    return proc, url


# ------------------------------------------------------------ the coordinator
SECRET = "fleet-secret"
BIN = Path(sys.executable).parent
ALL = replace(CFG, clients_per_round=CFG.clients)   # every enrolled device is sampled every round
COUNTS = {"counts": ",".join(["10"] * 10)}           # ten samples of every leaf


def make_run(path: Path, cfg) -> Path:
    cfg, prep = open_run(path, cfg, resume=False)
    Federation(path, "hmoe", cfg, prep)  # writes the initial expert checkpoints
    return path


class Server:
    def __init__(self, run: Path, db: Path, min_devices: int | None = None, round_seconds: float = 600,
                 *flags: str) -> None:
        self.db = Path(db)
        self.args = [str(BIN / "hmoe"), "coordinator", "--run", str(run), "--db", str(db), "--secret", SECRET,
                     "--round-seconds", str(round_seconds), *flags] + ([] if min_devices is None else
                                                                        ["--min-devices", str(min_devices)])
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.start()

    def start(self) -> None:
        # Its output goes to a file beside the database: a pipe nobody reads would block the
        # coordinator once full, and the file is there to read when a test fails.
        self.log = self.db.with_name(self.db.name + ".log")
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(self.args + ["--port", str(self.port)], stdout=out, stderr=subprocess.STDOUT)
        try:
            wait_for_http(self.url + "/health", self.proc)
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}\ncoordinator log:\n{self.log_tail()}") from None

    def log_tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)

    @property
    def operator(self) -> dict:
        """The operator's bearer header (the token the coordinator wrote beside its database)."""
        return {"Authorization": f"Bearer {Path(str(self.db) + '.operator-token').read_text().strip()}"}

    def status(self) -> dict:
        r = httpx.get(self.url + "/status", headers=self.operator)
        assert r.status_code == 200, r.text
        return r.json()


def enrol(url: str) -> dict:
    r = httpx.post(url + "/enroll", json={"secret": SECRET})
    assert r.status_code == 200, r.text
    return {"Authorization": f"Bearer {r.json()['token']}"}


# ------------------------------------------------------------ fleets
STRONG = {"name": "strong", "share": 0.5, "memory_mb": 64, "speed": 1.0}
WEAK = {"name": "weak", "share": 0.5, "memory_mb": 2, "speed": 0.5}
FCFG = replace(CFG, clients=8, clients_per_round=4, hmoe_rounds=6, expert_width=8, expert_widths="leaves:2")


def book_for(cfg, kinds=("hmoe", "flat")) -> CostBook:
    """Costs that grow with a network's parameters (the measured ones do): memory 1 MB per
    1,000 parameters at full batch, a fifth of it at micro-batch 1; 0.01 ms per 1,000
    parameters and sample (five times that at micro-batch 1)."""
    from trainer.datasets import load_dataset
    d = load_dataset(cfg.dataset)
    book = CostBook()
    for kind in kinds:
        for t in cfg.tasks(kind, d.tree, d.shape).values():
            k = sum(int(np.prod(s)) for s in t.net.param_shapes().values()) / 1000
            book.add(t.net, cfg.local, {"task": t.key, "mem_mb": k, "mem_mb_mb1": k / 5, "ms_per_sample": 0.01 * k,
                                        "ms_per_sample_mb1": 0.05 * k})
    return book


# ------------------------------------------------------------ Flower
def simulate_on_flower(run: Path, cfg, mode: str = "plain", data_dir: Path | None = None) -> Federation:
    """Create the run here, then train it under Flower's simulation runtime in a child
    process inside a loopback-only network namespace (tests.flower_apps)."""
    from hierarchy.errors import UsageError
    from trainer.cli.flower import loopback_command
    if not (run / "config.json").exists():
        _, prep = open_run(run, cfg, False, kinds=("hmoe",))
        Federation(run, "hmoe", cfg, prep)
    cmd = [sys.executable, "-m", "tests.flower_apps", mode, str(run)] + ([str(data_dir)] if data_dir else [])
    try:
        cmd = loopback_command(cmd)
    except UsageError as exc:
        pytest.skip(f"no loopback-only network namespace here, and Ray would listen on every interface: {exc}")
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=root,
                          env={**os.environ, "PYTHONPATH": str(root)})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return Federation(run, "hmoe", cfg, open_run(run, cfg, True, kinds=("hmoe",))[1])
