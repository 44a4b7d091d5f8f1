"""Information precision, recall and F1 (Valmadre 2022), as docs/METRICS.md defines them."""

from __future__ import annotations

import numpy as np

from hierarchy.errors import UsageError
from hierarchy.tree import Hierarchy


def _as_nodes(tree: Hierarchy, arr: np.ndarray) -> np.ndarray:
    """Integer node indices as they are; node names looked up (unknown names raise)."""
    arr = np.asarray(arr)
    if arr.dtype.kind in "USO":
        return tree.indices(arr.ravel().tolist()).reshape(arr.shape)
    return arr


def _check(tree: Hierarchy, gt: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    gt = _as_nodes(tree, gt)
    pred = _as_nodes(tree, pred)
    if gt.shape != pred.shape:
        raise UsageError(f"gt has shape {gt.shape} but pred has {pred.shape}; expected equal shapes")
    for what, arr in (("gt", gt), ("pred", pred)):
        if not np.issubdtype(arr.dtype, np.integer):
            raise TypeError(f"{what} must hold integer node indices; got dtype {arr.dtype}")
        if arr.size and (arr.min() < 0 or arr.max() >= len(tree)):
            bad = int(arr[(arr < 0) | (arr >= len(tree))].flat[0])
            raise UsageError(f"{what} names unknown node {bad}; node indices lie in [0, {len(tree)})")
    return gt.astype(np.int64), pred.astype(np.int64)


def _values(tree: Hierarchy, gt: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, ...]:
    gt, pred = _check(tree, gt, pred)
    pred = np.where(tree.is_ancestor(gt, pred), gt, pred)
    lca = tree.lca(gt, pred)
    info = tree.information
    return info[gt], info[pred], info[lca], lca, pred


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where((num == 0) & (den == 0), 1.0, num / np.where(den == 0, 1.0, den))


def info_precision(tree: Hierarchy, gt: np.ndarray, pred: np.ndarray) -> np.ndarray:
    _, i_pred, i_lca, _, _ = _values(tree, gt, pred)
    return _ratio(i_lca, i_pred)


def info_recall(tree: Hierarchy, gt: np.ndarray, pred: np.ndarray) -> np.ndarray:
    i_gt, _, i_lca, _, _ = _values(tree, gt, pred)
    return _ratio(i_lca, i_gt)


def info_f1(tree: Hierarchy, gt: np.ndarray, pred: np.ndarray) -> np.ndarray:
    p = info_precision(tree, gt, pred)
    r = info_recall(tree, gt, pred)
    with np.errstate(divide="ignore"):
        return np.where((p == 0) | (r == 0), 0.0, 2.0 / (1.0 / np.maximum(p, 1e-300) + 1.0 / np.maximum(r, 1e-300)))


def correct(tree: Hierarchy, gt: np.ndarray, pred: np.ndarray) -> np.ndarray:
    gt, _ = _check(tree, gt, pred)
    _, _, _, lca, pred_t = _values(tree, gt, pred)
    return (lca == gt) | (lca == pred_t)


def exact(tree: Hierarchy, gt: np.ndarray, pred: np.ndarray) -> np.ndarray:
    gt, pred = _check(tree, gt, pred)
    return gt == pred


METRICS = {
    "info_precision": info_precision,
    "info_recall": info_recall,
    "info_f1": info_f1,
    "correct": correct,
    "exact": exact,
}


def summarize(tree: Hierarchy, gt: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """Data-set figures: the mean of each per-example metric."""
    return {name: float(np.mean(fn(tree, gt, pred))) if np.size(gt) else float("nan")
            for name, fn in METRICS.items()}
