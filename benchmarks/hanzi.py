"""Many classes on real glyphs: HMoE against flat softmax on the hanzi data set (GB2312
level-1 characters rendered from Debian's CJK fonts, tested on held-out font families,
under the Unicode radical taxonomy). Issue 27.

Steps (each resumable: trained runs with a report.json are reused):

1. stats   the data set's statistics (characters, faces per split, images per class, the
           tree's experts and depth, the largest and smallest expert) and glyphs.png, sample
           glyphs from training and from held-out faces;
2. table1  the source paper's Table 1 on this data (benchmarks/table1.py's measurement:
           per-round client time, resident growth and live-tensor peak of flat, the largest
           and the smallest expert; the paper's Tiny ImageNet figures beside);
3. sweep   HMoE (several experts a round: --assignment spread) and flat softmax at several
           widths, same clients and data; test Information F1 and leaf accuracy on the
           held-out faces against per-round client memory (the live-tensor peak of the
           model's, or the largest expert's, round) and total client compute, Pareto fronts;
4. edge    the main widths' experts and flat model in one bundle: path-only against every
           expert against flat (added resident memory, p50 / p95 latency at batch 1, disk).
5. subtrees  per-radical bundles for the radicals with the most characters: disk, added
           memory, latency, and leaf accuracy on that radical's held-out images beside the
           whole bundle's and flat's.
6. seeds   the second goal's pair (the best HMoE and the widest flat model whose round fits
           in its largest expert's memory) trained again with the profile's other seeds; the
           goal is judged on the margin's mean over every seed, not on seed 0 alone.
7. rounds  that flat model trained for as many rounds as HMoE (the sweep gives flat fewer):
           whether HMoE's lead outlives equal rounds.
8. shape   the edge step's figures for the profile's ``shape`` tree (the cpu profile: all
           3,755 characters, which it does not train): a bundle of the main widths built from
           one round on synthetic data (memory and latency depend on the shapes only; the
           decisions of untrained experts do not mean anything), measured as the edge step
           does, plus a tour (every expert's path in turn, so that every expert is streamed).

    python benchmarks/hanzi.py --profile cpu --out docs/results/hanzi     # make bench: CPU
    python benchmarks/hanzi.py --profile full --out docs/results/hanzi-full --device cuda

Writes hanzi.json, hanzi.md, glyphs.png and pareto.png to --out.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

PROFILES = {
    # make bench: 500 characters, CPU
    "cpu": {"dataset": "hanzi:500", "clients": 20, "per_round": 20, "hmoe_rounds": 150, "flat_rounds": 50,
            "hmoe_widths": [8, 16], "flat_widths": [8, 16, 32], "main": (16, 32), "repeats": 3, "images": 500,
            "partition": "iid", "warm_start": 50, "seeds": [1, 2], "shape": "hanzi"},
    # all 3,755 characters: a GPU machine
    "full": {"dataset": "hanzi", "clients": 50, "per_round": 50, "hmoe_rounds": 400, "flat_rounds": 100,
             "hmoe_widths": [8, 16, 32], "flat_widths": [8, 16, 32, 64], "main": (16, 32), "repeats": 3,
             "images": 1000, "partition": "iid", "warm_start": 130, "seeds": [1, 2]},
    # the test's: seconds
    "tiny": {"dataset": "hanzi:30", "clients": 4, "per_round": 4, "hmoe_rounds": 4, "flat_rounds": 2,
             "hmoe_widths": [4], "flat_widths": [2, 4], "main": (4, 4), "repeats": 1, "images": 20,
             "partition": "iid", "warm_start": 2, "seeds": [1], "shape": "hanzi:60"},
}
STEPS = ("stats", "table1", "sweep", "edge", "subtrees", "seeds", "rounds", "shape")


def hmoe(*args: str) -> None:
    exe = Path(sys.executable).parent / "hmoe"
    cmd = [str(exe) if exe.exists() else "hmoe", *args]
    print("$ " + " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"failed (exit {proc.returncode}): {' '.join(cmd)}")


# ------------------------------------------------------------------ stats
def stats(prof: dict, out: Path) -> dict:
    from trainer import glyphs
    from trainer.datasets import load_dataset
    d = load_dataset(prof["dataset"])
    tree = d.tree
    kids = {tree.names[v]: len(tree.children(v)) for v in tree.experts}
    all_faces = glyphs.faces()
    per_class = {s: np.bincount(y, minlength=tree.num_leaves) for s, y in (("train", d.train_y), ("test", d.test_y))}
    result = {
        "dataset": prof["dataset"], "characters": tree.num_leaves, "image_size": list(d.shape),
        "train_images": int(len(d.train_y)), "test_images": int(len(d.test_y)),
        "faces": {s: [f.name for f in all_faces if f.split == s] for s in ("train", "test")},
        "families": {s: sorted({f.family for f in all_faces if f.split == s}) for s in ("train", "test")},
        "images_per_class": {s: [int(v.min()), int(v.max())] for s, v in per_class.items()},
        "experts": len(kids), "depth": int(tree.depths.max()), "root_children": len(tree.children(0)),
        "largest_expert": max(kids.items(), key=lambda kv: (kv[1], kv[0])),
        "smallest_expert": min(kids.items(), key=lambda kv: (kv[1], kv[0])),
        "experts_by_children": {str(k): int(v) for k, v in zip(*np.unique(list(kids.values()), return_counts=True))},
        "mean_std": [float(d.train_x.mean() / 255), float(d.train_x.std() / 255)],
    }
    glyph_picture(d, all_faces, out / "glyphs.png")
    return result


def glyph_picture(d, all_faces, path: Path) -> None:
    """Sample glyphs: a row per split, six characters, from training and held-out faces."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rng = np.random.default_rng(0)
    chars = rng.choice(d.tree.num_leaves, 6, replace=False)
    fig, axes = plt.subplots(4, 12, figsize=(12, 4.4))
    for row, (split, x, y) in enumerate((("train", d.train_x, d.train_y), ("train", d.train_x, d.train_y),
                                         ("held-out", d.test_x, d.test_y), ("held-out", d.test_x, d.test_y))):
        for col in range(12):
            c = chars[col // 2]
            idx = np.flatnonzero(y == c)
            i = idx[(2 * (row % 2) + col % 2) * len(idx) // 4]
            ax = axes[row, col]
            ax.imshow(x[i, 0], cmap="gray", vmin=0, vmax=255)
            ax.set_xticks([])
            ax.set_yticks([])
            if col == 0:
                ax.set_ylabel(split, fontsize=8)
    side = d.train_x.shape[-1]
    fig.suptitle(f"hanzi: training faces (top two rows) and held-out families (bottom two), {side}x{side}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# ----------------------------------------------------------------- table1
def table1(prof: dict, repeats: int) -> dict:
    import table1 as t1
    from tqdm import tqdm
    t1.SHAPES["hanzi"] = {"label": f"{prof['dataset']} (real glyphs, radical tree)", "dataset": prof["dataset"],
                          "n": 0}
    t1.PAPER["hanzi"] = t1.PAPER["tiny-imagenet"]
    with tqdm(total=0, desc="table 1 (hanzi)", unit="update") as bar:
        return t1.measure_shape("hanzi", 0, repeats, 8, 0, bar)


# ------------------------------------------------------------------ sweep
def common(prof: dict, device: str) -> list[str]:
    return ["--dataset", prof["dataset"], "--clients", str(prof["clients"]), "--clients-per-round",
            str(prof["per_round"]), "--partition", prof["partition"], "--assignment", "spread", "--min-cohort", "2",
            "--cost-clients", "0", "--no-progress", "--device", device]


def train_command(prof: dict, name: str, run: Path, device: str, seed: int = 0,
                  flat_rounds: int | None = None) -> list[str]:
    """``hmoe train`` for the sweep's model ``name`` (hmoe-wW or flat-wW) into ``run``
    (``flat_rounds``: instead of the profile's)."""
    kind, w = name.split("-w")[0], int(name.split("-w")[1])
    rounds = (["--expert-width", str(w), "--hmoe-rounds", str(prof["hmoe_rounds"]), "--flat-rounds", "0",
               "--warm-start", str(prof["warm_start"])]
              if kind == "hmoe" else
              ["--flat-width", str(w), "--flat-rounds", str(flat_rounds or prof["flat_rounds"]), "--hmoe-rounds", "0"])
    return (["train", "--out", str(run), *rounds, *common(prof, device)] + (["--seed", str(seed)] if seed else [])
            + (["--resume"] if (run / "config.json").exists() else []))


def train_all(todo: list[list[str]], jobs: int) -> None:
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(max(1, jobs)) as pool:
        list(pool.map(lambda args: hmoe(*args), todo))


def train_runs(prof: dict, work: Path, device: str, reuse: dict[str, Path], jobs: int) -> dict[str, Path]:
    """Every model of the sweep trained (or reused: ``reuse`` maps hmoe-wW / flat-wW to a run
    directory trained with the profile's settings), ``jobs`` trainings at once: name -> run."""
    todo, runs = [], {}
    for kind, widths in (("hmoe", prof["hmoe_widths"]), ("flat", prof["flat_widths"])):
        for w in widths:
            name = f"{kind}-w{w}"
            run = runs[name] = Path(reuse.get(name, work / name))
            if not (run / "report.json").exists():
                todo.append(train_command(prof, name, run, device))
    train_all(todo, jobs)
    return runs


def live_peak(run: Path, kind: str) -> dict:
    """The live-tensor peak (MB) of one step of the model's round (flat) or of its largest
    expert's (the one with the most outputs), one batch of the run's own data."""
    from trainer.device.client import to_numpy
    from trainer.device.cost import measure_update
    from trainer.device.nets import build_net
    from trainer.prepare import prepare
    from trainer.protocol.run import load_run_config
    cfg = load_run_config(run)
    prep = prepare(cfg)
    d = prep.data
    tasks = cfg.tasks(kind, d.tree, tuple(d.train_x.shape[1:]))
    key = max(tasks, key=lambda k: (tasks[k].net.num_outputs, k))
    net = tasks[key].net
    s = cfg.strategy(kind, d.tree, tasks)
    idx, target = s.client_data(key, d.train_y, np.arange(len(d.train_y)))
    n = cfg.local.batch_size
    r = measure_update(net, to_numpy(build_net(net)), d.train_x[idx[:n]], target[:n], cfg.local, d.mean, d.std, 0,
                       threads=1, repeats=1, live_peak=True)
    return {"task": key, "outputs": net.num_outputs, "width": net.width, "live_mb": r["live_peak_mb"]}


def pareto(points: list[dict], cost: str) -> list[str]:
    """Names of the points no other point beats: F1 at least as high at no more cost, one of them strictly."""
    front = []
    for p in points:
        if not any(q is not p and q["f1"] >= p["f1"] and q[cost] <= p[cost] and (q["f1"] > p["f1"] or q[cost] < p[cost])
                   for q in points):
            front.append(p["name"])
    return front


def sweep(prof: dict, work: Path, device: str, reuse: dict[str, Path], jobs: int) -> dict:
    runs = train_runs(prof, work, device, reuse, jobs)
    points = []
    for name, run in runs.items():
        kind = name.split("-")[0]
        report = json.loads((run / "report.json").read_text())[kind]
        test = report["test"]["greedy" if kind == "hmoe" else "leaf"]
        points.append({"name": name, "kind": kind, "width": int(name.split("-w")[1]), "run": str(run),
                       "f1": test["info_f1"], "leaf_accuracy": test["leaf_accuracy"], "rounds": report["rounds"],
                       "client_gmacs": report["total_client_gmacs"], "client_seconds": report["total_client_seconds"],
                       **live_peak(run, kind)})
    for p in points:
        p["pareto_memory"] = p["name"] in pareto(points, "live_mb")
        p["pareto_compute"] = p["name"] in pareto(points, "client_gmacs")
    return {"points": points, "goals": goals(points), "runs": {k: str(v) for k, v in runs.items()}}


def test_scores(run: Path, kind: str) -> dict:
    """A run's test F1 and leaf accuracy (HMoE greedy, flat's leaf rule), seed, rounds and compute."""
    report = json.loads((Path(run) / "report.json").read_text())
    test = report[kind]["test"]["greedy" if kind == "hmoe" else "leaf"]
    return {"f1": test["info_f1"], "leaf_accuracy": test["leaf_accuracy"], "seed": report["config"]["seed"],
            "rounds": report[kind]["rounds"], "client_gmacs": report[kind]["total_client_gmacs"]}


def equal_rounds(prof: dict, work: Path, device: str, reuse: dict[str, Path], sweep_result: dict) -> dict:
    """The second goal's flat model trained for HMoE's rounds, seed 0 (``reuse`` may name it
    as rounds/NAME=DIR), beside the sweep's HMoE."""
    pair = sweep_result["goals"]["same_memory"]
    if pair is None:
        return {"pair": None}
    hm, fl = pair["hmoe"], pair["flat"]
    run = Path(reuse.get(f"rounds/{fl}", work / "rounds" / fl))
    if not (run / "report.json").exists():
        train_all([train_command(prof, fl, run, device, flat_rounds=prof["hmoe_rounds"])], 1)
    f = test_scores(run, "flat")
    if f["seed"] != 0 or f["rounds"] != prof["hmoe_rounds"]:
        raise SystemExit(f"{run}: trained with seed {f['seed']} for {f['rounds']} rounds; "
                         f"expected seed 0 and {prof['hmoe_rounds']}")
    points = {p["name"]: p for p in sweep_result["points"]}
    return {"pair": [hm, fl], "rounds": prof["hmoe_rounds"], "run": str(run), "flat_f1": f["f1"],
            "flat_leaf_accuracy": f["leaf_accuracy"], "flat_client_gmacs": f["client_gmacs"],
            "flat_f1_sweep": points[fl]["f1"], "flat_rounds_sweep": points[fl]["rounds"],
            "hmoe_f1": points[hm]["f1"], "hmoe_client_gmacs": points[hm]["client_gmacs"],
            "margin": points[hm]["f1"] - f["f1"]}


def seeds(prof: dict, work: Path, device: str, reuse: dict[str, Path], jobs: int, sweep_result: dict) -> dict:
    """The second goal's pair trained again with the profile's other seeds (``reuse`` may name
    them as seedS/NAME=DIR); seed 0 is the sweep's. The goal is judged on the mean margin."""
    pair = sweep_result["goals"]["same_memory"]
    if pair is None:
        return {"pair": None, "rows": [], "met": False}
    names = [pair["hmoe"], pair["flat"]]
    runs = {0: {n: Path(sweep_result["runs"][n]) for n in names}}
    todo = []
    for seed in prof["seeds"]:
        runs[seed] = {}
        for n in names:
            run = runs[seed][n] = Path(reuse.get(f"seed{seed}/{n}", work / f"seed{seed}" / n))
            if not (run / "report.json").exists():
                todo.append(train_command(prof, n, run, device, seed))
    train_all(todo, jobs)
    rows = []
    for seed, by_name in runs.items():
        h, f = test_scores(by_name[names[0]], "hmoe"), test_scores(by_name[names[1]], "flat")
        if h["seed"] != seed or f["seed"] != seed:
            raise SystemExit(f"seed {seed}: the runs {by_name} were trained with seeds {h['seed']} and {f['seed']}")
        rows.append({"seed": seed, "hmoe_f1": h["f1"], "hmoe_leaf_accuracy": h["leaf_accuracy"], "flat_f1": f["f1"],
                     "flat_leaf_accuracy": f["leaf_accuracy"], "margin": h["f1"] - f["f1"],
                     "runs": {n: str(r) for n, r in by_name.items()}})
    margins = [r["margin"] for r in rows]
    mean = float(np.mean(margins))
    return {"pair": names, "rows": rows, "mean_margin": mean, "min_margin": float(min(margins)),
            "std_margin": float(np.std(margins, ddof=1)) if len(margins) > 1 else 0.0,
            "mean_hmoe_f1": float(np.mean([r["hmoe_f1"] for r in rows])),
            "mean_flat_f1": float(np.mean([r["flat_f1"] for r in rows])), "met": mean >= 0.05}


def goals(points: list[dict]) -> dict:
    """Issue 27's goals, each with the figures behind it."""
    hm = [p for p in points if p["kind"] == "hmoe"]
    fl = [p for p in points if p["kind"] == "flat"]
    best = max(hm, key=lambda p: p["f1"])
    quarter = []
    for f in fl:   # HMoE at no more than a quarter of this flat model's per-round memory
        cheap = [h for h in hm if h["live_mb"] <= f["live_mb"] / 4]
        if cheap:
            h = max(cheap, key=lambda p: p["f1"])
            quarter.append({"flat": f["name"], "hmoe": h["name"], "margin": h["f1"] - f["f1"],
                            "memory_ratio": h["live_mb"] / f["live_mb"]})
    fits = [f for f in fl if f["live_mb"] <= best["live_mb"]]
    widest = max(fits, key=lambda p: p["width"]) if fits else None
    return {"quarter_memory": quarter,
            "quarter_memory_met": bool(quarter) and all(q["margin"] >= 0 for q in quarter),
            "same_memory": ({"flat": widest["name"], "hmoe": best["name"], "margin": best["f1"] - widest["f1"]}
                            if widest else None),
            "same_memory_met": bool(widest) and best["f1"] - widest["f1"] >= 0.05}


# ------------------------------------------------------------------- edge
def disk_mb(b) -> dict:
    """A bundle's MB on disk: every expert, the flat model, the longest root-to-leaf path's experts."""
    names = b.tree.names
    return {"experts_mb": sum(e.bytes for e in b.experts.values()) / 2**20,
            "flat_mb": b.flat.bytes / 2**20 if b.flat else None,
            "largest_path_mb": max(sum(b.experts[names[v]].bytes for v in b.tree.path(int(leaf))
                                       if names[v] in b.experts) for leaf in b.tree.leaves) / 2**20}


def edge(prof: dict, work: Path, runs: dict[str, str]) -> dict:
    """The main widths' bundle: the HMoE run's experts and the flat run's model (both runs
    trained with the same data, clients and seed) in one bundle."""
    import shutil

    from edge_runtime import bench
    from exporter.bundle import export_run
    from trainer.datasets import load_dataset
    w, fw = prof["main"]
    both = work / "edge-run"
    bundle = work / "edge-bundle"
    made_from = json.dumps({"hmoe": str(runs[f"hmoe-w{w}"]), "flat": str(runs[f"flat-w{fw}"])})
    stamp = work / "edge-bundle.from.json"   # the runs the kept bundle (and the subtree bundles) came from
    if not (bundle / "manifest.json").exists() or not stamp.exists() or stamp.read_text() != made_from:
        for old in [bundle, *work.glob("subtree-*")]:
            shutil.rmtree(old, ignore_errors=True)
        shutil.rmtree(both, ignore_errors=True)
        shutil.copytree(runs[f"hmoe-w{w}"], both, ignore=shutil.ignore_patterns("bundle*", "plots"))
        shutil.copy(Path(runs[f"flat-w{fw}"]) / "flat.safetensors", both / "flat.safetensors")
        export_run(both, bundle, progress=False, validate_images=500)
        stamp.write_text(made_from)
    b = bench.load_bundle(bundle)
    d = load_dataset(prof["dataset"])
    x = b.input_spec.normalize(d.test_x[np.random.default_rng(0).permutation(len(d.test_x))[:prof["images"]]])
    res = bench.inference(bundle, x, modes=("path", "stream", "all", "flat"))
    disk = disk_mb(b)
    rows = {m: {"added_mb": r["added_mb"], "grown_mb": r["grown_mb"], "p50_ms": r["latency_ms_median"],
                "p95_ms": r["latency_ms_p95"], "experts_per_input": r.get("experts_per_input")}
            for m, r in res.items() if isinstance(r, dict)}

    def over_flat(mode: str) -> float | None:   # over the whole run: the larger of the two readings
        most = {m: max(rows[m]["added_mb"], rows[m]["grown_mb"]) for m in (mode, "flat")}
        return most[mode] / most["flat"] if most["flat"] > 0 else None

    path_over_flat, stream_over_flat = over_flat("path"), over_flat("stream")
    runs_f1 = {"hmoe": test_scores(runs[f"hmoe-w{w}"], "hmoe")["f1"],
               "flat": test_scores(runs[f"flat-w{fw}"], "flat")["f1"]}
    return {"bundle": str(bundle), "images": int(len(x)), "modes": rows, "disk": disk, "runs_f1": runs_f1,
            "path_over_flat_added": path_over_flat, "stream_over_flat_added": stream_over_flat,
            "path_goal_met": any(r is not None and r <= 0.3 for r in (path_over_flat, stream_over_flat))}


def shape(prof: dict, work: Path) -> dict:
    """The edge step's figures for the profile's ``shape`` tree, from a bundle trained one
    round on synthetic data of that tree's shape (the main widths: experts and flat model as
    the edge step's). Images: seeded noise. Besides greedy decoding, whose paths an untrained
    tree's experts make few, a *tour* runs the experts on every leaf's path in turn, so that
    what the engine keeps after streaming every expert is measured too."""
    from edge_inference import synthetic_bundle

    from edge_runtime import bench
    w, fw = prof["main"]
    bundle = synthetic_bundle(work / f"shape-run-w{w}", work / f"shape-bundle-w{w}",
                              f"synthetic:1,32,32:{prof['shape']}:4000", w, fw, validate_images=50,
                              clients_per_round=4, assignment="spread")
    b = bench.load_bundle(bundle)
    tree = b.tree
    res = bench.inference(bundle, bench.random_images(bundle, prof["images"]), modes=("path", "stream", "all", "flat"))
    tour = bench.inference(bundle, bench.random_images(bundle, len(tree.leaves), seed=1), modes=("stream-tour",))
    rows = {m: {"added_mb": r["added_mb"], "grown_mb": r["grown_mb"], "p50_ms": r["latency_ms_median"],
                "p95_ms": r["latency_ms_p95"], "experts_per_input": r.get("experts_per_input"),
                "experts_visited": r.get("experts_visited")}
            for m, r in (res | tour).items() if isinstance(r, dict)}
    most = {m: max(r["added_mb"], r["grown_mb"]) for m, r in rows.items()}
    kids = [len(tree.children(v)) for v in tree.experts]
    return {"tree": prof["shape"], "characters": int(tree.num_leaves), "experts": len(kids),
            "largest_expert_children": max(kids), "widths": [w, fw], "bundle": str(bundle), "modes": rows,
            "disk": disk_mb(b),
            "over_flat": {m: most[m] / most["flat"] for m in most if m != "flat"}}


def subtrees(prof: dict, work: Path, edge_result: dict) -> dict:
    """Per-radical bundles (``hmoe export --subtree``): a device that reads one radical's
    characters carries that radical's expert only. For the radicals with the most characters:
    the bundle's disk and added memory, and on the held-out images of that radical's
    characters its leaf accuracy, beside the whole HMoE bundle's and the flat model's on the
    same images (which must also find the radical)."""
    import shutil

    from edge_runtime import bench
    from edge_runtime.engine import Engine
    from exporter.bundle import export_run
    from trainer.datasets import load_dataset
    full = Path(edge_result["bundle"])
    b = bench.load_bundle(full)
    tree = b.tree
    d = load_dataset(prof["dataset"])
    truth = tree.leaves[d.test_y]
    whole = Engine(full)
    largest = sorted((int(e) for e in tree.experts if e != 0), key=lambda e: (-tree.num_children[e], tree.names[e]))
    rows = []
    for node in largest[:prof.get("subtrees", 3)]:
        name = tree.names[node]
        out = work / f"subtree-{node}"
        if not (out / "manifest.json").exists():
            shutil.rmtree(out, ignore_errors=True)
            export_run(work / "edge-run", out, subtree=name, progress=False, validate_images=200)
        sub = Engine(out)
        idx = np.flatnonzero(tree.ancestor_mask[truth, node])
        x = b.input_spec.normalize(d.test_x[idx])
        want = [tree.names[v] for v in truth[idx]]

        def accuracy(names: list[str]) -> float:
            return float(np.mean([a == w for a, w in zip(names, want)]))

        res = bench.inference(out, x[:prof["images"]], modes=("path",))
        rows.append({"node": name, "characters": int(tree.num_children[node]), "images": int(len(idx)),
                     "experts": len(sub.bundle.experts),
                     "disk_mb": sum(e.bytes for e in sub.bundle.experts.values()) / 2**20,
                     "added_mb": res["path"]["added_mb"], "p50_ms": res["path"]["latency_ms_median"],
                     "p95_ms": res["path"]["latency_ms_p95"],
                     "subtree_accuracy": accuracy([sub.tree.names[v] for v in sub.decode(x).nodes]),
                     "hmoe_accuracy": accuracy([tree.names[v] for v in whole.decode(x).nodes]),
                     "flat_accuracy": accuracy([tree.names[v] for v in whole.flat_nodes(x)])})
    return {"rows": rows, "whole_disk_mb": edge_result["disk"]["experts_mb"],
            "whole_path_added_mb": edge_result["modes"]["path"]["added_mb"],
            "flat_added_mb": edge_result["modes"]["flat"]["added_mb"]}


# ------------------------------------------------------------------- main
def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    pts = result["sweep"]["points"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, cost, label in ((axes[0], "live_mb", "per-round client memory: live tensors, MB"),
                            (axes[1], "client_gmacs", "total client compute, GMACs")):
        for kind, marker in (("hmoe", "o"), ("flat", "s")):
            ps = sorted((p for p in pts if p["kind"] == kind), key=lambda p: p[cost])
            ax.plot([p[cost] for p in ps], [p["f1"] for p in ps], marker=marker, label=kind)
            for p in ps:
                ax.annotate(f"w{p['width']}", (p[cost], p["f1"]), fontsize=7)
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("Information F1, held-out faces")
        ax.legend()
    fig.suptitle(f"{result['profile']['dataset']}: HMoE against flat softmax")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", choices=list(PROFILES), default="cpu")
    p.add_argument("--out", default="runs/hanzi")
    p.add_argument("--work", help="where the trained runs are kept (default: runs/hanzi-PROFILE)")
    p.add_argument("--steps", nargs="+", choices=STEPS, default=list(STEPS))
    p.add_argument("--device", default="cpu", help="cpu | cuda, for training")
    p.add_argument("--jobs", type=int, default=2, help="trainings at once (one torch thread each)")
    p.add_argument("--reuse", action="append", default=[], metavar="NAME=DIR",
                   help="a run already trained with the profile's settings, e.g. hmoe-w16=runs/hanzi500; "
                        "seedS/NAME=DIR for the seeds step's runs, e.g. seed1/flat-w8=runs/seed1/flat-w8; "
                        "rounds/NAME=DIR for the rounds step's")
    p.add_argument("--seeds", type=int, nargs="+", help="the seeds step's seeds besides 0 (default: the profile's)")
    args = p.parse_args(argv)
    reuse = {}
    for item in args.reuse:
        name, sep, folder = item.partition("=")
        if not sep or not (Path(folder) / "config.json").exists():
            p.error(f"--reuse {item!r}: expected NAME=DIR with DIR a run directory (config.json)")
        reuse[name] = Path(folder)
    prof = dict(PROFILES[args.profile])
    if args.seeds:
        if 0 in args.seeds:
            p.error("--seeds: seed 0 is the sweep's; give the others")
        prof["seeds"] = sorted(set(args.seeds))
    out = Path(args.out)
    work = Path(args.work or f"runs/hanzi-{args.profile}")
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    from trainer.machine import git_commit, machine_info
    path = out / "hanzi.json"
    result = json.loads(path.read_text()) if path.exists() else {}
    result.update({"command": "python benchmarks/hanzi.py " + " ".join(sys.argv[1:] if argv is None else argv),
                   "profile": {"name": args.profile, **{k: list(v) if isinstance(v, tuple) else v
                                                       for k, v in prof.items()}},
                   "machine": machine_info(), "commit": git_commit(), "device": args.device})
    start = time.perf_counter()
    for step in args.steps:
        t = time.perf_counter()
        if step == "stats":
            result["stats"] = stats(prof, out)
        elif step == "table1":
            result["table1"] = table1(prof, prof["repeats"])
        elif step == "sweep":
            result["sweep"] = sweep(prof, work, args.device, reuse, args.jobs)
        elif step == "edge":
            if "sweep" not in result:
                raise SystemExit("the edge step needs the sweep's runs: run --steps sweep first")
            result["edge"] = edge(prof, work, result["sweep"]["runs"])
        elif step == "subtrees":
            if "edge" not in result:
                raise SystemExit("the subtrees step needs the edge step's bundle: run --steps edge first")
            result["subtrees"] = subtrees(prof, work, result["edge"])
        elif step == "seeds":
            if "sweep" not in result:
                raise SystemExit("the seeds step needs the sweep's goals: run --steps sweep first")
            result["seeds"] = seeds(prof, work, args.device, reuse, args.jobs, result["sweep"])
        elif step == "rounds":
            if "sweep" not in result:
                raise SystemExit("the rounds step needs the sweep's goals: run --steps sweep first")
            result["rounds"] = equal_rounds(prof, work, args.device, reuse, result["sweep"])
        elif step == "shape":
            result["shape"] = shape(prof, work)
        result.setdefault("seconds", {})[step] = time.perf_counter() - t
        result.setdefault("commands", {})[step] = result["command"]   # what each step last ran as
        path.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    if "sweep" in result:
        plot(result, out / "pareto.png")
    from render import hanzi_section
    md = "\n".join(hanzi_section(result, out / "hanzi.md", out))
    (out / "hanzi.md").write_text(md + "\n")
    print(md)
    print(f"wrote {path} in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
