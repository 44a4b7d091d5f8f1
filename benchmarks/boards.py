"""The edge runtime inside a board's memory: serve + predictions and one memory-capped
training round, each in a real cgroup with a hard memory limit (no swap) and a CPU quota.

    python benchmarks/boards.py --bundle runs/demo/bundle --out docs/results/boards   # as root

Profiles (``PROFILES``) stand for boards by what their operating system leaves free; a CPU
quota limits this machine's share, it does not make an x86 core as slow as a Cortex-A53,
so only the memory figures speak for the board. Per profile and bundle: `hmoe-edge serve`
started inside the limit, ``--predictions`` real images posted one at a time (latency
p50 / p95, errors), then `hmoe-edge train --memory-cap-mb` on one expert inside a fresh
limit; for each, the process's own peak resident memory (wait4's ru_maxrss), the cgroup's
peak (which counts page cache too: the libraries' files, which the kernel reclaims at
the limit rather than kill), how often the limit was reached, and whether the kernel
killed anything (the cgroup's OOM-kill count, the process's signal). Needs root and the
cgroup memory and cpu controllers (v1 or v2); refuses with what is missing otherwise.
Writes boards.json.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path("/sys/fs/cgroup")
# name -> (what it stands for, memory limit MB, CPU quota in cores, training cap MB)
PROFILES = {
    "pi-zero-2w": ("Raspberry Pi Zero 2 W class: 512 MB, 4 x Cortex-A53; 384 MB assumed left by the OS", 384, 1.0, 64),
    "1gb": ("Raspberry Pi 3 B class: 1 GB; 800 MB assumed left", 800, 1.0, 128),
    "2gb": ("Raspberry Pi 4 2 GB class; 1.7 GB assumed left", 1700, 2.0, 256),
}


class LimitError(RuntimeError):
    """A limit this machine cannot create (not root, no controller)."""


class Limit:
    """One cgroup with a hard memory limit (swap off) and a CPU quota, v1 or v2."""

    def __init__(self, name: str, memory_mb: int, cpus: float) -> None:
        if os.geteuid() != 0:
            raise LimitError("creating a memory limit needs root (cgroups are written under /sys/fs/cgroup)")
        self.v2 = (ROOT / "cgroup.controllers").exists()
        self.dirs: list[Path] = []
        limit, period = memory_mb * 2**20, 100_000
        try:
            if self.v2:
                if not {"memory", "cpu"} <= set((ROOT / "cgroup.controllers").read_text().split()):
                    raise LimitError("the cgroup v2 root has no memory or cpu controller")
                (ROOT / "cgroup.subtree_control").write_text("+memory +cpu")
                d = ROOT / name
                d.mkdir()
                self.dirs = [d]
                (d / "memory.max").write_text(str(limit))
                if (d / "memory.swap.max").exists():
                    (d / "memory.swap.max").write_text("0")
                (d / "cpu.max").write_text(f"{int(cpus * period)} {period}")
            else:
                mem, cpu = ROOT / "memory", ROOT / "cpu"
                if not (mem / "memory.limit_in_bytes").exists() or not (cpu / "cpu.cfs_quota_us").exists():
                    raise LimitError("no cgroup v1 memory and cpu controllers under /sys/fs/cgroup")
                for base in (mem, cpu):
                    (base / name).mkdir()
                    self.dirs.append(base / name)
                m = mem / name
                (m / "memory.limit_in_bytes").write_text(str(limit))
                if (m / "memory.memsw.limit_in_bytes").exists():
                    (m / "memory.memsw.limit_in_bytes").write_text(str(limit))   # no swap beyond the limit
                (m / "memory.swappiness").write_text("0")
                (cpu / name / "cpu.cfs_period_us").write_text(str(period))
                (cpu / name / "cpu.cfs_quota_us").write_text(str(int(cpus * period)))
        except OSError as exc:
            self.close()
            raise LimitError(f"cannot create the limit under {ROOT}: {exc}") from None

    def join(self) -> None:
        """In the child, before exec: move this process into the cgroup."""
        for d in self.dirs:
            (d / "cgroup.procs").write_text(str(os.getpid()))

    def peak_mb(self) -> float:
        d = self.dirs[0]
        f = d / ("memory.peak" if self.v2 else "memory.max_usage_in_bytes")
        return int(f.read_text()) / 2**20 if f.exists() else float("nan")

    def limit_hits(self) -> int:
        """How often usage reached the limit (the kernel then reclaims page cache first; v1 only)."""
        f = self.dirs[0] / "memory.failcnt"
        return int(f.read_text()) if f.exists() else -1

    def oom_kills(self) -> int:
        text = (self.dirs[0] / ("memory.events" if self.v2 else "memory.oom_control")).read_text()
        for line in text.splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        return 0

    def close(self) -> None:
        for d in self.dirs:
            for _ in range(50):
                try:
                    d.rmdir()
                    break
                except OSError:
                    time.sleep(0.1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def images(bundle: Path, n: int) -> tuple[list[bytes], np.ndarray, np.ndarray]:
    """PNG bytes of ``n`` images (Fashion-MNIST's test set for a Fashion-MNIST bundle, else
    seeded noise of the bundle's input shape), and uint8 arrays with labels for training."""
    from PIL import Image

    from edge_runtime.bundle import load_bundle
    b = load_bundle(bundle)
    c, h, w = b.input_spec.shape
    leaves = b.tree.num_leaves
    try:
        from trainer.datasets import load_dataset
        if (c, h, w) != (1, 28, 28):
            raise LookupError
        d = load_dataset("fashion-mnist", download=False)
        x, y = d.test_x[:n, 0], d.test_y[:n]
    except Exception:   # noqa: BLE001 - any other shape, or no data set: noise of the right shape
        rng = np.random.default_rng(0)
        x = rng.integers(0, 256, (n, h, w) if c == 1 else (n, h, w, c), dtype=np.uint8)
        y = rng.integers(0, leaves, n)
    out = []
    for a in x:
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, "PNG")
        out.append(buf.getvalue())
    return out, x, y


def exe() -> str:
    return shutil.which("hmoe-edge", path=str(Path(sys.executable).parent)) or "hmoe-edge"


def serve_stage(limit: Limit, bundle: Path, pngs: list[bytes], command: list[str] | None = None) -> dict:
    """``command``: how to start `hmoe-edge` (default this venv's; device_check.py passes the one
    inside the emulated arm64 userland, with the bundle's path there as ``bundle``)."""
    import httpx
    port = free_port()
    proc = subprocess.Popen([*(command or [exe()]), "serve", "--bundle", str(bundle), "--port", str(port)],
                            preexec_fn=limit.join, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    lat, errors = [], 0
    try:
        for _ in range(600):
            if proc.poll() is not None:
                break
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        with httpx.Client(base_url=url, timeout=30) as c:
            for data in pngs:
                t = time.perf_counter()
                try:
                    ok = c.post("/predict", content=data).status_code == 200
                except httpx.HTTPError:
                    ok = False
                lat.append((time.perf_counter() - t) * 1e3)
                errors += not ok
        alive = proc.poll() is None
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        status, rss_mb = reap(proc)
    return {"predictions": len(pngs), "errors": errors, "p50_ms": float(np.percentile(lat, 50)) if lat else None,
            "p95_ms": float(np.percentile(lat, 95)) if lat else None, "alive_at_the_end": alive,
            "peak_rss_mb": rss_mb, "signal": -status if status < 0 else None,
            "stderr_tail": proc.stderr.read().decode(errors="replace")[-500:] if proc.stderr else ""}


def reap(proc: subprocess.Popen, seconds: float = 30) -> tuple[int, float]:
    """Wait for the child (killing it after ``seconds``); its exit status (negative: the signal
    that ended it) and its own peak resident memory (ru_maxrss), read from wait4."""
    deadline = time.monotonic() + seconds
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            proc.returncode = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
            return proc.returncode, usage.ru_maxrss / 1024
        if time.monotonic() > deadline:
            proc.kill()
            deadline = float("inf")
        time.sleep(0.05)


def train_stage(limit: Limit, bundle: Path, x: np.ndarray, y: np.ndarray, cap_mb: float, work: Path,
                seconds: float, command: list[str] | None = None, inside=lambda path: str(path)) -> dict:
    """``command`` as for ``serve_stage``; ``inside`` maps a path here to the command's view of it."""
    from edge_runtime.bundle import load_bundle
    b = load_bundle(bundle)
    data = work / "train.npz"
    np.savez(data, images=x, labels=y)
    t = time.perf_counter()
    proc = subprocess.Popen([*(command or [exe()]), "train", "--bundle", inside(bundle), "--expert", b.tree.names[0],
                             "--data", inside(data), "--memory-cap-mb", f"{cap_mb:g}", "--out",
                             inside(work / "update")],
                            preexec_fn=limit.join, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    status, rss_mb = reap(proc, seconds)
    took = time.perf_counter() - t
    return {"expert": b.tree.names[0], "samples": int(len(y)), "memory_cap_mb": cap_mb, "returncode": status,
            "seconds": took, "timed_out": status == -9 and took >= seconds, "peak_rss_mb": rss_mb,
            "stderr_tail": proc.stderr.read().decode(errors="replace")[-500:]}


def run_board(board: str, bundle_name: str, stages: dict, drop_caches: bool = True) -> dict:
    """One board profile: each stage (``serve``: f(limit), ``train``: f(limit, memory cap)) in a
    fresh limit, with its peaks, limit hits and kills; printed as it goes. Raises LimitError."""
    what, memory_mb, cpus, cap = PROFILES[board]
    row = {"bundle": bundle_name, "board": board, "stands_for": what, "limit_mb": memory_mb, "cpus": cpus}
    for stage, fn in stages.items():
        limit = Limit(f"hmoe-{board}-{stage}-{os.getpid()}", memory_mb, cpus)
        if drop_caches:   # the libraries' pages are read afresh, and charged to this limit
            os.sync()
            Path("/proc/sys/vm/drop_caches").write_text("3")
        try:
            before = limit.oom_kills()
            r = fn(limit) if stage == "serve" else fn(limit, cap)
            r.update(cgroup_peak_mb=limit.peak_mb(), limit_hits=limit.limit_hits(),
                     oom_kills=limit.oom_kills() - before)
            r["killed"] = bool(r["oom_kills"]) or (r.get("returncode") == -9 and not r.get("timed_out")) \
                or r.get("alive_at_the_end") is False
        finally:
            limit.close()
        row[stage] = r
        print(f"{board} {bundle_name} {stage}: peak RSS {r['peak_rss_mb']:.0f} MB, cgroup peak (with page "
              f"cache) {r['cgroup_peak_mb']:.0f} MB of {memory_mb} MB, limit reached {r['limit_hits']} times, "
              f"killed {r['killed']}" + (f", p50 {r['p50_ms']:.1f} ms, p95 {r['p95_ms']:.1f} ms, errors "
                                         f"{r['errors']}" if stage == "serve" else
                                         f", exit {r['returncode']}, {r['seconds']:.1f} s" +
                                         (" (did not finish: stopped at the stage's time limit)"
                                          if r["timed_out"] else "")), flush=True)
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", nargs="+", required=True, help="bundles to run (e.g. runs/demo/bundle)")
    p.add_argument("--boards", nargs="+", default=list(PROFILES), choices=list(PROFILES))
    p.add_argument("--predictions", type=int, default=1000)
    p.add_argument("--train-samples", type=int, default=2000)
    p.add_argument("--out", default="runs/boards")
    p.add_argument("--stage-seconds", type=float, default=300,
                   help="stop a training round still running after this (a limit too small thrashes, re-reading "
                        "the libraries' pages, rather than being killed)")
    p.add_argument("--keep-caches", dest="drop_caches", action="store_false",
                   help="do not drop the page cache before each stage (then library pages already cached are "
                        "charged to other cgroups, and the limit sees less than a board would hold)")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for bundle in map(Path, args.bundle):
        pngs, x, y = images(bundle, max(args.predictions, args.train_samples))
        name = bundle.name if bundle.name != "bundle" else str(bundle.parent.name) + "/bundle"
        for board in args.boards:
            stages = {"serve": lambda limit: serve_stage(limit, bundle, pngs[:args.predictions]),
                      "train": lambda limit, cap: train_stage(limit, bundle, x[:args.train_samples],
                                                              y[:args.train_samples], cap, out, args.stage_seconds)}
            rows.append(run_board(board, name, stages, args.drop_caches))
    (out / "boards.json").write_text(json.dumps({"command": "python benchmarks/boards.py " + " ".join(sys.argv[1:]),
                                                 "cgroup": "v2" if (ROOT / "cgroup.controllers").exists() else "v1",
                                                 "cpu_count": os.cpu_count(), "rows": rows}, indent=1) + "\n")
    print(f"wrote {out / 'boards.json'}")
    return 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except LimitError as exc:
        print(f"boards.py: cannot run inside a board's limits here: {exc}", file=sys.stderr)
        raise SystemExit(2)
