"""The Hierarchy: building, serialising, structure, LCA, LCPN relabelling, bad input."""

import json

import numpy as np
import pytest

from hierarchy import Hierarchy, HierarchyError, load_taxonomy

#   root
#   |-- A
#   |   |-- a1
#   |   |-- a2
#   |   `-- a3
#   `-- B
#       `-- b1
EDGES = [("root", "A"), ("root", "B"), ("A", "a1"), ("A", "a2"), ("A", "a3"), ("B", "b1")]


@pytest.fixture
def tree() -> Hierarchy:
    return Hierarchy.from_edges(EDGES, leaf_names=["b1", "a3", "a2", "a1"])


def test_structure(tree):
    assert tree.names[0] == "root" and tree.parents[0] == -1
    assert all(tree.parents[i] < i for i in range(1, len(tree)))
    assert [tree.names[i] for i in tree.leaves] == ["b1", "a3", "a2", "a1"]
    assert [tree.names[e] for e in tree.experts] == ["root", "A"]
    assert [tree.names[c] for c in tree.children(tree.index("A"))] == ["a1", "a2", "a3"]
    assert [tree.names[v] for v in tree.path(tree.index("a2"))] == ["root", "A", "a2"]
    assert tree.num_leaf_descendants[tree.index("A")] == 3
    assert tree.num_leaf_descendants[0] == 4


def test_lca_matches_walking_up(tree):
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, len(tree), 200), rng.integers(0, len(tree), 200)
    def slow(u, v):
        anc = set(tree.path(u))
        return next(w for w in reversed(tree.path(v)) if w in anc)
    assert tree.lca(a, b).tolist() == [slow(u, v) for u, v in zip(a, b)]


def test_lcpn_relabelling(tree):
    labels = np.array([0, 1, 2, 3, 3])  # b1 a3 a2 a1 a1
    mask, target = tree.lcpn(tree.index("A"), labels)
    assert mask.tolist() == [False, True, True, True, True]
    assert target.tolist() == [2, 1, 0, 0]  # a3 a2 a1 a1 in A's child order
    mask, target = tree.lcpn(0, labels)
    assert mask.all() and target.tolist() == [1, 0, 0, 0, 0]  # B, A, A, A, A
    # B has one child: b1's samples fall under it but B is no expert; the relabelling
    # still gives child 0 for every sample.
    mask, target = tree.lcpn(tree.index("B"), labels)
    assert mask.tolist() == [True, False, False, False, False] and target.tolist() == [0]
    with pytest.raises(ValueError, match="leaf labels"):
        tree.lcpn(0, np.array([4]))


def test_json_round_trip(tree, tmp_path):
    path = tmp_path / "t.json"
    tree.to_json(path)
    back = Hierarchy.from_json(path)
    assert back.names == tree.names
    assert back.parents.tolist() == tree.parents.tolist()
    assert back.leaves.tolist() == tree.leaves.tolist()
    assert json.loads(path.read_text())["experts"] == ["root", "A"]


def test_csv_with_and_without_header(tmp_path):
    p = tmp_path / "t.csv"
    p.write_text("parent,child\n" + "\n".join(f"{a},{b}" for a, b in EDGES) + "\n")
    t1 = Hierarchy.from_csv(p)
    p.write_text("\n".join(f"{a},{b}" for a, b in EDGES) + "\n")
    t2 = Hierarchy.from_csv(p)
    assert t1.names == t2.names and len(t1.experts) == 2


def test_subtree(tree):
    sub = tree.subtree(tree.index("A"))
    assert sub.names[0] == "A" and [sub.names[i] for i in sub.leaves] == ["a3", "a2", "a1"]


@pytest.mark.parametrize("rows, message", [
    ("", "empty file"),
    ("a,b\nb,c\nc,a\n", "cycle"),
    ("r,a\nr,b\nb,a\n", "row 3: node 'a' has two parents"),
    ("r,a\nq,b\n", "several roots"),
    ("r,a\nr,a\n", "row 2: duplicate edge"),
    ("r,a\nr,b\nx,y\ny,x\n", "several roots|cycle"),
    ("r,a,b\n", "row 1: 3 fields"),
    ("r,r\n", "its own parent"),
])
def test_bad_csv(tmp_path, rows, message):
    p = tmp_path / "bad.csv"
    p.write_text(rows)
    with pytest.raises(HierarchyError, match=message):
        Hierarchy.from_csv(p)


def test_bad_json(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text("")
    with pytest.raises(HierarchyError, match="empty file"):
        Hierarchy.from_json(p)
    p.write_text("{not json")
    with pytest.raises(HierarchyError, match="not valid JSON"):
        Hierarchy.from_json(p)
    p.write_text(json.dumps({"names": ["r", "a"], "parents": [-1, 0]}))
    with pytest.raises(HierarchyError, match="missing key 'leaves'"):
        Hierarchy.from_json(p)
    p.write_text(json.dumps({"names": ["r", "a", "b"], "parents": [-1, 2, 0], "leaves": ["a"]}))
    with pytest.raises(HierarchyError, match="before its parent"):
        Hierarchy.from_json(p)
    p.write_text(json.dumps({"names": ["r", "a", "b"], "parents": [-1, 0, -1], "leaves": ["a", "b"]}))
    with pytest.raises(HierarchyError, match="second root"):
        Hierarchy.from_json(p)


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    import hierarchy.tree as mod
    target = tmp_path / "t.json"
    target.write_text("old")

    def disk_full(_fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(mod.os, "fsync", disk_full)  # fails after the temporary file was written
    with pytest.raises(OSError, match="No space left"):
        mod.write_text_atomic(target, "new contents")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.json"]


def test_unknown_node_name(tree):
    with pytest.raises(KeyError, match="unknown node 'zz'"):
        tree.index("zz")


def test_render_marks_experts():
    text = load_taxonomy("fashion-mnist").render()
    assert "root *" in text and "Shoes *" in text and "Bottoms *" not in text


def test_npz_reads_run_one_at_a_time(tmp_path, monkeypatch):
    """numpy parses .npz headers with ast.literal_eval, which CPython 3.11 cannot run in two
    threads at once (python/cpython#106905; it failed CI with four `sync` device threads):
    read_npz never lets two reads overlap, and every thread gets its own file's arrays."""
    import threading
    import time

    import hierarchy.npz as mod
    active, most = [0], [0]
    real_load = mod.np.load

    def watched_load(*a, **k):
        active[0] += 1
        most[0] = max(most[0], active[0])
        time.sleep(0.002)              # a read in progress: another thread would get in here
        z = real_load(*a, **k)
        orig_close, open_ = z.close, [True]

        def close():                   # called by the with-block and again by __del__
            if open_[0]:
                open_[0] = False
                active[0] -= 1
            orig_close()
        z.close = close
        return z

    monkeypatch.setattr(mod.np, "load", watched_load)
    for t in range(8):
        np.savez(tmp_path / f"{t}.npz", images=np.full((2, 3), t, np.uint8), labels=np.arange(t + 1))
    got, errors = {}, []

    def work(t: int) -> None:
        try:
            for _ in range(5):
                got[t] = mod.read_npz(tmp_path / f"{t}.npz", ("images", "labels"))
        except BaseException as exc:
            errors.append(exc)
    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors and most[0] == 1 and active[0] == 0
    for t in range(8):
        assert (got[t]["images"] == t).all() and list(got[t]["labels"]) == list(range(t + 1))
    with pytest.raises(KeyError):
        mod.read_npz(tmp_path / "0.npz", ("nope",))


def test_large_trees_parse_in_linear_time_and_hostile_ones_are_refused_at_once():
    """Issue 37: a manifest's tree was parsed with a names.index per leaf (300,000 leaves: minutes)."""
    import time

    from hierarchy.tree import MAX_NODES
    def star(n):
        return {"names": ["r"] + [f"l{i}" for i in range(n)], "parents": [-1] + [0] * n,
                "leaves": [f"l{i}" for i in range(n)]}
    t = time.perf_counter()
    tree = Hierarchy.from_dict(star(20_000))
    assert tree.num_leaves == 20_000
    assert time.perf_counter() - t < 5   # was 10 s; about 0.04 s now (a generous bound for loaded machines)
    t = time.perf_counter()
    with pytest.raises(HierarchyError, match=f"at most {MAX_NODES}"):
        Hierarchy.from_dict(star(300_000))
    assert time.perf_counter() - t < 1
    with pytest.raises(HierarchyError, match="expected a list"):
        Hierarchy.from_dict({"names": "r", "parents": [-1], "leaves": []})
