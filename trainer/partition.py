"""Splitting a data set's samples across clients: IID, Dirichlet(alpha) over labels, or shards
of two labels per client."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from hierarchy.errors import UsageError


def iid(labels: np.ndarray, num_clients: int, seed: int, alpha: float = 0.0) -> list[np.ndarray]:
    """Shuffle and deal out equal shares."""
    rng = np.random.default_rng([seed, 1])
    return [np.sort(part) for part in np.array_split(rng.permutation(len(labels)), num_clients)]


def dirichlet(labels: np.ndarray, num_clients: int, seed: int, alpha: float = 0.5) -> list[np.ndarray]:
    """For every label, split its samples across clients in Dirichlet(alpha) proportions
    (small alpha: each client sees few labels). Every client gets at least one sample."""
    if alpha <= 0:
        raise UsageError(f"Dirichlet alpha must be > 0; got {alpha}")
    if num_clients > len(labels):
        raise UsageError(f"{num_clients} clients for {len(labels)} samples; expected at most one client per sample")
    rng = np.random.default_rng([seed, 2])
    parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for label in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == label))
        share = rng.dirichlet(np.full(num_clients, alpha))
        cuts = (np.cumsum(share)[:-1] * len(idx)).astype(int)
        for client, chunk in enumerate(np.split(idx, cuts)):
            parts[client].append(chunk)
    out = [np.sort(np.concatenate(p)) for p in parts]
    # Move one sample to every empty client from the largest, so nobody has nothing at all.
    for client in range(num_clients):
        if len(out[client]) == 0:
            big = int(np.argmax([len(p) for p in out]))
            out[client], out[big] = out[big][-1:], out[big][:-1]
    return out


def shards(labels: np.ndarray, num_clients: int, seed: int, alpha: float = 0.0) -> list[np.ndarray]:
    """McMahan et al. (2017)'s pathological non-IID split: sort by label, cut into two shards
    per client, and give every client two shards of two different labels (so every client
    holds exactly two labels, where the data set has two or more)."""
    labels = np.asarray(labels)
    if num_clients * 2 > len(labels):
        raise UsageError(f"{num_clients} clients need {2 * num_clients} shards; the data set has {len(labels)} samples")
    rng = np.random.default_rng([seed, 3])
    order = np.argsort(labels, kind="stable")
    cut = np.array_split(order, 2 * num_clients)
    shard_label = np.array([np.bincount(labels[c]).argmax() for c in cut])
    for _ in range(1000):   # a seeded shuffle of the shards until no client gets one label twice
        perm = rng.permutation(2 * num_clients)
        pairs = perm.reshape(num_clients, 2)
        if len(np.unique(labels)) < 2 or (shard_label[pairs[:, 0]] != shard_label[pairs[:, 1]]).all():
            break
    else:
        # Pair shards greedily across labels: the k-th with the (k + n)-th in label order.
        pairs = np.stack([np.arange(num_clients), np.arange(num_clients) + num_clients], axis=1)
    return [np.sort(np.concatenate([cut[a], cut[b]])) for a, b in pairs]


PARTITIONS: dict[str, Callable[..., list[np.ndarray]]] = {"iid": iid, "dirichlet": dirichlet, "shards": shards}


def partition(name: str, labels: np.ndarray, num_clients: int, seed: int, alpha: float = 0.5) -> list[np.ndarray]:
    try:
        fn = PARTITIONS[name]
    except KeyError:
        raise UsageError(f"unknown partition {name!r}; expected one of {', '.join(PARTITIONS)}") from None
    if num_clients < 1:
        raise UsageError(f"need at least one client; got {num_clients}")
    return fn(np.asarray(labels), num_clients, seed, alpha)
