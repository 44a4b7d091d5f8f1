"""Label skew: HMoE against flat softmax as the clients' label distributions narrow, with plain
FedAvg and with each remedy of the round protocol (docs/TRAINING.md, "Label skew").

Every cell (partition x model x remedy x seed) is one `hmoe train` run on real
Fashion-MNIST at the demo's settings unless the profile says otherwise:

- partitions: Dirichlet alpha 0.05, 0.1, 0.3, 0.5 (the demo), 1.0, IID, and shards (every
  client holds exactly two labels, McMahan et al. 2017);
- remedies: ``fedavg`` (every remedy off, written out, so it stays plain FedAvg whatever the
  defaults become), ``defaults`` (no flag: what a user gets), and one remedy each (REMEDIES);
  the flat model is offered every remedy of the objective and the server (the HMoE-only
  rules --min-children and --balanced-epochs-cap do not change it, so it is not re-run there).

Profiles: ``demo`` is the demo's settings (the whole training set, 100 HMoE rounds, 40 flat);
``quick`` screens on a seeded 12,000-image subsample with a 2,000-image test subsample and
the same rounds (about a minute a run on one core). Say which profile a figure comes from.

    python benchmarks/label_skew.py --out docs/results/label_skew --profile quick --jobs 2
    python benchmarks/label_skew.py --out docs/results/label_skew-demo --profile demo \\
        --partitions dir0.1 dir0.5 iid --remedies fedavg defaults --jobs 2

Writes results.json, results.md and f1_vs_alpha.png to --out; every run keeps its run
directory (report.json) under --out/runs. Resumable: runs with a report are not run again.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

PARTITIONS = {"shards": ["--partition", "shards"], "dir0.05": ["--alpha", "0.05"], "dir0.1": ["--alpha", "0.1"],
              "dir0.3": ["--alpha", "0.3"], "dir0.5": ["--alpha", "0.5"], "dir1": ["--alpha", "1.0"],
              "iid": ["--partition", "iid"]}
# Every remedy off, written out: plain FedAvg (Flower's default strategy) with the project's own
# rules at their old values (balanced epochs on, --min-children 1).
OFF = ["--prox-mu", "0", "--restricted-softmax", "1", "--logit-adjust", "0", "--server-optimizer", "none",
       "--server-lr", "1", "--server-momentum", "0.9", "--min-children", "1", "--balanced-epochs-cap", "0",
       "--balanced-epochs"]


def _with(**flags: str) -> list[str]:
    out = list(OFF)
    for name, value in flags.items():
        flag = "--" + name.replace("_", "-")
        if flag in out:
            out[out.index(flag) + 1] = value
        elif flag == "--no-balanced-epochs":
            out[out.index("--balanced-epochs")] = flag
        else:
            out += [flag, value]
    return out


REMEDIES: dict[str, dict] = {
    "fedavg": {"flags": OFF, "what": "plain FedAvg, every remedy off"},
    "defaults": {"flags": [], "what": "no flag: the release's defaults"},
    "fedprox": {"flags": _with(prox_mu="0.01"), "what": "--prox-mu 0.01 (FedProx)"},
    "fedrs": {"flags": _with(restricted_softmax="0.5"), "what": "--restricted-softmax 0.5 (FedRS)"},
    "fedlc": {"flags": _with(logit_adjust="1"), "what": "--logit-adjust 1 (balanced softmax / FedLC)"},
    "fedavgm": {"flags": _with(server_optimizer="avgm", server_momentum="0.5"),
                "what": "--server-optimizer avgm --server-momentum 0.5 (FedAvgM)"},
    "fedadam": {"flags": _with(server_optimizer="adam", server_lr="0.01"),
                "what": "--server-optimizer adam --server-lr 0.01 (FedAdam)"},
    "min-children": {"flags": _with(min_children="2"), "what": "--min-children 2", "hmoe_only": True, "flat_as": "fedavg"},
    "epochs-cap": {"flags": _with(balanced_epochs_cap="2"), "what": "--balanced-epochs-cap 2", "hmoe_only": True,
                   "flat_as": "fedavg"},
    "one-epoch": {"flags": _with(no_balanced_epochs=""), "what": "--no-balanced-epochs", "hmoe_only": True, "flat_as": "fedavg"},
    "fedlc+min-children": {"flags": _with(logit_adjust="1", min_children="2"),
                           "what": "--logit-adjust 1 --min-children 2", "hmoe_only": True,
                           "flat_as": "fedlc"},
    "fedlc+fedprox": {"flags": _with(logit_adjust="1", prox_mu="0.01"), "what": "--logit-adjust 1 --prox-mu 0.01"},
    "fedlc+fedadam": {"flags": _with(logit_adjust="1", server_optimizer="adam", server_lr="0.01"),
                      "what": "--logit-adjust 1 --server-optimizer adam --server-lr 0.01"},
    "fedlc+min-children+fedadam": {"flags": _with(logit_adjust="1", min_children="2", server_optimizer="adam",
                                                  server_lr="0.01"),
                                   "what": "--logit-adjust 1 --min-children 2 --server-optimizer adam --server-lr 0.01",
                                   "hmoe_only": True, "flat_as": "fedlc+fedadam"},
    "defaults+resource-aware": {"flags": ["--assignment", "resource-aware"],
                                "what": "the defaults and --assignment resource-aware (a sampled client that "
                                        "cannot train the round's expert trains its next most useful one)",
                                "hmoe_only": True, "flat_as": "defaults"},
    "defaults+epochs-cap": {"flags": ["--balanced-epochs-cap", "2"],
                            "what": "the defaults and --balanced-epochs-cap 2", "hmoe_only": True,
                            "flat_as": "defaults"},
    "defaults+one-epoch": {"flags": ["--no-balanced-epochs"],
                           "what": "the defaults and --no-balanced-epochs", "hmoe_only": True,
                           "flat_as": "defaults"},
    "defaults+fedprox": {"flags": ["--prox-mu", "0.01"], "what": "the defaults and --prox-mu 0.01"},
    "defaults+leaf-widths": {"flags": ["--expert-widths", "leaves:8"], "hmoe_only": True, "flat_as": "defaults",
                             "what": "the defaults and --expert-widths leaves:8 (narrower experts below the root)"},
}
PROFILES = {"demo": [], "quick": ["--train-limit", "12000", "--test-limit", "2000"]}
RULE = {"hmoe": "greedy", "flat": "leaf"}


def _flags(flags: list[str]) -> list[str]:
    return [f for f in flags if f != ""]


def jobs_for(out: Path, args: argparse.Namespace) -> list[dict]:
    jobs = []
    for part in args.partitions:
        for remedy in args.remedies:
            for model in args.models:
                if model == "flat" and REMEDIES[remedy].get("hmoe_only"):
                    continue
                for seed in args.seeds:
                    run = out / "runs" / args.profile / part / f"{model}-{remedy}-s{seed}"
                    jobs.append({"partition": part, "remedy": remedy, "model": model, "seed": seed, "dir": str(run),
                                 "cmd": ["train", "--model", model, "--out", str(run), "--seed", str(seed),
                                         *PARTITIONS[part], *PROFILES[args.profile],
                                         *_flags(REMEDIES[remedy]["flags"]), "--cost-clients", "0",
                                         "--no-progress", "--device", args.device]})
    return jobs


def run_one(job: dict, args: argparse.Namespace) -> None:
    run = Path(job["dir"])
    if (run / "report.json").exists():
        return
    cmd = [sys.executable, "-m", "exporter.cli", *job["cmd"]]
    if (run / "config.json").exists():
        cmd.append("--resume")
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    run.mkdir(parents=True, exist_ok=True)
    (run / "train.log").write_text(" ".join(cmd) + "\n" + proc.stdout + proc.stderr)
    if proc.returncode != 0:
        print(f"FAILED {' '.join(cmd)}:\n{proc.stderr[-2000:]}", file=sys.stderr, flush=True)
        return
    (run / "wall_seconds.txt").write_text(f"{time.perf_counter() - start:.1f}\n")
    print(f"done {job['partition']} {job['model']} {job['remedy']} seed {job['seed']} "
          f"in {time.perf_counter() - start:.0f} s", flush=True)


def collect(out: Path, args: argparse.Namespace) -> dict:
    """Per cell: Information F1 per seed and its mean; per remedy, the ratios the issue asks for."""
    cells, run_seconds = [], 0.0
    for job in jobs_for(out, args):
        timing = Path(job["dir"]) / "wall_seconds.txt"
        run_seconds += float(timing.read_text()) if timing.exists() else 0.0
        path = Path(job["dir"]) / "report.json"
        if not path.exists():
            continue
        rep = json.loads(path.read_text())[job["model"]]
        test = rep["test"][RULE[job["model"]]]
        cells.append({k: job[k] for k in ("partition", "remedy", "model", "seed")} |
                     {"info_f1": test["info_f1"], "leaf_accuracy": test["leaf_accuracy"],
                      "client_gmacs": rep["total_client_gmacs"], "client_seconds": rep["total_client_seconds"]})
    means: dict = {}
    for c in cells:
        means.setdefault((c["model"], c["remedy"], c["partition"]), []).append(c["info_f1"])
    table = [{"model": m, "remedy": r, "partition": p, "info_f1": float(np.mean(v)), "min": float(np.min(v)),
              "max": float(np.max(v)), "seeds": len(v)} for (m, r, p), v in sorted(means.items())]
    by = {(t["model"], t["remedy"], t["partition"]): t["info_f1"] for t in table}
    summary = {}
    for remedy in args.remedies:
        flat_remedy = REMEDIES[remedy].get("flat_as", remedy)   # an HMoE-only rule: flat with the same objective
        row = {}
        h01, hiid, h05 = (by.get(("hmoe", remedy, p)) for p in ("dir0.1", "iid", "dir0.5"))
        f01, f05 = (by.get(("flat", flat_remedy, p)) for p in ("dir0.1", "dir0.5"))
        if h01 and hiid:
            row["hmoe_0.1_over_iid"] = h01 / hiid
        if h01 and f01 and h05 and f05:
            row["hmoe_over_flat_0.1"], row["hmoe_over_flat_0.5"] = h01 / f01, h05 / f05
        hs = [by[("hmoe", remedy, p)] for p in args.partitions if ("hmoe", remedy, p) in by]
        if hs:
            row["hmoe_mean_over_partitions"] = float(np.mean(hs))
        summary[remedy] = row
    return {"cells": cells, "table": table, "summary": summary, "run_seconds": run_seconds}


def results_lines(res: dict) -> list[str]:
    """Markdown of results.json (also rendered into BENCHMARKS.md)."""
    parts = [p for p in PARTITIONS if any(t["partition"] == p for t in res["table"])]
    by = {(t["model"], t["remedy"], t["partition"]): t for t in res["table"]}
    lines = [f"Information F1 on the test split, mean over seeds (min–max); profile `{res['settings']['profile']}`.",
             "", "| model | remedy | " + " | ".join(parts) + " |", "|---|---|" + "---|" * len(parts)]
    for model in ("hmoe", "flat"):
        for remedy in res["settings"]["remedies"]:
            cells = [by.get((model, remedy, p)) for p in parts]
            if not any(cells):
                continue
            lines.append(f"| {model} | {remedy} | " + " | ".join(
                "-" if c is None else f"{c['info_f1']:.4f} ({c['min']:.3f}–{c['max']:.3f})" if c["seeds"] > 1
                else f"{c['info_f1']:.4f}" for c in cells) + " |")
    lines += ["", "| remedy | what | HMoE F1 at 0.1 / its IID F1 | HMoE/flat at 0.1 | HMoE/flat at 0.5 | "
              "HMoE mean over partitions |", "|---|---|---|---|---|---|"]
    for remedy, row in res["summary"].items():
        def f(k: str) -> str:
            return f"{row[k]:.3f}" if k in row else "-"
        lines.append(f"| {remedy} | {REMEDIES[remedy]['what']} | {f('hmoe_0.1_over_iid')} | {f('hmoe_over_flat_0.1')} | "
                     f"{f('hmoe_over_flat_0.5')} | {f('hmoe_mean_over_partitions')} |")
    lines += ["", "An HMoE-only rule (--min-children, --balanced-epochs-cap, --no-balanced-epochs, --assignment) is "
              "compared with the flat model under the same objective and server optimizer (fedavg, fedlc or the "
              "defaults); the mean is over the partitions a remedy was measured on.", ""]
    return lines


def plot(out: Path, res: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    parts = [p for p in PARTITIONS if any(t["partition"] == p for t in res["table"])]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.4), sharey=True)
    for ax, model in zip(axes, ("hmoe", "flat")):
        for i, remedy in enumerate(res["settings"]["remedies"]):
            pts = [(j, t["info_f1"]) for j, p in enumerate(parts) for t in res["table"]
                   if (t["model"], t["remedy"], t["partition"]) == (model, remedy, p)]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, marker="o", color=f"C{i % 10}", ls="-" if i < 10 else "--", label=remedy)
        ax.set_xticks(range(len(parts)), [p.replace("dir", "α=") for p in parts])
        ax.set(title=f"{'HMoE (greedy)' if model == 'hmoe' else 'flat softmax'}", xlabel="partition (more skew left)",
               ylabel="test Information F1")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "f1_vs_alpha.png", dpi=110)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/label_skew")
    p.add_argument("--profile", choices=sorted(PROFILES), default="quick")
    p.add_argument("--partitions", nargs="+", choices=list(PARTITIONS), default=list(PARTITIONS))
    p.add_argument("--remedies", nargs="+", choices=list(REMEDIES), default=list(REMEDIES))
    p.add_argument("--models", nargs="+", choices=["hmoe", "flat"], default=["hmoe", "flat"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--device", default="cpu")
    p.add_argument("--jobs", type=int, default=2, help="trainings at a time, each in its own process")
    p.add_argument("--threads", type=int, default=1, help="torch threads per training")
    p.add_argument("--collect-only", action="store_true", help="only tabulate finished runs")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    if not args.collect_only:
        jobs = jobs_for(out, args)
        # the headline cells first, so an interrupted sweep has them
        jobs.sort(key=lambda j: (j["seed"], ["dir0.1", "dir0.5", "iid"].index(j["partition"])
                                 if j["partition"] in ("dir0.1", "dir0.5", "iid") else 9))
        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            list(pool.map(lambda j: run_one(j, args), jobs))
    res = collect(out, args)
    if not res["cells"]:
        print("no run has finished yet", file=sys.stderr)
        return 1
    from trainer.machine import git_commit, machine_info
    res = {"command": " ".join(sys.argv), "settings": {k: v for k, v in vars(args).items() if k != "out"},
           "machine": machine_info(), "commit": git_commit(), "wall_seconds": time.perf_counter() - started, **res}
    (out / "results.json").write_text(json.dumps(res, indent=1) + "\n")
    lines = results_lines(res)
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(out, res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
