"""Regenerate every benchmark and BENCHMARKS.md: `make bench` (full) or `make bench-quick`.

    python benchmarks/bench.py                 # full: results in docs/results/bench, BENCHMARKS.md
    python benchmarks/bench.py --quick         # smaller N, fewer repeats: runs/bench-quick/
    python benchmarks/bench.py --steps table1 render     # some steps only

Steps, in order (each a script of its own, with its own progress bar; trained runs are
kept under --work and reused, so an interrupted bench resumes):

1. fm      train the demo's HMoE and flat models on real Fashion-MNIST under the balanced
           policy, and HMoE under the paper's policy (two jobs at once);
2. table1  benchmarks/table1.py: Table 1 on three shapes, both policies, repeats;
3. tradeoffs  benchmarks/tradeoffs.py: width sweep, Pareto fronts, decoding, compute to F1;
4. edge    benchmarks/edge_inference.py: fp32 and int8 bundles, path-only / all / flat;
5. fleet   benchmarks/coordinator_load.py (wrk), benchmarks/event_loops.py and (with flwr) benchmarks/flower_scale.py;
6. hanzi   benchmarks/hanzi.py: many classes on real glyphs (profile cpu; quick: tiny), into
           docs/results/hanzi (quick: runs/bench-quick/hanzi);
7. render  benchmarks/render.py: BENCHMARKS.md from the JSON (mixed-fleet, grow and subtree
           results are rendered from docs/results/, not run again: 20 to 50 min each).

The quick profile writes to runs/bench-quick/ (its own BENCHMARKS.md), so it never
replaces the repository's full figures.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STEPS = ("fm", "table1", "tradeoffs", "edge", "fleet", "hanzi", "render")
PROFILES = {
    "full": {"results": "docs/results/bench", "work": "runs/bench", "out": "BENCHMARKS.md",
             "fm": [], "repeats": 3, "scale": 1.0, "max_measured": 8, "widths": [8, 16, 32], "images": 300,
             "devices": [200, 1000], "load_seconds": 15, "flower": ["--clients", "1000", "--rounds", "20"]},
    "quick": {"results": "runs/bench-quick/results", "work": "runs/bench-quick", "out": "runs/bench-quick/BENCHMARKS.md",
              "fm": ["--train-limit", "12000", "--hmoe-rounds", "25", "--flat-rounds", "10"], "repeats": 2,
              "max_measured": 4,
              "scale": 0.1, "widths": [8, 16], "images": 100, "devices": [100], "load_seconds": 5,
              "flower": ["--clients", "200", "--rounds", "5", "--train-limit", "4000"]},
}


def run(args: list[str], log: Path | None = None, threads: int = 0) -> None:
    """Run a step; ``threads`` > 0 caps its torch threads (OMP_NUM_THREADS), for jobs side by side."""
    print("$ " + " ".join(args), flush=True)
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    if log is None:
        proc = subprocess.run(args, cwd=ROOT, env=env)
    else:
        with open(log, "a") as f:
            proc = subprocess.run(args, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"failed (exit {proc.returncode}): {' '.join(args)}" + (f"; see {log}" if log else ""))


def fm_runs(work: Path, extra: list[str], jobs: int) -> dict[str, Path]:
    runs = {"balanced": work / "fm-balanced", "paper": work / "fm-paper"}
    todo = {"balanced": ["--model", "both", "--cost-clients", "1"],
            "paper": ["--model", "hmoe", "--no-balanced-epochs", "--cost-clients", "0"]}

    def one(policy: str) -> None:
        out = runs[policy]
        if (out / "report.json").exists():
            return
        args = [sys.executable, "-m", "exporter.cli", "train", "--out", str(out), *todo[policy], *extra]
        if (out / "config.json").exists():
            args.append("--resume")
        run(args, work / f"fm-{policy}.log", threads=max(1, (os.cpu_count() or 1) // jobs) if jobs > 1 else 0)
    print(f"training the Fashion-MNIST runs (logs: {work}/fm-*.log)", flush=True)
    with ThreadPoolExecutor(jobs) as pool:
        list(pool.map(one, runs))
    return runs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smaller N, fewer repeats (about 10 minutes)")
    p.add_argument("--steps", nargs="+", choices=STEPS, default=list(STEPS))
    p.add_argument("--jobs", type=int, default=2, help="trainings at once (costs are always measured one at a time)")
    args = p.parse_args(argv)
    from trainer.device.client import TRAIN_THREADS
    from trainer.machine import git_commit, machine_info
    prof = PROFILES["quick" if args.quick else "full"]
    # paths relative to the repository (every step runs there), so the commands the JSON
    # records name them as a user would
    os.chdir(ROOT)
    results, work, out = Path(prof["results"]), Path(prof["work"]), Path(prof["out"])
    (ROOT / results).mkdir(parents=True, exist_ok=True)
    (ROOT / work).mkdir(parents=True, exist_ok=True)
    py = sys.executable
    meta_path = ROOT / results / "bench.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    steps = dict(meta.get("steps", {}))
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    begin = time.perf_counter()
    fm = {"balanced": work / "fm-balanced", "paper": work / "fm-paper"}
    for step in [s for s in STEPS if s in args.steps]:
        t = time.perf_counter()
        print(f"\n== {step} ==", flush=True)
        if step == "fm":
            fm = fm_runs(work, prof["fm"], args.jobs)
        elif step == "table1":
            run([py, "benchmarks/table1.py", "--out", str(results), "--repeats", str(prof["repeats"]),
                 "--max-measured", str(prof["max_measured"]),
                 "--scale", str(prof["scale"]), "--fm-run", f"balanced={fm['balanced']}", "--fm-run",
                 f"paper={fm['paper']}"])
        elif step == "tradeoffs":
            run([py, "benchmarks/tradeoffs.py", "--out", str(results), "--work", str(work / "sweep"),
                 "--widths", *map(str, prof["widths"]), "--reuse", str(fm["balanced"]), "--decode-run",
                 str(fm["balanced"]), "--jobs", str(args.jobs), *prof["fm"]])
        elif step == "edge":
            # shaped bundles are kept in one cache for both profiles; the quick one builds only the
            # CIFAR-100-shaped bundle (the Tiny ImageNet one, 101 experts, takes minutes to export)
            cached = (ROOT / "runs/bench/edge/tiny-imagenet_bundle_w16/manifest.json").exists()
            shapes = ["cifar100"] if args.quick and not cached else ["cifar100", "tiny-imagenet"]
            run([py, "benchmarks/edge_inference.py", "--demo-run", str(fm["balanced"]), "--out", str(results),
                 "--work", "runs/bench/edge", "--images", str(prof["images"]), "--shapes", *shapes])
            (ROOT / results / "edge_inference.md").unlink(missing_ok=True)
        elif step == "hanzi":
            run([py, "benchmarks/hanzi.py", "--profile", "tiny" if args.quick else "cpu", "--out",
                 str(results.parent / "hanzi"), "--work", str(work / "hanzi")])
        elif step == "fleet":
            run([py, "benchmarks/coordinator_load.py", "--devices", *map(str, prof["devices"]), "--seconds",
                 str(prof["load_seconds"]), "--out", str(work / "coordinator_load")])
            shutil.copy(ROOT / work / "coordinator_load" / "coordinator_load.json", ROOT / results / "coordinator_load.json")
            run([py, "benchmarks/event_loops.py", "--out", str(results)])
            try:
                import flwr  # noqa: F401
            except ImportError:
                print("note: flwr is not installed (pip install '.[flwr]'); Flower's scale figures not measured")
            else:
                run([py, "benchmarks/flower_scale.py", *prof["flower"], "--out", str(work / "flower_scale")])
                shutil.copy(ROOT / work / "flower_scale" / "flower_scale.json", ROOT / results / "flower_scale.json")
        if step != "render":
            steps[step] = time.perf_counter() - t
            meta.update({"profile": "quick" if args.quick else "full", "machine": machine_info(),
                         "commit": git_commit(), "steps": steps, "seconds": sum(steps.values()),
                         "train_threads": TRAIN_THREADS,
                         "command": "make bench-quick" if args.quick else "make bench",
                         "started": meta.get("started", started) if set(args.steps) != set(STEPS) else started})
            meta_path.write_text(json.dumps(meta, indent=1) + "\n")
    if "render" in args.steps:
        run([py, "benchmarks/render.py", "--results", str(results), "--out", str(out)])
    print(f"\nbench done in {(time.perf_counter() - begin) / 60:.1f} min; {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
