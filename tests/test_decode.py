"""Numpy decoders: greedy / beam / threshold for HMoE, leaf / majority rules for flat."""

import itertools

import numpy as np
import pytest

from hierarchy import (
    Hierarchy,
    beam,
    decode,
    greedy,
    leaf_rule,
    majority_rule,
    node_probs,
    threshold,
)
from hierarchy.decode import DecodeError, parse_decoder

#   root
#   |-- A
#   |   |-- a1
#   |   |-- a2
#   |   `-- a3
#   `-- B
#       `-- C          (single-child chain: B and C have no expert)
#           |-- c1
#           `-- c2
TREE = Hierarchy.from_edges([("root", "A"), ("root", "B"), ("A", "a1"), ("A", "a2"), ("A", "a3"),
                             ("B", "C"), ("C", "c1"), ("C", "c2")])


def table_experts(table: dict[str, np.ndarray], calls: list | None = None):
    """An expert_fn over fixed per-input probability rows, recording each call."""
    def fn(expert: int, idx: np.ndarray) -> np.ndarray:
        if calls is not None:
            calls.append((TREE.names[expert], idx.tolist()))
        return table[TREE.names[expert]][idx]
    return fn


def brute_force_best_leaf(table, i):
    best, best_p = None, -1.0
    for leaf in TREE.leaves:
        p = 1.0
        for parent, child in zip(TREE.path(int(leaf))[:-1], TREE.path(int(leaf))[1:]):
            if TREE.num_children[parent] >= 2:
                p *= table[TREE.names[parent]][i][TREE.child_position[child]]
        if p > best_p:
            best, best_p = int(leaf), p
    return best, best_p


# input 0: greedy goes A (0.6) -> best a is 0.4 -> p 0.24; c1 under B (0.4) * 0.9 = 0.36 wins beam.
TABLE = {
    "root": np.array([[0.6, 0.4], [0.9, 0.1], [0.2, 0.8]]),
    "A": np.array([[0.4, 0.3, 0.3], [0.1, 0.1, 0.8], [0.5, 0.25, 0.25]]),
    "C": np.array([[0.9, 0.1], [0.5, 0.5], [0.3, 0.7]]),
}


def test_greedy_calls_only_experts_on_the_path():
    calls = []
    d = greedy(TREE, table_experts(TABLE, calls), 3)
    assert [TREE.names[v] for v in d.nodes] == ["a1", "a3", "c2"]
    assert sorted(calls) == [("A", [0, 1]), ("C", [2]), ("root", [0, 1, 2])]
    np.testing.assert_allclose(d.prob, [0.24, 0.72, 0.56])
    assert d.experts_evaluated.tolist() == [2, 2, 2]
    assert [TREE.names[v] for v in d.paths[2]] == ["root", "B", "C", "c2"]
    assert d.step_probs[2] == pytest.approx([1.0, 0.8, 1.0, 0.7])


def test_beam_finds_better_leaf_and_matches_brute_force():
    d = beam(TREE, table_experts(TABLE), 3, k=2)
    for i in range(3):
        leaf, p = brute_force_best_leaf(TABLE, i)
        assert d.nodes[i] == leaf and d.prob[i] == pytest.approx(p)
    assert TREE.names[d.nodes[0]] == "c1"
    assert d.experts_evaluated.tolist() == [3, 3, 3]
    assert [TREE.names[v] for v in d.paths[0]] == ["root", "B", "C", "c1"]


def test_beam_width_one_is_greedy():
    a = beam(TREE, table_experts(TABLE), 3, k=1)
    b = greedy(TREE, table_experts(TABLE), 3)
    assert a.nodes.tolist() == b.nodes.tolist()
    np.testing.assert_allclose(a.prob, b.prob)


@pytest.mark.parametrize("seed", range(10))
def test_wide_beam_is_exhaustive(seed):
    rng = np.random.default_rng(seed)
    n = 20
    table = {k: rng.dirichlet(np.ones(v.shape[1]), size=n) for k, v in TABLE.items()}
    d = beam(TREE, table_experts(table), n, k=10)
    for i in range(n):
        leaf, p = brute_force_best_leaf(table, i)
        assert d.prob[i] == pytest.approx(p)


def test_threshold_stops_early_and_skips_experts():
    calls = []
    d = threshold(TREE, table_experts(TABLE, calls), 3, t=0.5)
    # input 0: root->A has 0.6 >= .5, then a1 0.24 < .5: stop at A.
    # input 1: A 0.9 then a3 0.72: leaf. input 2: B 0.8, C 0.8, c2 0.56: leaf.
    assert [TREE.names[v] for v in d.nodes] == ["A", "a3", "c2"]
    d = threshold(TREE, table_experts(TABLE, calls := []), 3, t=0.95)
    assert d.nodes.tolist() == [0, 0, 0] and calls == [("root", [0, 1, 2])]
    assert threshold(TREE, table_experts(TABLE), 3, 0.0).nodes.tolist() == \
        greedy(TREE, table_experts(TABLE), 3).nodes.tolist()


def test_bad_expert_output_is_named():
    bad = dict(TABLE, A=np.ones((3, 2)))
    with pytest.raises(DecodeError, match="expert 'A' returned shape"):
        greedy(TREE, table_experts(bad), 3)
    nan = dict(TABLE, root=np.full((3, 2), np.nan))
    with pytest.raises(DecodeError, match="non-finite"):
        greedy(TREE, table_experts(nan), 3)


def test_flat_rules_worked_example():
    # docs/METRICS.md: leaves a1 .4, a2 .3, a3 .1, b1 .2 -> leaf rule a1, majority rule A
    t = Hierarchy.from_edges([("root", "A"), ("root", "B"), ("A", "a1"), ("A", "a2"), ("A", "a3"), ("B", "b1")])
    probs = np.array([[0.4, 0.3, 0.1, 0.2]])
    p = node_probs(t, probs)
    assert p[0, t.index("A")] == pytest.approx(0.8) and p[0, 0] == pytest.approx(1.0)
    assert t.names[leaf_rule(t, probs)[0]] == "a1"
    assert t.names[majority_rule(t, probs)[0]] == "A"


def test_majority_rule_skips_single_child_nodes():
    # c1 .45 c2 .45 -> C has .9 and B has .9 too; B has one child so C is chosen.
    probs = np.zeros((1, 5))
    probs[0, [3, 4]] = 0.45
    probs[0, 0] = 0.1
    assert TREE.names[majority_rule(TREE, probs)[0]] == "C"


def test_parse_decoder():
    assert parse_decoder("greedy") == ("greedy", 0.0)
    assert parse_decoder("beam:3") == ("beam", 3.0)
    assert parse_decoder("threshold:0.4") == ("threshold", 0.4)
    for bad in ("beam:0", "beam:x", "threshold:2", "fancy"):
        with pytest.raises(ValueError, match="unknown decoder"):
            parse_decoder(bad)
    d = decode(TREE, table_experts(TABLE), 3, "beam:2")
    assert TREE.names[d.nodes[0]] == "c1"


def test_every_leaf_reachable():
    # one-hot tables steer greedy to each leaf in turn
    for leaf in TREE.leaves:
        table = {k: np.zeros((1, v.shape[1])) for k, v in TABLE.items()}
        path = TREE.path(int(leaf))
        for parent, child in itertools.pairwise(path):
            if TREE.num_children[parent] >= 2:
                table[TREE.names[parent]][0, TREE.child_position[child]] = 1.0
        for k, v in table.items():
            if v.sum() == 0:
                v[0, 0] = 1.0
        assert greedy(TREE, table_experts(table), 1).nodes[0] == leaf
