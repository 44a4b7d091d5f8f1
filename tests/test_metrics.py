"""Information precision / recall / F1 exactly as docs/METRICS.md defines them."""

import math

import numpy as np
import pytest

from hierarchy import (
    Hierarchy,
    correct,
    exact,
    info_f1,
    info_precision,
    info_recall,
    summarize,
)

#   root
#   |-- A
#   |   |-- a1
#   |   |-- a2
#   |   `-- a3
#   `-- B
#       `-- b1
TREE = Hierarchy.from_edges([("root", "A"), ("root", "B"), ("A", "a1"), ("A", "a2"),
                             ("A", "a3"), ("B", "b1")])

# gt, pred, lca, correct, precision, recall, F1 -- the table of docs/METRICS.md
TABLE = [
    ("a1", "a1", "a1", 1, 1.0000, 1.0000, 1.0000),
    ("a1", "a2", "A", 0, 0.2075, 0.2075, 0.2075),
    ("a1", "A", "A", 1, 1.0000, 0.2075, 0.3437),
    ("a1", "root", "root", 1, 1.0000, 0.0000, 0.0000),
    ("a1", "b1", "root", 0, 0.0000, 0.0000, 0.0000),
    ("a1", "B", "root", 0, 0.0000, 0.0000, 0.0000),
    ("b1", "B", "B", 1, 1.0000, 1.0000, 1.0000),
    ("b1", "root", "root", 1, 1.0000, 0.0000, 0.0000),
    ("A", "a1", "A", 1, 1.0000, 1.0000, 1.0000),
    ("root", "root", "root", 1, 1.0000, 1.0000, 1.0000),
]


def test_information():
    info = TREE.information
    assert info[TREE.index("root")] == 0
    assert info[TREE.index("A")] == pytest.approx(0.4150, abs=1e-4)
    for n in ("B", "a1", "a2", "a3", "b1"):
        assert info[TREE.index(n)] == pytest.approx(2.0)


@pytest.mark.parametrize("gt, pred, lca, corr, p, r, f1", TABLE)
def test_table_row(gt, pred, lca, corr, p, r, f1):
    g, q = TREE.indices([gt]), TREE.indices([pred])
    assert TREE.names[int(TREE.lca(g, np.where(TREE.is_ancestor(g, q), g, q))[0])] == lca
    assert correct(TREE, g, q)[0] == bool(corr)
    assert info_precision(TREE, g, q)[0] == pytest.approx(p, abs=5e-5)
    assert info_recall(TREE, g, q)[0] == pytest.approx(r, abs=5e-5)
    assert info_f1(TREE, g, q)[0] == pytest.approx(f1, abs=5e-5)
    assert exact(TREE, g, q)[0] == (gt == pred)


def test_mean_example_is_mean_not_harmonic_mean():
    pairs = [("a1", "a1"), ("a1", "A"), ("a1", "root"), ("b1", "B"), ("a1", "a2")]
    g = TREE.indices([a for a, _ in pairs])
    q = TREE.indices([b for _, b in pairs])
    s = summarize(TREE, g, q)
    assert s["info_precision"] == pytest.approx(0.8415, abs=5e-5)
    assert s["info_recall"] == pytest.approx(0.4830, abs=5e-5)
    assert s["info_f1"] == pytest.approx(0.5102, abs=5e-5)


def test_names_accepted_and_unknown_name_named():
    assert info_f1(TREE, np.array(["a1"]), np.array(["A"]))[0] == pytest.approx(0.3437, abs=5e-5)
    with pytest.raises(KeyError, match="unknown node 'zz'"):
        info_f1(TREE, np.array(["a1"]), np.array(["zz"]))
    with pytest.raises(ValueError, match="unknown node 9"):
        info_f1(TREE, np.array([0]), np.array([9]))
    with pytest.raises(ValueError, match="shape"):
        info_f1(TREE, np.array([0, 1]), np.array([0]))


# ---------------------------------------------------------- reference check
def reference(parents: list[int], num_leaves_under, gt: int, pred: int) -> tuple[float, float, float, bool]:
    """Plain per-example implementation written straight from docs/METRICS.md."""
    def ancestors(v):
        out = [v]
        while parents[v] >= 0:
            v = parents[v]
            out.append(v)
        return out
    L = num_leaves_under[0]
    info = lambda v: math.log2(L) - math.log2(num_leaves_under[v])  # noqa: E731
    if gt in ancestors(pred):
        pred = gt
    anc_p = set(ancestors(pred))
    lca = next(v for v in ancestors(gt) if v in anc_p)
    def ratio(a, b):
        return 1.0 if a == 0 and b == 0 else a / b
    prec, rec = ratio(info(lca), info(pred)), ratio(info(lca), info(gt))
    f1 = 0.0 if prec == 0 or rec == 0 else 2 / (1 / prec + 1 / rec)
    return prec, rec, f1, lca in (gt, pred)


def random_tree(rng: np.random.Generator) -> Hierarchy:
    n = int(rng.integers(2, 30))
    parents = [-1]
    for i in range(1, n):
        # bias towards recent nodes to get chains, sometimes a root with one child
        parents.append(int(rng.integers(max(0, i - 3), i)) if rng.random() < 0.6 else int(rng.integers(0, i)))
    return Hierarchy(parents, [f"n{i}" for i in range(n)])


@pytest.mark.parametrize("seed", range(40))
def test_against_reference_on_random_trees(seed):
    rng = np.random.default_rng(seed)
    tree = random_tree(rng)
    if seed == 0:  # make sure a root with one child and a single-child chain are covered
        tree = Hierarchy([-1, 0, 1, 2, 2, 4], [f"n{i}" for i in range(6)])
    n = len(tree)
    gt = rng.integers(0, n, 300)
    pred = rng.integers(0, n, 300)
    gt[:100] = tree.leaves[rng.integers(0, tree.num_leaves, 100)]
    ref = np.array([reference(tree.parents.tolist(), tree.num_leaf_descendants.tolist(), int(g), int(p))
                    for g, p in zip(gt, pred)])
    np.testing.assert_allclose(info_precision(tree, gt, pred), ref[:, 0], atol=1e-12)
    np.testing.assert_allclose(info_recall(tree, gt, pred), ref[:, 1], atol=1e-12)
    np.testing.assert_allclose(info_f1(tree, gt, pred), ref[:, 2], atol=1e-12)
    np.testing.assert_array_equal(correct(tree, gt, pred), ref[:, 3].astype(bool))


def test_leaf_predictions_have_precision_equal_recall():
    rng = np.random.default_rng(1)
    t = random_tree(rng)
    g = t.leaves[rng.integers(0, t.num_leaves, 100)]
    q = t.leaves[rng.integers(0, t.num_leaves, 100)]
    np.testing.assert_allclose(info_precision(t, g, q), info_recall(t, g, q))
    np.testing.assert_allclose(info_f1(t, g, q), info_recall(t, g, q))
