"""Flower's simulation runtime at scale: `hmoe flower` with many virtual SuperNodes (a few
sampled per round) on this machine; wall time, peak memory of the whole process tree (the
ServerApp, Ray and its actors) and rounds per minute, written to --out as JSON and Markdown.

    python benchmarks/flower_scale.py --clients 1000 --rounds 20 --out runs/flower_scale
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import psutil


def tree_rss(pid: int) -> int:
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/flower_scale")
    p.add_argument("--clients", type=int, default=1000, help="virtual SuperNodes, one client each")
    p.add_argument("--clients-per-round", type=int, default=5)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--train-limit", type=int, default=20000, help="Fashion-MNIST training images shared out")
    p.add_argument("--ray-cpus", type=int, default=0, help="CPUs Ray may use (default: all)")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    run = out / "run"
    cmd = [sys.executable, "-m", "exporter.cli", "flower", "--out", str(run), "--resume", "--clients", str(args.clients),
           "--clients-per-round", str(args.clients_per_round), "--hmoe-rounds", str(args.rounds),
           "--train-limit", str(args.train_limit), "--partition", "iid", "--ray-cpus", str(args.ray_cpus)]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak, done_at = 0, {}
    state = run / "state-hmoe.json"
    while proc.poll() is None:
        peak = max(peak, tree_rss(proc.pid))
        try:
            n = json.loads(state.read_text())["completed_rounds"] if state.exists() else 0
        except (json.JSONDecodeError, OSError):
            n = 0
        done_at.setdefault(n, time.perf_counter() - start)
        time.sleep(0.25)
    wall = time.perf_counter() - start
    log = proc.stdout.read()
    (out / "flower.log").write_text(log)
    if proc.returncode != 0:
        print(log[-3000:], file=sys.stderr)
        return proc.returncode
    first = min((t for n, t in done_at.items() if n >= 1), default=None)
    last = max(done_at.values())
    rounds_seen = max(done_at)
    per_min = 60.0 * (rounds_seen - 1) / (last - first) if first is not None and rounds_seen > 1 and last > first \
        else None
    from trainer.machine import git_commit, machine_info
    result = {"command": " ".join(sys.argv), "settings": vars(args), "wall_seconds": wall,
              "seconds_to_first_round": first, "peak_rss_mb": peak / 2**20, "rounds": rounds_seen,
              "rounds_per_minute_after_the_first": per_min, "machine": machine_info(), "commit": git_commit(),
              "memory_method": "sum of RSS over the `hmoe flower` process and all its descendants (Ray's GCS, "
                               "raylet, workers and actors), sampled every 0.25 s"}
    (out / "flower_scale.json").write_text(json.dumps(result, indent=1) + "\n")
    md = (f"| virtual SuperNodes | sampled per round | rounds | wall (s) | to first round (s) | rounds / min after "
          f"the first | peak memory, process tree (MB) |\n|---|---|---|---|---|---|---|\n"
          f"| {args.clients} | {args.clients_per_round} | {rounds_seen} | {wall:.0f} | {first:.0f} | "
          f"{per_min:.1f} | {peak / 2**20:.0f} |\n")
    (out / "flower_scale.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
