"""Experts on a shared trunk against independent experts and flat softmax, at equal rounds.

Every model trains on the same data set, clients and rounds with the same seed (the
data set's defaults otherwise: `hmoe train --dataset hanzi:500` alone runs the glyph
configuration, trainer/protocol/run.py DATASET_DEFAULTS):

- hmoe-trunkK: HMoE whose experts share the root's first K conv blocks (--trunk-blocks K);
- hmoe-independent: the same experts with no trunk (--trunk-blocks 0, the paper's);
- flat-wW: flat softmax at width W (W = the trunk's width, and any others asked for).

Each is scored on the held-out test split (HMoE greedy and soft:2, flat by its leaf), and
each model's rounds are measured once, in a fresh process, for the peak of live torch
tensors in one step (trainer.device.cost_worker.live_tensor_peak): flat's round, the root's,
and the non-root expert with the most outputs, the one a round of the rest can cost at most.

    python benchmarks/trunk.py --out docs/results/trunk --rounds 100 --jobs 2
    python benchmarks/trunk.py --reuse hmoe-trunk2=runs/trunk/hmoe-k2-r100 ...   # runs trained already

Writes results.json and results.md to --out; the runs live under --work (resumable).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def train_command(name: str, run: Path, args: argparse.Namespace) -> list[str]:
    common = ["--dataset", args.dataset, "--hmoe-rounds", str(args.rounds), "--flat-rounds", str(args.rounds),
              "--seed", str(args.seed), "--cost-clients", "0", "--no-progress", "--out", str(run)]
    if name.startswith("flat-w"):
        extra = ["--model", "flat", "--flat-width", name[len("flat-w"):]]
    else:
        blocks = 0 if name == "hmoe-independent" else int(name[len("hmoe-trunk"):])
        extra = ["--model", "hmoe", "--trunk-blocks", str(blocks), "--expert-width", str(args.expert_width)]
    return [sys.executable, "-m", "exporter.cli", "train", *common, *extra, *args.train_args] + \
        (["--resume"] if (run / "config.json").exists() else [])


def train(name: str, run: Path, args: argparse.Namespace) -> None:
    if (run / "report.json").exists():
        return
    run.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    proc = subprocess.run(train_command(name, run, args), capture_output=True, text=True)
    (run.parent / f"{run.name}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{proc.stderr[-3000:]}")
    print(f"trained {name} in {time.perf_counter() - start:.0f} s", flush=True)


def score(run: Path) -> dict:
    """Test scores (HMoE greedy and soft:2; flat's leaf rule), rounds and client compute."""
    from trainer.prepare import prepare
    from trainer.protocol.run import load_run_config
    from trainer.transports.inprocess import Federation
    cfg = load_run_config(run)
    kind = "hmoe" if (run / "state-hmoe.json").exists() and cfg.hmoe_rounds else "flat"
    prep = prepare(cfg)
    fed = Federation(run, kind, cfg, prep)
    d = prep.data
    report = json.loads((run / "report.json").read_text())[kind]
    out = {"kind": kind, "run": str(run), "rounds": report["rounds"], "seed": cfg.seed,
           "client_gmacs": report["total_client_gmacs"], "client_seconds": report["total_client_seconds"],
           "trunk_blocks": cfg.trunk_blocks if kind == "hmoe" else 0}
    for decoder in (["greedy", "soft:2"] if kind == "hmoe" else ["leaf"]):
        s = fed.evaluate(d.test_x, d.test_y, decoder)
        out[decoder] = {"info_f1": s["info_f1"], "leaf_accuracy": s["leaf_accuracy"],
                        "experts_per_input": s.get("experts_per_input")}
    out["live"] = live(fed)
    return out


def live(fed) -> dict:
    """Live-tensor peak (MB) of one step of flat's round, or of the root's and of the non-root
    expert with the most outputs, on one batch of the run's own data."""
    from trainer.device.cost import measure_update
    d, s = fed.prep.data, fed.strategy
    keys = list(fed.tasks)
    if fed.kind == "hmoe":
        owner = min(keys, key=lambda k: fed.tasks[k].node)
        rest = [k for k in keys if k != owner]
        keys = [owner] + ([max(rest, key=lambda k: (fed.tasks[k].net.num_outputs, k))] if rest else [])
    out = {}
    for key in keys:
        net = fed.tasks[key].net
        idx, target = s.client_data(key, d.train_y, np.arange(len(d.train_y)))
        n = fed.cfg.local.batch_size
        r = measure_update(net, fed.weights[key], d.train_x[idx[:n]], target[:n], fed.cfg.local, d.mean, d.std, 0,
                           threads=1, repeats=1, live_peak=True, trunk=fed.trunk(key))
        out[key] = {"live_mb": r["live_peak_mb"], "outputs": net.num_outputs, "width": net.width,
                    "params": sum(int(np.prod(v)) for v in net.param_shapes().values()),
                    "role": "flat" if fed.kind == "flat" else ("root" if key == keys[0] else "largest other")}
    return out


def results_lines(r: dict) -> list[str]:
    """The Markdown table of results.json (also rendered into BENCHMARKS.md)."""
    flat = next((m for m in r["models"].values() if m["kind"] == "flat" and m.get("width") == r["trunk_width"]), None)
    flat_live = next(iter(flat["live"].values()))["live_mb"] if flat else None
    lines = ["| model | rounds | Information F1, greedy (flat: leaf) | soft:2 | leaf accuracy | client GMACs | "
             "root's round (flat's), live MB | largest other round, live MB (share of flat's) |",
             "|---|---|---|---|---|---|---|---|"]
    for name, m in r["models"].items():
        main = m.get("greedy") or m["leaf"]
        roles = {v["role"]: v["live_mb"] for v in m["live"].values()}
        other = roles.get("largest other")
        soft = f"{m['soft:2']['info_f1']:.4f}" if "soft:2" in m else "-"
        first = roles.get("root", roles.get("flat"))
        rest = "-" if other is None else f"{other:.2f}" + (f" ({other / flat_live:.2f})" if flat_live else "")
        lines.append(f"| {name} | {m['rounds']} | {main['info_f1']:.4f} | {soft} | {main['leaf_accuracy']:.4f} | "
                     f"{m['client_gmacs']:.0f} | {first:.2f} | {rest} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/trunk-results")
    p.add_argument("--work", default="runs/trunk", help="where the runs are trained (resumable)")
    p.add_argument("--dataset", default="hanzi:500")
    p.add_argument("--rounds", type=int, default=100, help="rounds of every model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--trunk-blocks", type=int, nargs="+", default=[2])
    p.add_argument("--expert-width", type=int, default=16, help="experts' width (the root's: the data set's rule)")
    p.add_argument("--flat-widths", type=int, nargs="+", default=[32])
    p.add_argument("--trunk-width", type=int, default=32, help="the flat width compared with (the trunk's)")
    p.add_argument("--no-independent", action="store_true", help="leave out HMoE with independent experts")
    p.add_argument("--reuse", action="append", default=[], metavar="NAME=DIR", help="a model's run trained already")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("train_args", nargs="*", help="after --: more `hmoe train` flags for every model")
    args = p.parse_args(argv)
    names = [f"hmoe-trunk{k}" for k in args.trunk_blocks] + ([] if args.no_independent else ["hmoe-independent"]) \
        + [f"flat-w{w}" for w in args.flat_widths]
    reuse = dict(item.split("=", 1) for item in args.reuse)
    runs = {n: Path(reuse.get(n, Path(args.work) / f"{n}-r{args.rounds}-s{args.seed}")) for n in names}
    started = time.perf_counter()
    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        list(pool.map(lambda n: train(n, runs[n], args), names))
    models = {}
    for n in names:
        models[n] = score(runs[n])
        if n.startswith("flat-w"):
            models[n]["width"] = int(n[len("flat-w"):])
    from trainer.machine import git_commit, machine_info
    r = {"command": " ".join(["python", "benchmarks/trunk.py", *(argv if argv is not None else sys.argv[1:])]),
         "dataset": args.dataset, "rounds": args.rounds, "seed": args.seed, "trunk_width": args.trunk_width,
         "models": models, "machine": machine_info(), "commit": git_commit(),
         "wall_seconds": time.perf_counter() - started}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(r, indent=1) + "\n")
    lines = results_lines(r)
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
