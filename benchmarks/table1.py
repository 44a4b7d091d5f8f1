"""The source paper's Table 1 on its own data shapes: per-round client time and memory of
flat softmax and of the largest and smallest HMoE expert, under both local-epoch policies,
with the paper's figures beside.

Shapes: Fashion-MNIST (real), CIFAR-100 (synthetic 3x32x32 images, the real 21-expert
tree) and Tiny ImageNet (synthetic 3x64x64 images, the project's WordNet tree of 101
experts); N is the real training-set size (smaller with --quick). The federation is the
demo's (20 clients, Dirichlet 0.5, batch 32; experts of width 16, flat width 32).

Policies (what a client's round of an expert is):
- paper: one epoch over the client's samples under the expert (the source paper's rule);
- balanced: the project's rule (trainer.protocol.strategy.balanced_epochs): as many epochs as fit
  in the root's round, counted both in samples and in optimizer steps.

For every expert the deterministic figures are computed for the measured client: samples,
epochs, optimizer steps, client GMACs (samples x epochs x 3 x forward MACs) and the
analytic memory count. Measured (each in a fresh process, one torch thread, --repeats
times, interleaved so load drift hits every task alike): wall time of the update, peak
resident-set growth, and the peak of live torch tensors during one step (torch.profiler's
memory events; deterministic). Trees with more than --max-measured experts measure the
root and the experts at the extremes of the deterministic figures (the candidates for
largest and smallest); the JSON lists which.

    python benchmarks/table1.py --out docs/results/bench \\
        --fm-run balanced=runs/bench/fm-balanced --fm-run paper=runs/bench/fm-paper

Writes table1.json and table1.png to --out.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

MB = 1024 * 1024
POLICIES = ("paper", "balanced")
SHAPES = {
    "fashion-mnist": {"label": "Fashion-MNIST (real)", "dataset": "fashion-mnist", "n": 60000},
    "cifar100": {"label": "CIFAR-100 shape (synthetic 3x32x32, real tree)",
                 "dataset": "synthetic:3,32,32:cifar100:{n}", "n": 50000},
    "tiny-imagenet": {"label": "Tiny ImageNet shape (synthetic 3x64x64, WordNet tree)",
                      "dataset": "synthetic:3,64,64:tiny-imagenet:{n}", "n": 100000},
}
# The source paper's Table 1 (as quoted in issue #15): flat in ms / MB, experts in % of flat.
PAPER = {
    "cifar100": {"flat": {"time_ms": 97.0, "mem_mb": 61.9},
                 "hmoe_max": {"time_pct": 74.0, "mem_pct": 96.0}, "hmoe_min": {"time_pct": 3.0, "mem_pct": 7.0}},
    "tiny-imagenet": {"hmoe_max": {"time_pct": 95.0, "mem_pct": 88.0},
                      "hmoe_min": {"time_pct": 0.7, "mem_pct": 1.6}},
}
METRICS = ("time_ms", "rss_mb", "live_mb")


def spread(values: list[float]) -> dict:
    v = np.asarray(values, dtype=float)
    med = float(np.median(v))
    return {"min": float(v.min()), "median": med, "max": float(v.max()), "values": [float(a) for a in v],
            "spread": float((v.max() - v.min()) / med) if med > 0 else 0.0}


def cost_client(tree, prep) -> int:
    """The measured client: the median-sized one among those holding samples under every
    expert (else among all)."""
    y = prep.data.train_y
    masks = [tree.lcpn(int(e), y)[0] for e in tree.experts]
    have_all = [c for c, part in enumerate(prep.parts) if all(m[part].any() for m in masks)]
    pool = have_all or list(range(len(prep.parts)))
    sizes = sorted(pool, key=lambda c: (len(prep.parts[c]), c))
    return sizes[len(sizes) // 2]


def deterministic(net, local, samples: int) -> dict:
    from trainer.device.nets import analytic_bytes
    slots = 2 if local.optimizer == "adam" else (1 if local.momentum else 0)
    return {"samples": samples, "epochs": local.epochs,
            "steps": local.epochs * math.ceil(samples / local.batch_size),
            "gmacs": samples * local.epochs * 3 * net.forward_macs() / 1e9,
            "analytic_mb": analytic_bytes(net, local.batch_size, slots)["total"] / MB}


def candidates(det: dict[str, dict], root: str, max_measured: int) -> list[str]:
    """Every expert when there are at most ``max_measured``; else the root and the experts at
    the extremes of the deterministic figures, most telling first (largest and smallest by
    GMACs, by optimizer steps, by analytic memory, then the next by GMACs), up to
    ``max_measured``."""
    keys = list(det)
    if len(keys) <= max_measured:
        return keys
    order = {m: sorted(keys, key=lambda e: (det[e][m], e)) for m in ("gmacs", "steps", "analytic_mb")}
    wanted = [root]
    for m in ("gmacs", "steps", "analytic_mb"):
        wanted += [order[m][-1], order[m][0]]
    for i in range(1, len(keys)):
        wanted += [order["gmacs"][-1 - i], order["gmacs"][i]]
    pick: list[str] = []
    for e in wanted:
        if e not in pick:
            pick.append(e)
    pick = pick[:max(3, max_measured)]
    return [e for e in keys if e in pick]


def table_rows(per_task: dict[str, dict], experts: list[str]) -> dict:
    """Flat, largest and smallest expert; per metric, the expert whose median is largest
    (smallest), and its median as a share of flat's median."""
    out = {"flat": {m: per_task["flat"][m]["median"] for m in METRICS}}
    out["flat"].update({m: per_task["flat"][m] for m in ("analytic_mb", "gmacs", "steps")})
    for name, pick in (("hmoe_max", max), ("hmoe_min", min)):
        row = {}
        for m in METRICS + ("analytic_mb", "gmacs", "steps"):
            def value(e):
                v = per_task[e][m]
                return v["median"] if isinstance(v, dict) else v
            measured = [e for e in experts if e in per_task and (m not in METRICS or m in per_task[e])]
            key = pick(measured, key=lambda e: (value(e), e))
            row[m], row[f"{m}_expert"] = value(key), key
            flat = out["flat"][m]
            row[f"{m}_pct_of_flat"] = 100.0 * value(key) / flat if flat else None
        out[name] = row
    return out


def measure_shape(shape: str, n: int, repeats: int, max_measured: int, seed: int, bar) -> dict:
    import torch

    from trainer.device.client import to_numpy
    from trainer.train import DEMO
    from trainer.device.cost import measure_update
    from trainer.device.nets import build_net
    from trainer.prepare import prepare

    spec = SHAPES[shape]
    cfg = replace(DEMO, dataset=spec["dataset"].format(n=n), seed=seed,
                  train_limit=n if shape == "fashion-mnist" and n < spec["n"] else 0)
    prep = prepare(cfg)
    d = prep.data
    tree = d.tree
    in_shape = tuple(d.train_x.shape[1:])
    client = cost_client(tree, prep)
    part = prep.parts[client]
    tasks = {**cfg.tasks("hmoe", tree, in_shape), **cfg.tasks("flat", tree, in_shape)}
    root = next(k for k, t in tasks.items() if t.node == int(tree.experts[0]))
    flat_key = next(k for k, t in tasks.items() if t.node < 0)
    strategies = {p: replace(cfg, balanced_epochs=(p == "balanced")).strategy("hmoe", tree, cfg.tasks(
        "hmoe", tree, in_shape)) for p in POLICIES}
    flat_strategy = cfg.strategy("flat", tree, cfg.tasks("flat", tree, in_shape))
    last = cfg.hmoe_rounds - 1

    # what each task's round is on the measured client, under each policy
    jobs: dict[tuple[str, str], tuple] = {}   # (policy, task) -> (net, x, y, local)
    det: dict[str, dict[str, dict]] = {p: {} for p in POLICIES}
    idx, target = flat_strategy.client_data(flat_key, d.train_y, part)
    flat_local = flat_strategy.client_config(flat_key, cfg.flat_rounds - 1, len(part), len(idx))
    flat_det = deterministic(tasks[flat_key].net, flat_local, len(idx))
    for p, s in strategies.items():
        for key in s.tasks:
            idx_e, tgt = s.client_data(key, d.train_y, part)
            if not len(idx_e):
                continue
            local = s.client_config(key, last, len(part), len(idx_e))
            det[p][key] = deterministic(tasks[key].net, local, len(idx_e))
            jobs[(p, key)] = (tasks[key].net, idx_e, tgt, local)
    measured = {p: candidates(det[p], root, max_measured) for p in POLICIES}
    jobs[("flat", flat_key)] = (tasks[flat_key].net, idx, target, flat_local)
    # an expert whose round is the same under both policies (same epochs) is measured once
    same = {(p, k): ("paper", k) if p == "balanced" and k in measured["paper"]
            and jobs[(p, k)][3] == jobs[("paper", k)][3] else (p, k) for p in POLICIES for k in measured[p]}
    same[("flat", flat_key)] = ("flat", flat_key)
    order = list(dict.fromkeys(same.values()))

    bar.total += len(order) * repeats
    bar.refresh()
    torch.manual_seed(seed)
    weights = {k: to_numpy(build_net(tasks[k].net)) for k in {k for _, k in order}}
    raw: dict[tuple[str, str], list[dict]] = {j: [] for j in order}
    for r in range(repeats):
        for j in order:
            net, ix, tgt, local = jobs[j]
            bar.set_postfix_str(f"{shape} {j[0]} {j[1][:18]} repeat {r + 1}")
            raw[j].append(measure_update(net, weights[j[1]], d.train_x[ix], tgt, local, d.mean, d.std,
                                         seed + r, threads=1, repeats=1, live_peak=True))
            bar.update(1)

    def figures(j, base: dict) -> dict:
        runs = raw[same[j]]
        return {**base, "time_ms": spread([x["time_ms"] for x in runs]), "rss_mb": spread([x["mem_mb"] for x in runs]),
                "live_mb": spread([x["live_peak_mb"] for x in runs]), "rss_method": runs[0].get("method")}

    flat = figures(("flat", flat_key), flat_det)
    policies = {}
    for p in POLICIES:
        per_task = {"flat": flat}
        for key in det[p]:
            per_task[key] = figures((p, key), det[p][key]) if key in measured[p] else det[p][key]
        rows = table_rows(per_task, measured[p])
        # deterministic extremes over every expert, measured or not
        for name, pick in (("hmoe_max", max), ("hmoe_min", min)):
            for m in ("analytic_mb", "gmacs", "steps"):
                key = pick(det[p], key=lambda e: (det[p][e][m], e))
                rows[name][m], rows[name][f"{m}_expert"] = det[p][key][m], key
                rows[name][f"{m}_pct_of_flat"] = 100.0 * det[p][key][m] / flat_det[m]
        policies[p] = {"per_task": per_task, "measured": measured[p], "rows": rows,
                       "max_rss_spread": max(per_task[k]["rss_mb"]["spread"] for k in ["flat", *measured[p]]),
                       "max_time_spread": max(per_task[k]["time_ms"]["spread"] for k in ["flat", *measured[p]])}
    return {"label": spec["label"], "dataset": cfg.dataset, "train_samples": int(len(d.train_y)),
            "experts": len(tasks) - 1, "clients": cfg.clients, "client": int(client),
            "client_samples": int(len(part)), "tree_depth": int(tree.depths[tree.leaves].max()),
            "widths": {"expert": cfg.expert_width, "flat": cfg.flat_width}, "batch_size": cfg.local.batch_size,
            "policies": policies, "paper": PAPER.get(shape)}


def fm_quality(runs: dict[str, str]) -> dict:
    """Information F1 (test split; HMoE greedy, flat leaf rule) and total client GMACs of
    trained Fashion-MNIST runs (their report.json), per policy."""
    out = {}
    for policy, run in runs.items():
        path = Path(run) / "report.json"
        if not path.is_file():
            print(f"note: {path} not found; Table 1 has no F1 for policy {policy}")
            continue
        r = json.loads(path.read_text())
        row: dict = {"run": str(run)}
        for kind, rule in (("hmoe", "greedy"), ("flat", "leaf")):
            row[f"{kind}_info_f1"] = r[kind]["test"][rule]["info_f1"] if kind in r else None
            row[f"{kind}_total_client_gmacs"] = (float(sum(e.get("client_gmacs", 0.0) for e in r[kind]["log"]))
                                                 if kind in r else None)
        out[policy] = row
    return out


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    shapes = list(result["shapes"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, metric, title in ((axes[0], "time_ms", "time / round"), (axes[1], "live_mb", "live tensor peak")):
        labels, values, colors, paper = [], [], [], []
        for shape in shapes:
            for p in POLICIES:
                rows = result["shapes"][shape]["policies"][p]["rows"]
                for name, color in (("hmoe_max", "tab:red"), ("hmoe_min", "tab:green")):
                    labels.append(f"{shape}\n{p} {name[5:]}")
                    values.append(rows[name][f"{metric}_pct_of_flat"])
                    colors.append(color)
                    ref = (PAPER.get(shape) or {}).get(name)
                    paper.append(ref[{"time_ms": "time_pct", "live_mb": "mem_pct"}[metric]] if ref else None)
        ax.bar(range(len(values)), values, color=colors)
        marks = [(i, v) for i, v in enumerate(paper) if v is not None]
        if marks:
            ax.plot([i for i, _ in marks], [v for _, v in marks], "kx", markersize=9, label="source paper")
            ax.legend(fontsize=8)
        ax.set_xticks(range(len(values)), labels, rotation=90, fontsize=7)
        ax.axhline(100, color="k", lw=0.8)
        ax.set(ylabel="% of flat softmax", title=f"HMoE expert {title} (largest red, smallest green)")
        if metric == "live_mb":
            ax.set_xlabel("paper's marks: its memory figure (it measured memory differently)", fontsize=8)
        ax.set_yscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="docs/results/bench")
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--repeats", type=int, default=3, help="fresh-process measurements of every task (>= 3 "
                   "for the min / median / max)")
    p.add_argument("--scale", type=float, default=1.0,
                   help="share of each data set's real training-set size to use (make bench-quick: 0.2)")
    p.add_argument("--max-measured", type=int, default=8)
    p.add_argument("--fm-run", action="append", default=[], metavar="POLICY=DIR",
                   help="a trained Fashion-MNIST run per policy, for the Information F1 column")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--replot", action="store_true", help="redraw table1.png from --out's table1.json; measure nothing")
    args = p.parse_args(argv)
    if args.replot:
        plot(json.loads((Path(args.out) / "table1.json").read_text()), Path(args.out) / "table1.png")
        return 0
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    from tqdm import tqdm

    from trainer.machine import git_commit, machine_info
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = dict(item.split("=", 1) for item in args.fm_run)
    result = {"command": "python benchmarks/table1.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "machine": machine_info(), "commit": git_commit(), "repeats": args.repeats,
        "scale": args.scale, "threads": 1, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "ratio_basis": "each % of flat is the expert's median over repeats divided by flat's median; live_mb "
                       "(peak bytes of live torch tensors in one step, torch.profiler) is deterministic, "
                       "rss_mb (peak resident-set growth over the warmed-up process) and time_ms are not",
        "shapes": {}}
    start = time.perf_counter()
    with tqdm(total=0, desc="table 1", unit="update") as bar:
        for shape in args.shapes:
            n = max(1000, int(SHAPES[shape]["n"] * args.scale))
            result["shapes"][shape] = measure_shape(shape, n, args.repeats, args.max_measured, args.seed, bar)
    result["fashion_mnist_f1"] = fm_quality(runs)
    result["seconds"] = time.perf_counter() - start
    result["load_average_end"] = list(os.getloadavg())
    (out / "table1.json").write_text(json.dumps(result, indent=1) + "\n")
    plot(result, out / "table1.png")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from render import table1_section
    print("\n".join(table1_section(result, out / "table1.md", out)))   # ours beside the paper's
    print(f"wrote {out / 'table1.json'} and table1.png in {result['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
