"""Pure aggregation on named numpy arrays (the Flower habit)."""

from __future__ import annotations

import numpy as np

Weights = dict[str, np.ndarray]


def fedavg(results: list[tuple[Weights, int]]) -> Weights:
    """Average each named array, weighted by the number of samples behind it."""
    if not results:
        raise ValueError("fedavg needs at least one (weights, num_samples) result")
    total = sum(n for _, n in results)
    if total <= 0:
        raise ValueError(f"fedavg needs a positive total sample count; got {total}")
    names = results[0][0].keys()
    for weights, _ in results[1:]:
        if weights.keys() != names:
            raise ValueError(f"results disagree on tensor names: {sorted(weights.keys() ^ names)[:3]}")
    return {name: sum(w[name].astype(np.float64) * (n / total) for w, n in results).astype(results[0][0][name].dtype)
            for name in names}
