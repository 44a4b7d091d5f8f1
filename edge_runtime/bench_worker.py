"""Child process of edge_runtime.bench: one loading mode, latency and resident memory.

Usage: python -m edge_runtime.bench_worker BUNDLE MODE IMAGES.npy THREADS
MODE: path (greedy, only the experts a decision visits, cache bounded to one path),
all (every expert preloaded), flat (the flat model alone).
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


def main(bundle: str, mode: str, images: str, threads: int) -> int:
    import onnxruntime  # noqa: F401  (part of the idle runtime)

    from edge_runtime.bundle import load_bundle
    from edge_runtime.engine import Engine
    b = load_bundle(bundle)
    x = np.load(images)
    gc.collect()
    idle = rss_mb()
    # onnxruntime's one-time start-up (environment, kernel registry, library pages) happens
    # with the first session of the process, whichever model it is: open and drop the
    # smallest model once, and measure again from there.
    entries = [*b.experts.values(), *([b.flat] if b.flat else [])]
    smallest = min(entries, key=lambda e: e.bytes)
    warm = Engine(b, threads=threads)
    warm.session("flat" if smallest is b.flat else smallest.node)
    del warm
    gc.collect()
    idle_warm = rss_mb()
    if mode == "path":
        longest = max((sum(b.experts[b.tree.names[v]].bytes for v in b.tree.path(int(leaf))
                           if b.tree.names[v] in b.experts) for leaf in b.tree.leaves), default=0)
        engine = Engine(b, memory_budget_mb=longest / 2**20, threads=threads)
        engine.predict(x[:1])
        after_one = rss_mb()
        run = lambda i: engine.predict(x[i:i + 1])  # noqa: E731
    elif mode == "all":
        engine = Engine(b, threads=threads)
        engine.preload()
        engine.predict(x[:1])
        after_one = rss_mb()
        run = lambda i: engine.predict(x[i:i + 1])  # noqa: E731
    elif mode == "flat":
        engine = Engine(b, threads=threads)
        engine.flat_nodes(x[:1])
        after_one = rss_mb()
        run = lambda i: engine.flat_nodes(x[i:i + 1])  # noqa: E731
    else:
        raise SystemExit(f"unknown mode {mode!r}; expected path, all or flat")
    loaded_after_one = list(engine.loaded)
    times = []
    for i in range(len(x)):
        t = time.perf_counter()
        run(i)
        times.append((time.perf_counter() - t) * 1000)
    out = {"mode": mode, "idle_mb": idle, "resident_mb": after_one, "added_mb": after_one - idle,
           "idle_warm_mb": idle_warm, "added_mb_warm": after_one - idle_warm,
           "resident_mb_end": rss_mb(), "loaded_after_one": loaded_after_one,
           "latency_ms_median": float(np.median(times)), "latency_ms_p95": float(np.percentile(times, 95)),
           "images": int(len(x)), "cache_misses": engine.stats.misses, "torch_loaded": "torch" in sys.modules}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 5:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    sys.exit(main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])))
