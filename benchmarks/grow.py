"""Growing a taxonomy on real Fashion-MNIST: what adding classes costs HMoE, against training
HMoE again from scratch and against the flat model, which can only fine-tune its whole network.

Two scenarios, each with the new data arriving on a seeded share of the clients only
(--arrival-share; where the new data is collected):

- class: Ankle boot is held out (Shoes starts with Sandal and Sneaker), then arrives;
- subtree: the whole Shoes subtree (Sandal, Sneaker, Ankle boot under a new node) is held
  out, then arrives under Goods.

Per scenario, four trainings with the demo's settings (20 clients, Dirichlet 0.5, 5 a round):

- old: HMoE and flat on the tree without the new classes, trained as the demo trains;
- grown: `hmoe train --extend FULL --from-run old`: HMoE trains only its changed and new
  experts (--grow-rounds per expert); the flat model gains an output row per new class and
  fine-tunes its whole network (--flat-grow-rounds);
- scratch: HMoE and flat trained from scratch on the full tree, same settings and data.

Compute is counted (docs/COSTS.md: samples x epochs x 3 x forward MACs, the same on every
machine), with the measured client seconds beside. "Since arrival" is what a user pays once
the class has arrived: the grown run's own rounds, against a whole new run from scratch.

    python benchmarks/grow.py --out runs/grow --jobs 2

Writes results.json, results.md and f1_vs_compute.png to --out; each training keeps its
run directory beneath it. Resumable: finished runs are not run again.
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

from hierarchy.taxonomies import FASHION_MNIST_TREE

SCENARIOS = {
    "class": {"tree": {**FASHION_MNIST_TREE, "Shoes": ["Sandal", "Sneaker"]}, "new": ["Ankle boot"]},
    "subtree": {"tree": {k: v for k, v in {**FASHION_MNIST_TREE, "Goods": ["Accessories"]}.items() if k != "Shoes"},
                "new": ["Sandal", "Sneaker", "Ankle boot"]},
}
GOAL_F1, GOAL_COMPUTE = 0.97, 0.5


def common(args: argparse.Namespace) -> list[str]:
    return ["--train-limit", str(args.train_limit), "--test-limit", str(args.test_limit), "--seed", str(args.seed),
            "--device", args.device, "--cost-clients", "0", "--no-progress"]


def settings(args: argparse.Namespace) -> list[str]:
    """Run settings of the old and scratch runs (a grown run takes its old run's)."""
    return [] if args.min_children is None else ["--min-children", str(args.min_children)]


def jobs_for(out: Path, args: argparse.Namespace) -> list[dict]:
    full = out / "full-tree.json"
    full.write_text(json.dumps(FASHION_MNIST_TREE, indent=1) + "\n")
    jobs = []
    for name in args.scenarios:
        sc = SCENARIOS[name]
        held = out / name / "old-tree.json"
        held.parent.mkdir(parents=True, exist_ok=True)
        held.write_text(json.dumps(sc["tree"], indent=1) + "\n")
        arrival = f"{','.join(sc['new'])}@{args.arrival_share:g}"
        rounds = ["--hmoe-rounds", str(args.hmoe_rounds), "--flat-rounds", str(args.flat_rounds)]
        old = out / name / "old"
        jobs.append({"scenario": name, "run": "old", "dir": str(old),
                     "cmd": ["train", "--model", args.model, "--tree", str(held), "--out", str(old), *rounds,
                             *settings(args)]})
        jobs.append({"scenario": name, "run": "scratch", "dir": str(out / name / "scratch"),
                     "cmd": ["train", "--model", args.model, "--tree", str(full), "--arrival", arrival,
                             "--out", str(out / name / "scratch"), *rounds, *settings(args)]})
        jobs.append({"scenario": name, "run": "grown", "dir": str(out / name / "grown"), "after": str(old),
                     "cmd": ["train", "--model", args.model, "--extend", str(full), "--from-run", str(old),
                             "--arrival", f"{args.arrival_share:g}", "--out", str(out / name / "grown"),
                             "--flat-rounds", str(args.flat_grow_rounds)],
                     "grow_rounds_per_expert": args.grow_rounds})
    return jobs


def run_one(job: dict, args: argparse.Namespace, done: dict) -> None:
    run = Path(job["dir"])
    if (run / "report.json").exists():
        return
    if "after" in job:   # the grown run needs its old run; wait for it
        while not (Path(job["after"]) / "report.json").exists():
            if done.get(job["after"]) == "failed":
                raise RuntimeError(f"{job['after']} failed, so {run} cannot grow from it")
            time.sleep(2)
        from trainer.grow import extension_config  # the rounds follow the experts the new tree trains
        cfg, _ = extension_config(Path(job["after"]), _full_tree(args), ["hmoe"], None, None, None, "cpu")
        job["cmd"] += ["--hmoe-rounds", str(job["grow_rounds_per_expert"] * len(cfg.train_only))]
    cmd = [sys.executable, "-m", "exporter.cli", *job["cmd"], *common(args)]
    if (run / "config.json").exists():
        cmd.append("--resume")
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    run.mkdir(parents=True, exist_ok=True)
    (run.parent / f"{job['run']}.log").write_text(" ".join(cmd) + "\n" + proc.stdout + proc.stderr)
    if proc.returncode != 0:
        done[job["dir"]] = "failed"
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    done[job["dir"]] = "ok"
    print(f"done {job['scenario']}/{job['run']} in {time.perf_counter() - start:.0f} s", flush=True)


def _full_tree(args: argparse.Namespace):
    from hierarchy.taxonomies import read_tree
    return read_tree(str(Path(args.out) / "full-tree.json"))


def curve(report: dict, kind: str) -> list[tuple[float, float]]:
    """(cumulative client GMAC, validation Information F1) after each evaluated round."""
    total, pts = 0.0, []
    for e in report[kind]["log"]:
        total += e.get("client_gmacs", 0.0)
        if "val_info_f1" in e:
            pts.append((total, e["val_info_f1"]))
    return pts


def collect(out: Path, scenario: str) -> dict:
    reports = {r: json.loads((out / scenario / r / "report.json").read_text()) for r in ("old", "scratch", "grown")}
    rows = []
    kinds = [k for k in ("hmoe", "flat") if k in reports["grown"]]
    for kind, rule in [(k, r) for k, r in (("hmoe", "greedy"), ("flat", "leaf")) if k in kinds]:
        for run in ("old", "grown", "scratch"):
            r = reports[run][kind]
            t = r["test"][rule]
            rows.append({"model": kind, "run": run, "info_f1": t["info_f1"], "leaf_accuracy": t["leaf_accuracy"],
                         "new_class_recall": {n: t["leaf_recall"].get(n) for n in SCENARIOS[scenario]["new"]},
                         "rounds": r["rounds"], "client_gmacs": r["total_client_gmacs"],
                         "client_seconds": r["total_client_seconds"], "rounds_per_task": r["rounds_per_task"],
                         "curve": curve(reports[run], kind)})
    by = {(r["model"], r["run"]): r for r in rows}
    ext = reports["grown"]["extension"]
    summary = {}
    for kind in kinds:
        g, s = by[(kind, "grown")], by[(kind, "scratch")]
        summary[kind] = {"f1_ratio": g["info_f1"] / s["info_f1"], "compute_ratio": g["client_gmacs"] / s["client_gmacs"],
                         "compute_ratio_with_old_run": (g["client_gmacs"] + by[(kind, "old")]["client_gmacs"])
                         / s["client_gmacs"]}
    h = summary.get("hmoe")
    summary["goal"] = {"f1_ratio_at_least": GOAL_F1, "compute_ratio_at_most": GOAL_COMPUTE,
                       "met": bool(h and h["f1_ratio"] >= GOAL_F1 and h["compute_ratio"] <= GOAL_COMPUTE)}
    return {"scenario": scenario, "new_leaves": SCENARIOS[scenario]["new"],
            "plan": {k: ext[k] for k in ("kept", "changed", "new")}, "rows": rows, "summary": summary}


def results_lines(results: list[dict]) -> list[str]:
    """The Markdown of results.json's scenarios (also rendered into BENCHMARKS.md)."""
    lines = []
    for sc in results:
        p = sc["plan"]
        lines += [f"### {sc['scenario']}: {', '.join(sc['new_leaves'])} arrive", "",
                  f"HMoE experts kept {', '.join(p['kept'])}; changed {', '.join(p['changed']) or '-'}; "
                  f"new {', '.join(p['new']) or '-'}.", "",
                  "| model | run | Information F1 | leaf accuracy | new classes' recall | rounds | client GMAC | "
                  "client s |", "|---|---|---|---|---|---|---|---|"]
        for r in sc["rows"]:
            rec = ", ".join(f"{k} {v:.3f}" if v is not None else f"{k} -" for k, v in r["new_class_recall"].items())
            lines.append(f"| {r['model']} | {r['run']} | {r['info_f1']:.4f} | {r['leaf_accuracy']:.4f} | {rec} | "
                         f"{r['rounds']} | {r['client_gmacs']:.0f} | {r['client_seconds']:.0f} |")
        s = sc["summary"]
        lines += ["", *(f"- {k}: grown / scratch Information F1 {v['f1_ratio']:.3f}; client compute since arrival "
                        f"{v['compute_ratio']:.3f} of scratch ({v['compute_ratio_with_old_run']:.3f} with the old "
                        "run's)" for k, v in s.items() if k != "goal"),
                  f"- goal (HMoE grown >= {GOAL_F1} of scratch F1 at <= {GOAL_COMPUTE} of its compute): "
                  f"{'met' if s['goal']['met'] else 'NOT met'}", ""]
    return lines


def write_outputs(out: Path, results: list[dict], meta: dict) -> None:
    (out / "results.json").write_text(json.dumps({**meta, "scenarios": results}, indent=1) + "\n")
    lines = results_lines(results)
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.2), squeeze=False)
    styles = {("hmoe", "grown"): "C0-", ("hmoe", "scratch"): "C0--", ("flat", "grown"): "C1-",
              ("flat", "scratch"): "C1--"}
    for ax, sc in zip(axes[0], results):
        for r in sc["rows"]:
            if r["run"] == "old" or not r["curve"]:
                continue
            xs, ys = zip(*r["curve"])
            label = f"{'HMoE' if r['model'] == 'hmoe' else 'flat'} {'grown' if r['run'] == 'grown' else 'from scratch'}"
            ax.plot(xs, ys, styles[(r["model"], r["run"])], marker=".", label=label)
        ax.set(xscale="log", xlabel="client compute since the new classes arrived (GMAC, log)",
               ylabel="validation Information F1", title=f"{sc['scenario']}: + {', '.join(sc['new_leaves'])}")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "f1_vs_compute.png", dpi=110)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/grow")
    p.add_argument("--scenarios", nargs="+", choices=sorted(SCENARIOS), default=["class", "subtree"])
    p.add_argument("--arrival-share", type=float, default=0.25, help="share of the clients the new classes arrive on")
    p.add_argument("--hmoe-rounds", type=int, default=100, help="old and scratch HMoE rounds (the demo's)")
    p.add_argument("--flat-rounds", type=int, default=40, help="old and scratch flat rounds (the demo's)")
    p.add_argument("--grow-rounds", type=int, default=20, help="grown HMoE: rounds per expert it trains")
    p.add_argument("--flat-grow-rounds", type=int, default=20, help="grown flat: fine-tuning rounds")
    p.add_argument("--model", choices=["hmoe", "flat", "both"], default="both",
                   help="which models to train (the flat model does not depend on --min-children)")
    p.add_argument("--min-children", type=int, default=None,
                   help="HMoE: a client trains an expert only with samples of this many of its children (hmoe train; "
                        "default: the release's default)")
    p.add_argument("--train-limit", type=int, default=0, help="subsample the training set (0: all)")
    p.add_argument("--test-limit", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--jobs", type=int, default=2, help="trainings at a time, each in its own process")
    p.add_argument("--threads", type=int, default=1, help="torch threads per training")
    p.add_argument("--collect-only", action="store_true", help="only tabulate finished runs")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    jobs = jobs_for(out, args)
    if not args.collect_only:
        done: dict = {}
        order = sorted(jobs, key=lambda j: ("old", "scratch", "grown").index(j["run"]))   # old runs first
        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            futures = [pool.submit(run_one, j, args, done) for j in order]
            for f in futures:
                f.result()
    finished = [s for s in args.scenarios if all((out / s / r / "report.json").exists()
                                                 for r in ("old", "scratch", "grown"))]
    if not finished:
        print("no scenario has finished all its runs yet", file=sys.stderr)
        return 1
    from trainer.machine import git_commit, machine_info
    meta = {"command": " ".join(sys.argv), "settings": {k: v for k, v in vars(args).items() if k != "out"},
            "machine": machine_info(), "commit": git_commit(), "wall_seconds": time.perf_counter() - started,
            "compute": "client GMAC: samples x epochs x 3 x forward multiply-accumulates, summed over client updates "
                       "(docs/COSTS.md); 'since arrival' counts the grown run's rounds only"}
    write_outputs(out, [collect(out, s) for s in finished], meta)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
