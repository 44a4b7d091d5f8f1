"""Child process of edge_runtime.bench: one loading mode, latency and resident memory.

Usage: python -m edge_runtime.bench_worker BUNDLE MODE IMAGES.npy THREADS [VARIANT]
MODE: path (greedy, only the experts a decision visits, cache bounded to one path),
stream (greedy under the smallest budget the bundle allows: its templates and room for one
expert's weights, so every expert is streamed), all (every expert preloaded, not the flat model), flat (the flat model alone), deepest
(every expert on the tree's longest root-to-leaf path run in turn on each image: what the
deepest greedy decision costs, whatever the images), stream-tour (the smallest budget, image i
runs the experts on the path of leaf i modulo the leaves, so that every expert is streamed
whatever the experts decide: what the engine keeps after visiting them all).
VARIANT: fp32 (default) or int8 (the bundle's quantized models).

Resident memory is read three times: idle (onnxruntime imported, manifest read),
ready (the engine open, which pays onnxruntime's once-per-process start-up with a
weightless model, no expert loaded) and after the first prediction; and once more after
the last image (``grown_mb``: what the process grew by over the whole run, over ready).
"""

from __future__ import annotations

import gc
import json
import sys
import time

import numpy as np


def rss_mb() -> float:
    import psutil
    return psutil.Process().memory_info().rss / 2**20


def main(bundle: str, mode: str, images: str, threads: int, variant: str = "fp32") -> int:
    import onnxruntime  # noqa: F401  (part of the idle runtime)

    from edge_runtime.bundle import load_bundle
    from edge_runtime.engine import Engine, path_only_bytes
    b = load_bundle(bundle)
    x = np.load(images)
    gc.collect()
    idle = rss_mb()
    # Opening the engine pays onnxruntime's once-per-process start-up with a weightless
    # model (edge_runtime.engine.warm_up_runtime): "ready" is the engine open, no expert loaded.
    t = time.perf_counter()
    if mode == "path":
        engine = Engine(b, memory_budget_mb=path_only_bytes(b, variant) / 2**20, threads=threads, variant=variant)
    elif mode in ("stream", "stream-tour"):
        least = Engine(b, memory_budget_mb=path_only_bytes(b, variant) / 2**20, variant=variant, warm_up=False)
        if not least.templates:
            raise SystemExit("mode stream needs a bundle with templates (hmoe export writes them) and fp32")
        engine = Engine(b, memory_budget_mb=least.reserved / 2**20, threads=threads, variant=variant)
        del least
    elif mode in ("all", "flat", "deepest"):
        engine = Engine(b, threads=threads, variant=variant)
    else:
        raise SystemExit(f"unknown mode {mode!r}; expected path, stream, stream-tour, all, flat or deepest")
    open_ms = (time.perf_counter() - t) * 1000
    gc.collect()
    ready = rss_mb()
    t = time.perf_counter()
    if mode == "all":
        engine.preload()
    names = b.tree.names
    deepest = max(([names[v] for v in b.tree.path(int(leaf)) if names[v] in engine.entries] for leaf in b.tree.leaves),
                  key=len)
    tour = [[names[v] for v in b.tree.path(int(leaf)) if names[v] in engine.entries] for leaf in b.tree.leaves]
    if mode == "flat":
        def run(i):
            return engine.flat_nodes(x[i:i + 1])
    elif mode == "stream-tour":
        def run(i):
            return [engine.run(k, x[i:i + 1]) for k in tour[i % len(tour)]]
    elif mode == "deepest":
        def run(i):
            return [engine.run(k, x[i:i + 1]) for k in deepest]
    else:
        def run(i):
            return engine.predict(x[i:i + 1])
    run(0)
    first_ms = (time.perf_counter() - t) * 1000
    after_one = rss_mb()
    loaded_after_one = list(engine.loaded)
    times, evaluated = [], []
    for i in range(len(x)):
        t = time.perf_counter()
        r = run(i)
        times.append((time.perf_counter() - t) * 1000)
        if mode in ("deepest", "stream-tour"):
            evaluated.append(len(r))
        elif mode != "flat":
            evaluated.append(r[0].experts_evaluated)
    out = {"mode": mode, "idle_mb": idle, "ready_mb": ready, "resident_mb": after_one,
           "added_mb": after_one - ready, "added_mb_over_import": after_one - idle,
           "resident_mb_end": rss_mb(), "grown_mb": rss_mb() - ready, "loaded_after_one": loaded_after_one,
           "open_ms": open_ms, "first_prediction_ms": first_ms,
           "latency_ms_median": float(np.median(times)), "latency_ms_p95": float(np.percentile(times, 95)),
           "images": int(len(x)), "cache_misses": engine.stats.misses, "torch_loaded": "torch" in sys.modules,
           "variant": variant, "experts_per_input": float(np.mean(evaluated)) if evaluated else None,
           "max_experts_per_input": int(max(evaluated)) if evaluated else None,
           "experts_visited": sum(1 for k, n in engine.visits.items() if n and k != "flat")}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    if len(sys.argv) not in (5, 6):
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    sys.exit(main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), *sys.argv[5:]))
