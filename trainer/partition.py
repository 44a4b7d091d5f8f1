"""Splitting a data set's samples across clients: IID or Dirichlet(alpha) over labels."""

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


PARTITIONS: dict[str, Callable[..., list[np.ndarray]]] = {"iid": iid, "dirichlet": dirichlet}


def partition(name: str, labels: np.ndarray, num_clients: int, seed: int, alpha: float = 0.5) -> list[np.ndarray]:
    try:
        fn = PARTITIONS[name]
    except KeyError:
        raise UsageError(f"unknown partition {name!r}; expected one of {', '.join(PARTITIONS)}") from None
    if num_clients < 1:
        raise UsageError(f"need at least one client; got {num_clients}")
    return fn(np.asarray(labels), num_clients, seed, alpha)
