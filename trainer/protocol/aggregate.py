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


CHANGE_WINDOW = 20   # accepted changes of a task the bound remembers


def lower_median(values) -> float:
    """The median; of an even count, the lower middle value (of two, the smaller: the larger
    of two, one of them an attacker's, is no reference)."""
    ordered = sorted(values)
    return float(ordered[(len(ordered) - 1) // 2])


def change_reference(history: list[float], norms: list[float], base: Weights) -> tuple[float, str]:
    """What a task's typical change is, and where that figure came from. With three or more
    remembered changes (accepted in earlier rounds): their median, which this round cannot
    move. Else with three or more together with this round's: the median of them all. Else
    (a task's first round with one or two results): the norm of the weights the round
    started from; an honest first change measured up to 2.2 times that on Fashion-MNIST, a
    poisoned one (weights of 1e4) thousands of times."""
    if len(history) >= 3:
        return lower_median(history[-CHANGE_WINDOW:]), "the median of its last accepted changes"
    if len(history) + len(norms) >= 3:
        return lower_median(list(history) + list(norms)), "the median of its changes so far and this round's"
    norm = float(np.sqrt(sum(np.sum(v.astype(np.float64) ** 2) for v in base.values())))
    return norm, "the norm of its weights (its first round, under three results)"


REJECT_FACTOR = 100.0   # a change this many times the task's typical one is no update at all


def bound_results(results: list[tuple[Weights, int]], base: Weights, factor: float, history: list[float] = ()
                  ) -> tuple[dict[int, tuple[Weights, int]], dict[int, str], list[float]]:
    """Bound each result's influence whatever the round's size, against the task's typical
    change (``change_reference``: its own history, not only this round): a change over
    ``factor`` x it is scaled down to that; one over ``REJECT_FACTOR`` x it (or not finite)
    is left out. Honest changes of one round were seen up to 20 times apart under label skew
    (a client with more samples takes more steps), so only the far end is refused; weights
    of 1e4 are 1e5 times and more. ``cap_samples`` bounds what a kept result's sample count
    weighs. Returns the kept results by index (scaled where needed), the reason for each
    one left out, and the kept changes' norms after scaling (the history the task's next
    bounds read). ``factor`` 0 keeps everything as it came."""
    if factor <= 0:
        return dict(enumerate(results)), {}, []
    norms = [delta_norm(w, base) for w, _ in results]
    reference, source = change_reference(list(history), [n for n in norms if np.isfinite(n)], base)
    most = factor * reference
    kept, rejected, kept_norms = {}, {}, []
    for i, ((weights, n), norm) in enumerate(zip(results, norms)):
        if not np.isfinite(norm) or norm > REJECT_FACTOR * reference:
            rejected[i] = (f"change of norm {norm:.4g} is over {REJECT_FACTOR:g} x the expert's typical change "
                           f"({source}, {reference:.4g})")
            continue
        if norm > most:
            scale = most / norm
            weights = {k: (base[k] + (weights[k].astype(np.float64) - base[k]) * scale).astype(weights[k].dtype)
                       for k in base}
        kept[i] = (weights, n)
        kept_norms.append(min(norm, most))
    return kept, rejected, kept_norms


def cap_samples(results: list[tuple[Weights, int]], sample_cap: int | None) -> list[tuple[Weights, int]]:
    """Each result's sample count at most ``sample_cap`` (None or 0: as claimed)."""
    if not sample_cap:
        return results
    return [(w, min(n, sample_cap)) for w, n in results]


AGGREGATORS = {"fedavg": fedavg, "median": median, "trimmed-mean": trimmed_mean}

# Server optimizers (Reddi et al., "Adaptive Federated Optimization", ICLR 2021; Hsu et al.,
# FedAvgM, 2019): the round's aggregate is taken as a pseudo-gradient, delta = base - aggregate,
# and the server steps along it with momentum or an adaptive rate. "none" is plain FedAvg.
SERVER_OPTIMIZERS = ("none", "avgm", "adam", "yogi")
ADAPTIVE_BETA2 = 0.99      # FedAdam / FedYogi second-moment decay (Flower's default)
ADAPTIVE_TAU = 1e-3        # their adaptivity floor (Reddi et al.'s recommended range: 1e-3 and below)


def server_step(rule: str, base: Weights, aggregate: Weights, state: dict[str, np.ndarray], lr: float,
                momentum: float) -> tuple[Weights, dict[str, np.ndarray]]:
    """One server optimizer step from ``base`` towards the round's ``aggregate``; ``state``
    holds the rule's moments by name ('m/<array>', 'v/<array>'), empty on a task's first step.
    Returns the new weights and state. With ``rule`` none, the aggregate itself."""
    if rule == "none":
        return aggregate, state
    if rule not in SERVER_OPTIMIZERS:
        raise ValueError(f"unknown server optimizer {rule!r}; expected one of {', '.join(SERVER_OPTIMIZERS)}")
    new, out = {}, {}
    for name, b in base.items():
        b64 = b.astype(np.float64)
        delta = b64 - aggregate[name].astype(np.float64)
        m = state.get(f"m/{name}", np.zeros_like(b64)).astype(np.float64)
        if rule == "avgm":
            m = momentum * m + delta
            step = m
        else:
            m = momentum * m + (1 - momentum) * delta
            v = state.get(f"v/{name}", np.zeros_like(b64)).astype(np.float64)
            sq = delta * delta
            v = ADAPTIVE_BETA2 * v + (1 - ADAPTIVE_BETA2) * sq if rule == "adam" \
                else v - (1 - ADAPTIVE_BETA2) * sq * np.sign(v - sq)
            out[f"v/{name}"] = v.astype(np.float32)
            step = m / (np.sqrt(v) + ADAPTIVE_TAU)
        out[f"m/{name}"] = m.astype(np.float32)
        new[name] = (b64 - lr * step).astype(b.dtype)
    return new, out


def trust_results(results: list[tuple[Weights, int]], base: Weights, reference: Weights
                  ) -> tuple[dict[int, tuple[Weights, float]], dict[int, str], list[float]] | None:
    """FLTrust (Cao et al., NDSS 2021): the server's own update ``reference`` (trained from
    ``base`` on its clean validation samples) is the direction and size a round's change may
    have. Each result's change counts with weight ReLU(cosine with the reference's change),
    scaled down to the reference's norm where longer (FLTrust scales every change to it; a
    shorter honest change is kept as it is here); one pointing away from it (cosine <= 0),
    unchanged, or not finite is left out. Sample counts buy nothing, and nothing is remembered between
    rounds, so no sequence of updates can widen what the next round accepts. Returns the kept
    results by index (each rescaled, with its trust as the weight FedAvg reads), the reason for
    each one left out, and the kept cosines; None when the reference itself is no change."""
    ref = {k: reference[k].astype(np.float64) - base[k] for k in base}
    r0 = float(np.sqrt(sum(np.sum(v ** 2) for v in ref.values())))
    if not np.isfinite(r0) or r0 == 0:
        return None
    kept, rejected, cosines = {}, {}, []
    for i, (weights, _) in enumerate(results):
        delta = {k: weights[k].astype(np.float64) - base[k] for k in base}
        norm = float(np.sqrt(sum(np.sum(v ** 2) for v in delta.values())))
        if not np.isfinite(norm) or norm == 0:
            rejected[i] = "no change" if norm == 0 else "change not finite"
            continue
        cos = float(sum(np.sum(delta[k] * ref[k]) for k in base) / (norm * r0))
        if not cos > 0:
            rejected[i] = f"change against the server's reference update (cosine {cos:.3f} <= 0)"
            continue
        scale = min(1.0, r0 / norm)
        kept[i] = ({k: (base[k] + delta[k] * scale).astype(weights[k].dtype) for k in base}, cos)
        cosines.append(cos)
    return kept, rejected, cosines
