"""Pure aggregation on named numpy arrays (the Flower habit): FedAvg, the robust rules beside
it, and the bounds that keep one client from steering a round."""

from __future__ import annotations

import numpy as np

from trainer.device.config import Weights


def _names(results: list[tuple[Weights, int]], rule: str):
    if not results:
        raise ValueError(f"{rule} needs at least one (weights, num_samples) result")
    names = results[0][0].keys()
    for weights, _ in results[1:]:
        if weights.keys() != names:
            raise ValueError(f"results disagree on tensor names: {sorted(weights.keys() ^ names)[:3]}")
    return names


def fedavg(results: list[tuple[Weights, int]]) -> Weights:
    """Average each named array, weighted by the number of samples behind it."""
    names = _names(results, "fedavg")
    total = sum(n for _, n in results)
    if total <= 0:
        raise ValueError(f"fedavg needs a positive total sample count; got {total}")
    return {name: sum(w[name].astype(np.float64) * (n / total) for w, n in results).astype(results[0][0][name].dtype)
            for name in names}


def median(results: list[tuple[Weights, int]]) -> Weights:
    """Coordinate-wise median, unweighted: sample counts cannot buy influence."""
    names = _names(results, "median")
    return {name: np.median(np.stack([w[name] for w, _ in results]).astype(np.float64), axis=0)
            .astype(results[0][0][name].dtype) for name in names}


def trimmed_mean(results: list[tuple[Weights, int]], trim: float = 0.1) -> Weights:
    """Coordinate-wise mean after dropping the ``trim`` share of largest and of smallest
    values (at least one each when there are three results or more), unweighted."""
    names = _names(results, "trimmed mean")
    if not 0 <= trim < 0.5:
        raise ValueError(f"trim must be in [0, 0.5); got {trim}")
    n = len(results)
    k = max(int(trim * n), 1 if n >= 3 and trim > 0 else 0)
    out = {}
    for name in names:
        stacked = np.sort(np.stack([w[name] for w, _ in results]).astype(np.float64), axis=0)
        out[name] = stacked[k:n - k].mean(axis=0).astype(results[0][0][name].dtype)
    return out


def delta_norm(weights: Weights, base: Weights) -> float:
    """L2 norm of an update's change from the weights it started from, over all its arrays."""
    return float(np.sqrt(sum(np.sum((weights[k].astype(np.float64) - base[k]) ** 2) for k in base)))


def bound_results(results: list[tuple[Weights, int]], base: Weights, factor: float) -> list[tuple[Weights, int]]:
    """Bound each result's influence relative to the round's median (which one client cannot
    move): its change from ``base`` is scaled down to at most ``factor`` x the median change
    norm, and its sample count capped at ``factor`` x the median count. Needs three results
    or more (a median of two is no bound); ``factor`` 0 turns it off."""
    if factor <= 0 or len(results) < 3:
        return results
    norms = [delta_norm(w, base) for w, _ in results]
    max_norm = factor * float(np.median(norms))
    max_samples = max(1, int(factor * float(np.median([n for _, n in results]))))
    out = []
    for (weights, n), norm in zip(results, norms):
        if norm > max_norm:
            scale = max_norm / norm
            weights = {k: (base[k] + (weights[k].astype(np.float64) - base[k]) * scale).astype(weights[k].dtype)
                       for k in base}
        out.append((weights, min(n, max_samples)))
    return out


AGGREGATORS = {"fedavg": fedavg, "median": median, "trimmed-mean": trimmed_mean}
