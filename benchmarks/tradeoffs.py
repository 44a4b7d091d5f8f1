"""Trade-offs on real Fashion-MNIST: the width sweep with its Pareto front, decoding, and
total client compute to reach a given Information F1, HMoE against flat softmax.

- Width sweep: HMoE (experts of width W) and flat softmax (width W) trained with the demo's
  settings for every W in --widths; test Information F1 against per-round client memory
  (the deterministic peak of live torch tensors of the largest expert's / the flat model's
  round, beside the analytic count and resident-set growth) and against total client
  compute (GMACs over the whole run). A point is on the Pareto front when no other point
  has higher F1 at no more cost.
- Decoding: `hmoe eval` on --decode-run with greedy, beam 2 and 3, and thresholds (the
  threshold curve is information precision against recall), flat's leaf and majority rules.
- Compute to F1: from every sweep run's round log, the client GMACs spent until the
  validation Information F1 first reached each of --targets.

Runs already trained (a report.json in their folder) are reused, so an interrupted sweep
resumes; --reuse DIR takes the HMoE and flat points of an existing run of the demo's
settings (e.g. the Table 1 run) instead of training them again.

    python benchmarks/tradeoffs.py --out docs/results/bench --work runs/bench/sweep \\
        --reuse runs/bench/fm-balanced --decode-run runs/bench/fm-balanced
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np

THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)


def train(args: list[str], log: Path, threads: int = 0) -> None:
    """`hmoe train ARGS`, its output to ``log``; ``threads`` > 0 caps its torch threads (jobs
    side by side must not oversubscribe the cores: OpenMP threads then spin against each
    other and a round takes several times as long)."""
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    with open(log, "a") as f:
        proc = subprocess.run([sys.executable, "-m", "exporter.cli", "train", *args], stdout=f,
                              stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"`hmoe train {' '.join(args)}` failed; see {log}")


REUSE_LOCK = threading.Lock()
THREADS = [0]   # torch threads per training job (main: the cores shared among --jobs)


def reusable(kind: str, width: int, reuse: Path, rounds: dict, train_limit: int, cost_clients: int,
             work: Path) -> bool:
    cfg = json.loads((reuse / "config.json").read_text())
    same = (cfg["expert_width" if kind == "hmoe" else "flat_width"] == width
            and cfg.get("train_limit", 0) == train_limit and cfg[f"{kind}_rounds"] == rounds[kind])
    if not same or not (reuse / "report.json").exists():
        return False
    if "cost" not in json.loads((reuse / "report.json").read_text()):
        both = (reuse / "state-flat.json").exists() and (reuse / "state-hmoe.json").exists()
        train(["--out", str(reuse), "--resume", "--model", "both" if both else kind,
               "--cost-clients", str(cost_clients)], work / f"{reuse.name}-cost.log")
    return True


def run_point(kind: str, width: int, work: Path, reuse: Path | None, rounds: dict, train_limit: int,
              cost_clients: int) -> Path:
    """The run directory holding ``kind`` at ``width`` (trained now unless it exists; a reused
    run without cost figures gets them measured)."""
    work.mkdir(parents=True, exist_ok=True)
    with REUSE_LOCK:   # both families of a reused run may need its cost measured: once
        if reuse is not None and (reuse / f"state-{kind}.json").exists() and reusable(kind, width, reuse, rounds,
                                                                                     train_limit, cost_clients, work):
            return reuse
    out = work / f"{kind}-w{width}"
    if (out / "report.json").exists():
        return out
    args = ["--model", kind, "--out", str(out), "--expert-width" if kind == "hmoe" else "--flat-width", str(width),
            "--hmoe-rounds", str(rounds["hmoe"]), "--flat-rounds", str(rounds["flat"]),
            "--cost-clients", str(cost_clients), "--train-limit", str(train_limit)]
    if (out / "config.json").exists():
        args.append("--resume")
    train(args, work / f"{kind}-w{width}.log", THREADS[0])
    return out


def point(kind: str, width: int, run: Path) -> dict:
    report = json.loads((run / "report.json").read_text())
    s = report[kind]
    cost = report.get("cost", {})
    task = cost.get("flat") if kind == "flat" else cost.get("hmoe_max")
    log = s["log"]
    return {"model": kind, "width": width, "run": str(run), "info_f1": s["test"]["greedy" if kind == "hmoe" else
                                                                              "leaf"]["info_f1"],
            "live_mb": task.get("live_mb") if task else None, "analytic_mb": task.get("analytic_mb") if task else None,
            "rss_mb": task.get("mem_mb") if task else None, "time_ms": task.get("time_ms") if task else None,
            "total_client_gmacs": float(sum(e.get("client_gmacs", 0.0) for e in log)),
            "total_client_seconds": s.get("total_client_seconds"), "rounds": s.get("rounds"),
            "curve": [[float(np.sum([e.get("client_gmacs", 0.0) for e in log[:i + 1]])), e["val_info_f1"]]
                      for i, e in enumerate(log) if e.get("val_info_f1") is not None]}


def pareto(points: list[dict], cost: str) -> list[int]:
    """Indices of the points no other point beats: higher F1 at no more cost."""
    front = []
    for i, p in enumerate(points):
        if p[cost] is None:
            continue
        if not any(q[cost] is not None and q[cost] <= p[cost] and q["info_f1"] >= p["info_f1"]
                   and (q[cost] < p[cost] or q["info_f1"] > p["info_f1"]) for q in points):
            front.append(i)
    return front


def compute_to_f1(points: list[dict], targets: list[float]) -> list[dict]:
    rows = []
    for p in points:
        reach = {}
        for t in targets:
            hit = next((g for g, f1 in p["curve"] if f1 >= t), None)
            reach[f"{t:g}"] = hit
        rows.append({"model": p["model"], "width": p["width"], "gmacs_to_reach": reach,
                     "final_val_f1": p["curve"][-1][1] if p["curve"] else None})
    return rows


def decoding(run: Path, work: Path) -> list[dict]:
    out = work / "decoding.json"
    specs = ["greedy", "beam:2", "beam:3"] + [f"threshold:{t:g}" for t in THRESHOLDS]
    proc = subprocess.run([sys.executable, "-m", "exporter.cli", "eval", "--run", str(run), "--decode", *specs,
                           "--json", str(out)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"hmoe eval failed: {proc.stderr.strip()[-1500:]}")
    rows = json.loads(out.read_text())
    keep = ("model", "decode", "info_f1", "info_precision", "info_recall", "leaf_accuracy", "experts_per_input")
    return [{k: r.get(k) for k in keep} for r in rows]


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    pts = result["sweep"]["points"]
    fig, axes = plt.subplots(1, 4, figsize=(19, 4))
    for ax, cost, label in ((axes[0], "live_mb", "per-round memory: live tensor peak (MB; HMoE: largest expert)"),
                            (axes[1], "total_client_gmacs", "total client compute (GMACs)")):
        front = set(result["sweep"]["pareto"][cost])
        for kind, marker in (("hmoe", "o"), ("flat", "s")):
            sel = [(i, p) for i, p in enumerate(pts) if p["model"] == kind and p[cost] is not None]
            ax.plot([p[cost] for _, p in sel], [p["info_f1"] for _, p in sel], marker=marker, label=kind, alpha=0.8)
            for i, p in sel:
                ax.annotate(f"w{p['width']}", (p[cost], p["info_f1"]), textcoords="offset points", xytext=(4, 4))
        fx = sorted((pts[i][cost], pts[i]["info_f1"]) for i in front)
        ax.plot([a for a, _ in fx], [b for _, b in fx], "k--", lw=1, label="Pareto front")
        ax.set(xlabel=label, ylabel="test Information F1")
        ax.grid(alpha=0.3)
        ax.legend()
    for p in pts:
        if p["curve"]:
            axes[2].plot([g for g, _ in p["curve"]], [f for _, f in p["curve"]],
                         ls="-" if p["model"] == "hmoe" else "--", label=f"{p['model']} w{p['width']}")
    axes[2].set(xlabel="client GMACs spent", ylabel="validation Information F1", title="compute to F1")
    axes[2].grid(alpha=0.3)
    axes[2].legend(fontsize=7)
    th = [r for r in result["decoding"] if r["decode"].startswith("threshold:")]
    axes[3].plot([r["info_recall"] for r in th], [r["info_precision"] for r in th], "o-", label="HMoE threshold")
    for r in th:
        axes[3].annotate(r["decode"].split(":")[1], (r["info_recall"], r["info_precision"]), fontsize=7)
    for r in result["decoding"]:
        if not r["decode"].startswith("threshold:"):
            axes[3].plot(r["info_recall"], r["info_precision"], "x", label=f"{r['model']} {r['decode']}")
    axes[3].set(xlabel="information recall", ylabel="information precision", title="decoding")
    axes[3].grid(alpha=0.3)
    axes[3].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    from trainer.train import DEMO
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="docs/results/bench")
    p.add_argument("--work", default="runs/bench/sweep", help="where the sweep's runs are kept")
    p.add_argument("--widths", type=int, nargs="+", default=[8, 16, 32])
    p.add_argument("--reuse", help="a run of the demo's settings whose HMoE and flat points are taken as they are")
    p.add_argument("--decode-run", help="the run to decode differently (default: the HMoE point of the demo width)")
    p.add_argument("--hmoe-rounds", type=int, default=DEMO.hmoe_rounds)
    p.add_argument("--flat-rounds", type=int, default=DEMO.flat_rounds)
    p.add_argument("--train-limit", type=int, default=0, help="subsample the training set (0: all)")
    p.add_argument("--cost-clients", type=int, default=1)
    p.add_argument("--targets", type=float, nargs="+", default=[0.85, 0.88, 0.90, 0.92])
    p.add_argument("--jobs", type=int, default=2, help="runs trained at once")
    args = p.parse_args(argv)
    from tqdm import tqdm

    from trainer.machine import git_commit, machine_info
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    reuse = Path(args.reuse) if args.reuse else None
    rounds = {"hmoe": args.hmoe_rounds, "flat": args.flat_rounds}
    THREADS[0] = max(1, (os.cpu_count() or 1) // max(1, args.jobs)) if args.jobs > 1 else 0
    todo = [(kind, w) for w in args.widths for kind in ("hmoe", "flat")]
    runs = {}
    with tqdm(total=len(todo), desc="width sweep", unit="run") as bar, ThreadPoolExecutor(args.jobs) as pool:
        futures = {pool.submit(run_point, k, w, work, reuse, rounds, args.train_limit, args.cost_clients): (k, w)
                   for k, w in todo}
        for f, key in futures.items():
            runs[key] = f.result()
            bar.update(1)
    points = [point(k, w, runs[(k, w)]) for k, w in todo]
    demo_width = DEMO.expert_width if DEMO.expert_width in args.widths else args.widths[0]
    decode_run = Path(args.decode_run) if args.decode_run else runs[("hmoe", demo_width)]
    result = {"command": "python benchmarks/tradeoffs.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "machine": machine_info(), "commit": git_commit(),
              "config": {**replace(DEMO, train_limit=args.train_limit).to_dict(), **{f"{k}_rounds": v for k, v in
                                                                                   rounds.items()}},
              "memory_basis": "live_mb: peak bytes of live torch tensors in one step of the largest expert's (HMoE) "
                              "or the flat model's round, torch.profiler; deterministic",
              "sweep": {"points": points, "pareto": {c: pareto(points, c) for c in ("live_mb", "total_client_gmacs")}},
              "compute_to_f1": {"targets": args.targets, "rows": compute_to_f1(points, args.targets),
                                "note": "validation Information F1 (a held-out share of the training set), "
                                        "evaluated about 20 times a run; GMACs summed over every client update "
                                        "up to that round"},
              "decoding": {"run": str(decode_run), "rows": decoding(decode_run, work)}}
    (out / "tradeoffs.json").write_text(json.dumps(result, indent=1) + "\n")
    plot({**result, "decoding": result["decoding"]["rows"]}, out / "tradeoffs.png")
    print(f"wrote {out / 'tradeoffs.json'} and tradeoffs.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
