"""Greedy decoding of one image at a time against the flat model, on one bundle: with every
expert open, and under memory budgets that hold part of the tree: the path-only budget (the
bytes of the longest root-to-leaf path's experts and the templates, from
edge_runtime.engine.path_only_bytes) and shares of all experts' bytes. Under a budget, three
policies: the engine's default (experts the budget cannot keep open are streamed through their template, see
docs/DEVICE.md), the same with the weights packed for this CPU (`hmoe-edge pack`), read per run or
memory-mapped (`--mmap`: nothing copied; the pages are page cache the kernel keeps while memory is free,
so the budget no longer bounds what is resident), and sessions only, closing the deepest expert first or the least recently
used (what the engine did before templates). One onnxruntime thread.

    python benchmarks/greedy_latency.py --bundle runs/demo/bundle --out docs/results/greedy_latency

Inputs are the test images of the data set the bundle was exported from (else seeded noise). The
settings take turns, 100 images each (the order rotated every turn), so all rows share the
machine's conditions while each keeps its own caches warm as a device would. Writes greedy_latency.json: p50 / p95 in ms per setting, session
creations and streamed runs, and how many images got the batch decoder's leaf; then, timed apart
(so that the timer is not in the rows above), each model's own run: its p50 inside decoding (the
settings taking turns again, on up to 2,000 images) against its p50 run 200 times in a row on one
image (its weights then stay in the CPU's caches).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edge_runtime.engine import Engine, path_only_bytes  # noqa: E402

BLOCK = 100   # images a setting runs in a row before the next setting's turn
RUN_TIMED = ("flat", "greedy, every expert open", "greedy, path-only budget, streamed, packed, memory-mapped")
POLICIES = {"streamed": {}, "sessions only, deepest first": {"stream": False},
            "sessions only, least recently used": {"stream": False, "eviction": "lru"}}


def inputs(engine: Engine, n: int) -> tuple[np.ndarray, str]:
    spec = engine.bundle.input_spec
    shape = tuple(spec.shape)
    name = engine.bundle.manifest.source.get("dataset", "")
    try:
        from trainer.datasets import load_dataset
        x = load_dataset(name, download=False).test_x[:n].astype(np.float32) / 255.0
        if x.shape[1:] != shape:
            raise LookupError
        source = f"{name} test images"
    except Exception:   # noqa: BLE001 - no such data set here: seeded noise of the bundle's shape
        x = np.random.default_rng(0).random((n, *shape), dtype=np.float32)
        source = "seeded uniform noise"
    mean = np.asarray(spec.mean, dtype=np.float32).reshape(-1, 1, 1)
    std = np.asarray(spec.std, dtype=np.float32).reshape(-1, 1, 1)
    return ((x - mean) / std).astype(np.float32), source


def model_runs(settings: dict, x: np.ndarray, n: int = 2000) -> dict:
    """Per setting in RUN_TIMED: each model's p50 run (us) inside decoding, and how many runs.
    The engine's one-input run (``Engine._run_one``) is timed through a wrapper on the instance
    (one per engine: the flat row and the all-open row share theirs)."""
    timed = {name: settings[name] for name in RUN_TIMED if name in settings}
    got: dict[str, dict] = {name: {} for name in timed}
    now = [""]   # the setting whose turn it is
    engines = {id(e): e for e, _ in timed.values()}
    for engine in engines.values():
        def run(key, inner=engine._run_one):
            t = time.perf_counter()
            out = inner(key)
            got[now[0]].setdefault(key, []).append(time.perf_counter() - t)
            return out
        engine._run_one = run
    names = list(timed)
    try:
        for b, lo in enumerate(range(0, min(n, len(x)), BLOCK)):
            for j in range(len(names)):
                now[0] = names[(b + j) % len(names)]
                fn = timed[now[0]][1]
                for i in range(lo, min(lo + BLOCK, len(x))):
                    fn(x[i:i + 1])
    finally:
        for engine in engines.values():
            del engine._run_one   # (the class's method again)
    return {name: {k: {"p50_us": float(np.median(v)) * 1e6, "runs": len(v)} for k, v in acc.items()}
            for name, acc in got.items()}


def repeated_runs(engine: Engine, x: np.ndarray, times: int = 200) -> dict:
    """Each model of ``engine`` (all open) run ``times`` times in a row on one image: p50 us."""
    engine._load_one(engine.check_input(x[:1]))
    out = {}
    for key in engine.entries:
        ts = []
        for _ in range(times):
            t = time.perf_counter()
            engine._run_one(key)
            ts.append(time.perf_counter() - t)
        out[key] = float(np.median(ts)) * 1e6
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", required=True)
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.8], help="shares of the experts' bytes")
    p.add_argument("--out", default="runs/greedy_latency")
    p.add_argument("--no-pack", dest="pack", action="store_false",
                   help="leave out the packed rows (`hmoe-edge pack` into a temporary folder, timed)")
    args = p.parse_args()
    import tempfile
    tmp = tempfile.TemporaryDirectory(prefix="hmoe-pack-")
    full = Engine(args.bundle)
    full.preload(flat=True)
    x, source = inputs(full, args.images)
    batch = full.decode(x, "threshold:0.0").nodes   # the batch decoder
    total = sum(e.bytes for e in full.bundle.experts.values())
    budgets = [("path-only budget", path_only_bytes(full.bundle))] + [(f"budget {s:.0%} of the experts' bytes", s * total)
                                                               for s in args.budgets]
    settings = {"flat": (full, full.flat_nodes), "greedy, every expert open": (full, full.decode),
                "greedy, every expert open, batch decoder": (full, lambda xi: full.decode(xi, "threshold:0.0"))}
    policies = dict(POLICIES)
    pack_seconds = None
    if args.pack and full.bundle.manifest.templates:   # `hmoe-edge pack` on this machine, timed
        from edge_runtime.packing import pack_bundle
        t = time.perf_counter()
        pack_bundle(full.bundle, tmp.name, log=None)
        pack_seconds = time.perf_counter() - t
        policies = {"streamed": {}, "streamed, packed for this CPU": {"pack": tmp.name},
                    "streamed, packed, memory-mapped": {"pack": tmp.name, "mmap": True}, **{
            k: v for k, v in POLICIES.items() if k != "streamed"}}
    for label, nbytes in budgets:
        for policy, kw in policies.items():
            e = Engine(args.bundle, memory_budget_mb=nbytes / 2**20, **kw)
            settings[f"greedy, {label}, {policy}"] = (e, e.decode)
    names = list(settings)
    times = {n: [] for n in names}
    leaves = {n: [] for n in names}
    for b, lo in enumerate(range(0, len(x), BLOCK)):
        for j in range(len(names)):
            name = names[(b + j) % len(names)]
            fn = settings[name][1]
            for i in range(lo, min(lo + BLOCK, len(x))):
                xi = x[i:i + 1]
                t = time.perf_counter()
                out = fn(xi)
                times[name].append((time.perf_counter() - t) * 1e3)
                leaves[name].append(int(out[0]) if name == "flat" else int(out.nodes[0]))
    rows = {}
    for name in names:
        e = settings[name][0]
        r = {"p50_ms": float(np.percentile(times[name], 50)), "p95_ms": float(np.percentile(times[name], 95))}
        if name != "flat":
            r["same_leaf_as_batch_decoder"] = int((np.array(leaves[name]) == batch).sum())
        if e is not full:
            r.update(session_creations=e.stats.misses - e.stats.streamed, streamed=e.stats.streamed,
                     budget_mb=e.budget / 2**20, held_mb_end=e.held_bytes / 2**20, open_end=e.loaded)
        rows[name] = r
        print(f"{name}: p50 {r['p50_ms']:.3f} ms, p95 {r['p95_ms']:.3f} ms"
              + (f", {r['session_creations']} session creations, {r['streamed']} streamed" if "streamed" in r else ""))
    flat = rows["flat"]["p50_ms"]
    runs = model_runs(settings, x)
    runs["repeated on one image"] = {k: {"p50_us": v} for k, v in repeated_runs(full, x).items()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "greedy_latency.json").write_text(json.dumps({
        "command": "python benchmarks/greedy_latency.py " + " ".join(sys.argv[1:]), "images": len(x),
        "pack_seconds": pack_seconds,
        "inputs": source, "bundle_experts": len(full.bundle.experts), "experts_mb": total / 2**20,
        "greedy_p50_over_flat": {n: r["p50_ms"] / flat for n, r in rows.items() if n != "flat"},
        "p95_over_p50": {n: r["p95_ms"] / r["p50_ms"] for n, r in rows.items()}, "rows": rows,
        "model_runs": runs}, indent=1) + "\n")
    print(f"same leaf as the batch decoder: {min(r.get('same_leaf_as_batch_decoder', len(x)) for r in rows.values())}"
          f" of {len(x)} in every setting")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
