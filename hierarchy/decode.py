"""Decoding expert outputs into node predictions (numpy only).

HMoE decoders take ``expert_fn(expert_node, input_indices) -> probs`` of shape
(len(input_indices), num_children(expert)) and call it only for the experts a
decision actually visits, with only the inputs routed there; the same code serves
torch during training and onnxruntime on a device.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from hierarchy.errors import HmoeError, UsageError
from hierarchy.tree import Hierarchy

ExpertFn = Callable[[int, np.ndarray], np.ndarray]


class DecodeError(HmoeError, ValueError):
    """An expert returned probabilities of the wrong shape or non-finite values."""


@dataclass
class Decoded:
    nodes: np.ndarray                 # predicted node per input
    prob: np.ndarray                  # probability of the predicted node (product along its path)
    experts_evaluated: np.ndarray     # number of expert evaluations spent per input
    paths: list[list[int]]            # root-to-prediction node path per input
    step_probs: list[list[float]]     # conditional probability of each step (1.0 for the root)


def _call(tree: Hierarchy, expert_fn: ExpertFn, expert: int, idx: np.ndarray) -> np.ndarray:
    probs = np.asarray(expert_fn(int(expert), idx), dtype=np.float64)
    want = (len(idx), int(tree.num_children[expert]))
    if probs.shape != want:
        raise DecodeError(f"expert {tree.names[expert]!r} returned shape {probs.shape}; expected {want}")
    if not np.all(np.isfinite(probs)):
        raise DecodeError(f"expert {tree.names[expert]!r} returned non-finite probabilities")
    return probs


def _single_child(tree: Hierarchy) -> np.ndarray:
    """Node -> its only child, or -1 where the node has zero or several children."""
    out = np.full(len(tree), -1, dtype=np.int64)
    for v in np.flatnonzero(tree.num_children == 1):
        out[v] = tree.children(int(v))[0]
    return out


def threshold(tree: Hierarchy, expert_fn: ExpertFn, n: int, t: float = 0.0) -> Decoded:
    """Follow the argmax child from the root; stop before a step whose path probability
    would fall below ``t`` (non-mandatory leaf prediction). ``t = 0`` is greedy."""
    only = _single_child(tree)
    cur = np.zeros(n, dtype=np.int64)
    prob = np.ones(n)
    count = np.zeros(n, dtype=np.int64)
    active = np.ones(n, dtype=bool)
    paths = [[0] for _ in range(n)]
    steps = [[1.0] for _ in range(n)]
    while True:
        while True:  # pass straight through nodes with one child
            passing = np.flatnonzero(active & (only[cur] >= 0))
            if not len(passing):
                break
            cur[passing] = only[cur[passing]]
            for i in passing:
                paths[i].append(int(cur[i]))
                steps[i].append(1.0)
        deciding = active & (tree.num_children[cur] >= 2)
        if not deciding.any():
            break
        for e in np.unique(cur[deciding]):
            idx = np.flatnonzero(deciding & (cur == e))
            p = _call(tree, expert_fn, int(e), idx)
            count[idx] += 1
            j = p.argmax(axis=1)
            pj = p[np.arange(len(idx)), j]
            new_prob = prob[idx] * pj
            go = new_prob >= t
            active[idx[~go]] = False
            moved = idx[go]
            cur[moved] = tree.children(int(e))[j[go]]
            prob[moved] = new_prob[go]
            for i, step in zip(moved, pj[go]):
                paths[i].append(int(cur[i]))
                steps[i].append(float(step))
        active &= tree.num_children[cur] > 0
    return Decoded(cur, prob, count, paths, steps)


def greedy(tree: Hierarchy, expert_fn: ExpertFn, n: int) -> Decoded:
    """The source paper's decoding: the argmax child at every level down to a leaf."""
    return threshold(tree, expert_fn, n, 0.0)


def beam(tree: Hierarchy, expert_fn: ExpertFn, n: int, k: int = 2) -> Decoded:
    """Keep the ``k`` most probable partial paths per input at every level; predict
    the most probable leaf. Evaluates at most ``k`` experts per level and input."""
    if k < 1:
        raise UsageError(f"beam width must be >= 1; got {k}")
    only = _single_child(tree)
    # Every partial path is a row of a history table: node, parent row, step prob.
    hist_node: list[int] = []
    hist_parent: list[int] = []
    hist_step: list[float] = []

    def push(nodes: np.ndarray, parents: np.ndarray, step: np.ndarray) -> np.ndarray:
        start = len(hist_node)
        hist_node.extend(int(x) for x in nodes)
        hist_parent.extend(int(x) for x in parents)
        hist_step.extend(float(x) for x in step)
        return np.arange(start, start + len(nodes))

    inp = np.arange(n)
    node = np.zeros(n, dtype=np.int64)
    prob = np.ones(n)
    row = push(node, np.full(n, -1), np.ones(n))
    count = np.zeros(n, dtype=np.int64)
    while True:
        passing = np.flatnonzero(only[node] >= 0)
        while len(passing):
            node[passing] = only[node[passing]]
            row[passing] = push(node[passing], row[passing], np.ones(len(passing)))
            passing = np.flatnonzero(only[node] >= 0)
        deciding = tree.num_children[node] >= 2
        if not deciding.any():
            break
        c_inp, c_node, c_prob, c_parent, c_step = [inp[~deciding]], [node[~deciding]], \
            [prob[~deciding]], [row[~deciding]], [np.full((~deciding).sum(), np.nan)]
        for e in np.unique(node[deciding]):
            sel = np.flatnonzero(deciding & (node == e))
            p = _call(tree, expert_fn, int(e), inp[sel])
            count[inp[sel]] += 1
            kids = tree.children(int(e))
            c_inp.append(np.repeat(inp[sel], len(kids)))
            c_node.append(np.tile(kids, len(sel)))
            c_prob.append((prob[sel, None] * p).ravel())
            c_parent.append(np.repeat(row[sel], len(kids)))
            c_step.append(p.ravel())
        inp, node, prob, parent, step = (np.concatenate(a) for a in (c_inp, c_node, c_prob, c_parent, c_step))
        order = np.lexsort((-prob, inp))
        inp, node, prob, parent, step = inp[order], node[order], prob[order], parent[order], step[order]
        first = np.searchsorted(inp, inp, side="left")
        keep = (np.arange(len(inp)) - first) < k
        inp, node, prob, parent, step = inp[keep], node[keep], prob[keep], parent[keep], step[keep]
        new = ~np.isnan(step)
        row = parent.copy()
        row[new] = push(node[new], parent[new], step[new])
    best = np.lexsort((-prob, inp))
    first = best[np.searchsorted(inp[best], np.arange(n), side="left")]
    paths, steps = [], []
    for r in row[first]:
        p_nodes, p_steps = [], []
        while r >= 0:
            p_nodes.append(hist_node[r])
            p_steps.append(hist_step[r])
            r = hist_parent[r]
        paths.append(p_nodes[::-1])
        steps.append(p_steps[::-1])
    return Decoded(node[first], prob[first], count, paths, steps)


# ------------------------------------------------------------------ flat model
def node_probs(tree: Hierarchy, leaf_probs: np.ndarray) -> np.ndarray:
    """p(v) = sum of the leaf probabilities under v; (n, L) -> (n, num_nodes)."""
    leaf_probs = np.asarray(leaf_probs, dtype=np.float64)
    if leaf_probs.ndim != 2 or leaf_probs.shape[1] != tree.num_leaves:
        raise DecodeError(f"leaf probabilities of shape {leaf_probs.shape}; expected (n, {tree.num_leaves})")
    return leaf_probs @ tree.ancestor_mask[tree.leaf_order].astype(np.float64)


def leaf_rule(tree: Hierarchy, leaf_probs: np.ndarray) -> np.ndarray:
    """argmax over leaves, as node indices."""
    return tree.leaf_order[np.asarray(leaf_probs).argmax(axis=1)]


def majority_rule(tree: Hierarchy, leaf_probs: np.ndarray) -> np.ndarray:
    """Among nodes with p(v) > 0.5 that do not have exactly one child, the one with the
    fewest leaves under it (ties: the deepest)."""
    p = node_probs(tree, leaf_probs)
    ok = (p > 0.5) & (tree.num_children != 1)[None, :]
    depth_span = int(tree.depths.max()) + 1
    score = tree.num_leaf_descendants * depth_span - tree.depths
    score = np.where(ok, score[None, :], np.iinfo(np.int64).max)
    return score.argmin(axis=1)


def parse_decoder(spec: str) -> tuple[str, float]:
    """'greedy' | 'beam:K' | 'threshold:T' -> (name, parameter)."""
    name, _, arg = spec.partition(":")
    if name == "greedy" and not arg:
        return "greedy", 0.0
    try:
        if name == "beam":
            k = int(arg or 2)
            if k >= 1:
                return "beam", float(k)
        elif name == "threshold":
            t = float(arg or 0.5)
            if 0.0 <= t <= 1.0:
                return "threshold", t
    except ValueError:
        pass
    raise UsageError(f"unknown decoder {spec!r}; expected greedy, beam:K (K >= 1) or threshold:T (0 <= T <= 1)")


def decode(tree: Hierarchy, expert_fn: ExpertFn, n: int, spec: str = "greedy") -> Decoded:
    """Dispatch on a decoder spec string."""
    name, arg = parse_decoder(spec)
    if name == "beam":
        return beam(tree, expert_fn, n, int(arg))
    return threshold(tree, expert_fn, n, arg)
