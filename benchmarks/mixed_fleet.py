"""Mixed fleets: HMoE (resource-aware) against flat softmax, large and small, as the share of
weak devices grows.

Every cell (Dirichlet alpha x weak share) trains four models on the same fleet, with the
same clients, rounds and clients per round:

- hmoe: experts of --expert-width scaled by --expert-widths, each client training the most
  useful expert it can afford (--assignment resource-aware);
- hmoe-one: the same experts, one expert a round (the source paper's protocol): a client
  that cannot afford the round's expert is not asked;
- flat-large: flat softmax at --flat-width; clients that cannot afford its round never train;
- flat-small: the widest flat model in --small-widths whose round the weak tier's median
  client can afford, trained by everyone who can.

Clients are placed in tiers (strong / weak) by a seeded draw independent of their data; a
client is asked for a task only if the task's predicted round fits its tier's memory and
the deadline (trainer/protocol/fleet.py). The per-round costs behind the predictions are measured
once, on this machine, and shared by every run (costs.json), so every cell predicts alike.

    python benchmarks/mixed_fleet.py --out runs/mixed_fleet --jobs 2

Writes results.json, results.md and f1_vs_weak_share.png to --out; each run keeps its own
run directory (report.json) beneath it. Resumable: runs with a report are not run again.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

from trainer.train import DEMO
from trainer.protocol.fleet import CostBook, Fleet
from trainer.protocol.run import RunConfig
from trainer.protocol.strategy import make_tasks

MODELS = ("hmoe", "hmoe-one", "flat-large", "flat-small")


def fleet_for(share: float, args: argparse.Namespace) -> Fleet:
    return Fleet.from_dict({"deadline_s": args.deadline, "tiers": [
        {"name": "strong", "share": round(1.0 - share, 6), "memory_mb": args.strong_memory, "speed": 1.0},
        {"name": "weak", "share": share, "memory_mb": args.weak_memory, "speed": args.weak_speed}]})


def base_config(args: argparse.Namespace, alpha: float) -> RunConfig:
    return replace(DEMO, dataset=args.dataset, warm_start=args.warm_start, trunk_blocks=args.trunk_blocks,
                   partition=args.partition,
                   clients=args.clients,
                   clients_per_round=args.clients_per_round, alpha=alpha,
                   hmoe_rounds=args.rounds, flat_rounds=args.rounds, train_limit=args.train_limit,
                   test_limit=args.test_limit, expert_width=args.expert_width, expert_widths=args.expert_widths,
                   flat_width=args.flat_width, seed=args.seed, assignment="resource-aware")


def measure_costs(out: Path, args: argparse.Namespace):
    """Every network the benchmark may train, measured once here (or taken from --costs);
    returns the cost book and the data split (its clients' sample counts size flat-small)."""
    from trainer.prepare import prepare, run_costs
    path = out / "costs.json"
    seed = CostBook.load(args.costs) if args.costs else None
    cfg = base_config(args, args.alphas[0])
    prep = prepare(cfg)
    tree, shape = prep.data.tree, prep.data.shape
    tasks = list(cfg.tasks("hmoe", tree, shape).values())
    for w in sorted({args.flat_width, *args.small_widths}):
        tasks += list(make_tasks(tree, "flat", shape, w).values())
    book, changed = run_costs(out, tasks, cfg, prep, seed)
    if changed:
        path.write_text(json.dumps(book.to_dict(), indent=1) + "\n")
    return book, prep


def small_width(book: CostBook, args: argparse.Namespace, samples: int, tree, shape) -> tuple[int, dict]:
    """The widest flat model a weak device holding ``samples`` samples can afford."""
    weak = fleet_for(0.5, args).tiers[1]
    preds = {}
    for w in sorted(args.small_widths, reverse=True):
        net = make_tasks(tree, "flat", shape, w)["flat"].net
        preds[w] = book.predict(net, DEMO.local, samples, weak, args.deadline).to_dict()
        if preds[w]["fits"]:
            return w, preds
    raise SystemExit(f"no flat width in {args.small_widths} fits the weak tier: {preds}")


def run_one(job: dict, args: argparse.Namespace) -> dict:
    run = Path(job["run"])
    if (run / "report.json").exists():
        return job
    run.parent.mkdir(parents=True, exist_ok=True)
    fleet_file = run.parent / f"fleet-weak{job['share']:.2f}.json"
    fleet_file.write_text(json.dumps(job["fleet"], indent=1) + "\n")
    kind = "hmoe" if job["model"].startswith("hmoe") else "flat"
    cmd = [sys.executable, "-m", "exporter.cli", "train", "--model", kind, "--dataset", args.dataset,
           "--warm-start", str(args.warm_start), "--trunk-blocks", str(args.trunk_blocks if kind == "hmoe" else 0),
           "--partition", args.partition,
           "--out", str(run), "--fleet", str(fleet_file), "--fleet-costs", str(job["costs"]),
           "--assignment", "one" if job["model"] == "hmoe-one" else args.assignment, "--alpha", str(job["alpha"]), "--clients", str(args.clients),
           "--clients-per-round", str(args.clients_per_round), "--hmoe-rounds", str(args.rounds),
           "--flat-rounds", str(args.rounds), "--train-limit", str(args.train_limit),
           "--test-limit", str(args.test_limit), "--expert-width", str(args.expert_width),
           "--expert-widths", args.expert_widths, "--flat-width", str(job["width"]), "--seed", str(args.seed),
           "--min-cohort", str(args.min_cohort), "--device", args.device, "--cost-clients", "0", "--no-progress",
           "--resume"]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    (run.parent / f"{job['model']}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    print(f"done {job['model']} alpha={job['alpha']} weak={job['share']:.0%} in {time.perf_counter() - start:.0f} s",
          flush=True)
    return job


def collect(job: dict) -> dict:
    report = json.loads((Path(job["run"]) / "report.json").read_text())
    kind = "hmoe" if job["model"].startswith("hmoe") else "flat"
    r = report[kind]
    fam = report["fleet"]["families"][kind]
    rule = "greedy" if kind == "hmoe" else "leaf"
    return {"model": job["model"], "alpha": job["alpha"], "weak_share": job["share"], "width": job["width"],
            "info_f1": r["test"][rule]["info_f1"], "leaf_accuracy": r["test"][rule]["leaf_accuracy"],
            "rounds": r["rounds"], "client_rounds": fam["trained_client_rounds"],
            "unfit_client_rounds": fam["unfit_client_rounds"], "data_used": fam["data_used"],
            "device_seconds": fam["device_seconds"], "client_seconds_here": r["total_client_seconds"],
            "client_rounds_per_tier": fam["trained_client_rounds_per_tier"]}


def results_table(rows: list[dict]) -> list[str]:
    """The Markdown table of results.json's rows (also rendered into BENCHMARKS.md)."""
    lines = ["| alpha | weak share | model | width | Information F1 | data used | client-rounds (weak) | "
             "not asked | device compute (s) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (-r["alpha"], r["weak_share"], MODELS.index(r["model"]))):
        lines.append(f"| {r['alpha']:g} | {r['weak_share']:.0%} | {r['model']} | {r['width']} | {r['info_f1']:.4f} | "
                     f"{r['data_used']:.1%} | {r['client_rounds']} ({r['client_rounds_per_tier'].get('weak', 0)}) | "
                     f"{r['unfit_client_rounds']} | {r['device_seconds']:.0f} |")
    return lines


def write_outputs(out: Path, rows: list[dict], meta: dict) -> None:
    (out / "results.json").write_text(json.dumps({**meta, "rows": rows}, indent=1) + "\n")
    lines = results_table(rows)
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if not rows:   # (--collect-only before any run finished: nothing to plot)
        return
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    alphas = sorted({r["alpha"] for r in rows}, reverse=True)
    fig, axes = plt.subplots(1, len(alphas), figsize=(5.5 * len(alphas), 4), squeeze=False)
    for ax, alpha in zip(axes[0], alphas):
        for model, marker in zip(MODELS, "oDs^"):
            pts = sorted((r["weak_share"], r["info_f1"]) for r in rows if r["alpha"] == alpha and r["model"] == model)
            if pts:
                ax.plot([100 * p[0] for p in pts], [p[1] for p in pts], marker=marker, label=model)
        ax.set(xlabel="weak devices (% of clients)", ylabel="test Information F1", title=f"Dirichlet alpha {alpha:g}")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "f1_vs_weak_share.png", dpi=110)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/mixed_fleet")
    p.add_argument("--dataset", default=DEMO.dataset, help="the data set (hmoe train --dataset), e.g. hanzi:100")
    p.add_argument("--warm-start", type=int, default=0, help="HMoE: rounds the root trains alone first "
                   "(hmoe train --warm-start)")
    p.add_argument("--trunk-blocks", type=int, default=0, help="HMoE: experts on a shared trunk of this many "
                   "conv blocks (hmoe train --trunk-blocks)")
    p.add_argument("--assignment", default="resource-aware", choices=("resource-aware", "spread"),
                   help="hmoe's assignment (hmoe train --assignment; spread for many-class trees)")
    p.add_argument("--partition", default="dirichlet", choices=("dirichlet", "iid"),
                   help="how the data is split (iid: --alphas only labels the cell)")
    p.add_argument("--alphas", type=float, nargs="+", default=[0.5, 0.1])
    p.add_argument("--weak-shares", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75])
    p.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    p.add_argument("--clients", type=int, default=20)
    p.add_argument("--clients-per-round", type=int, default=5)
    p.add_argument("--rounds", type=int, default=40, help="rounds of every model")
    p.add_argument("--train-limit", type=int, default=0, help="subsample the training set (0: all)")
    p.add_argument("--test-limit", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--expert-width", type=int, default=16)
    p.add_argument("--expert-widths", default="leaves:4", help="per-expert width rule (hmoe train --expert-widths)")
    p.add_argument("--flat-width", type=int, default=32, help="flat-large's width")
    p.add_argument("--small-widths", type=int, nargs="+", default=[16, 8, 4, 2], help="flat-small's candidates")
    p.add_argument("--strong-memory", type=float, default=64.0, help="strong tier: MB a round may grow")
    p.add_argument("--weak-memory", type=float, default=4.0, help="weak tier: MB a round may grow")
    p.add_argument("--weak-speed", type=float, default=0.25, help="weak tier: speed relative to this machine")
    p.add_argument("--deadline", type=float, default=5.0,
                   help="round deadline, seconds (default: twice the strong devices' flat-large round for the median "
                        "client, 2.5 s as measured on this project's machine)")
    p.add_argument("--min-cohort", type=int, default=DEMO.min_cohort,
                   help="hmoe: an expert beside the round's own trains only with this many clients")
    p.add_argument("--costs", help="take measured costs from this costs.json instead of measuring")
    p.add_argument("--collect-only", action="store_true", help="only tabulate the runs that have finished")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time, each in its own process")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--device", default="cpu", help="where the runs train (costs are always measured on the CPU)")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    book, prep = measure_costs(out, args)
    samples = int(round(sum(map(len, prep.parts)) / args.clients))
    width, small_preds = small_width(book, args, samples, prep.data.tree, prep.data.shape)
    print(f"flat-small: width {width} (a weak device with the median {samples} samples can afford it)")
    jobs = []
    for alpha in args.alphas:
        for share in args.weak_shares:
            for model in args.models:
                w = {"hmoe": args.expert_width, "hmoe-one": args.expert_width, "flat-large": args.flat_width,
                     "flat-small": width}[model]
                jobs.append({"model": model, "alpha": alpha, "share": share, "width": w,
                             "fleet": fleet_for(share, args).to_dict(), "costs": str(out / "costs.json"),
                             "run": str(out / f"alpha{alpha:g}" / f"weak{round(100 * share)}" / model)})
    # longest first: flat-large, then hmoe, then flat-small
    jobs.sort(key=lambda j: ("flat-large", "hmoe", "hmoe-one", "flat-small").index(j["model"]))
    if not args.collect_only:
        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            list(pool.map(lambda j: run_one(j, args), jobs))
    missing = [j["run"] for j in jobs if not (Path(j["run"]) / "report.json").exists()]
    if missing:
        print(f"not finished (left out of the table): {missing}", file=sys.stderr)
    rows = [collect(j) for j in jobs if j["run"] not in missing]
    from trainer.machine import git_commit, machine_info
    meta = {"command": " ".join(sys.argv), "settings": {k: v for k, v in vars(args).items() if k != "out"},
            "flat_small": {"width": width, "median_client_samples": samples, "predictions": small_preds},
            "machine": machine_info(), "commit": git_commit(), "wall_seconds": time.perf_counter() - started,
            "costs_measured_on": book.meta.get("machine")}
    write_outputs(out, rows, meta)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
