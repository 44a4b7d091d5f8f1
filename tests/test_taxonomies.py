"""Shipped taxonomies: Fashion-MNIST, CIFAR-100, Tiny ImageNet (WordNet), csv:PATH."""

import csv
from pathlib import Path

import numpy as np
import pytest

from hierarchy import Hierarchy, HierarchyError, load_taxonomy
from hierarchy.taxonomies import FASHION_MNIST_LABELS, tiny_imagenet_wnids

DATA = Path(__file__).parent / "data"


def test_fashion_mnist():
    t = load_taxonomy("fashion-mnist")
    assert len(t.experts) == 5
    assert [t.names[i] for i in t.leaves] == FASHION_MNIST_LABELS
    assert sorted(t.names[e] for e in t.experts) == ["Clothes", "Goods", "Shoes", "Tops", "root"]


def test_cifar100():
    t = load_taxonomy("cifar100")
    assert len(t.experts) == 21 and t.num_leaves == 100
    leaves = [t.names[i] for i in t.leaves]
    assert leaves == sorted(leaves) and leaves[:3] == ["apple", "aquarium_fish", "baby"]
    assert all(t.num_children[e] in (5, 20) for e in t.experts)


def test_tiny_imagenet_shape():
    t = load_taxonomy("tiny-imagenet")
    assert t.num_leaves == 200
    assert [t.names[i] for i in t.leaves] == tiny_imagenet_wnids()
    internal = np.flatnonzero(t.num_children > 0)
    assert (t.num_children[internal] >= 2).all(), "single-child chains must be collapsed"
    for leaf in t.leaves:
        assert t.path(int(leaf))[0] == 0


def _lca_names(t: Hierarchy) -> np.ndarray:
    i, j = np.triu_indices(t.num_leaves, 1)
    return np.array(t.names)[t.lca(t.leaves[i], t.leaves[j])]


def test_tiny_imagenet_against_published_tree(capsys):
    ours = load_taxonomy("tiny-imagenet")
    ref = Hierarchy.from_csv(DATA / "tiny-imagenet-200_fiveai_tree.csv", leaf_names=tiny_imagenet_wnids())
    same = _lca_names(ours) == _lca_names(ref)
    with capsys.disabled():
        print(f"\ntiny-imagenet: {same.sum()} of {same.size} leaf pairs ({same.mean():.1%}) share the "
              f"same LCA in our WordNet tree and the published fiveai tree")
    assert same.mean() > 0.95


def test_tiny_imagenet_rebuild_from_wordnet():
    pytest.importorskip("nltk")
    from hierarchy.wordnet import WordNetUnavailable, build_tiny_imagenet
    try:
        rebuilt = build_tiny_imagenet(tiny_imagenet_wnids())
    except WordNetUnavailable as exc:
        pytest.skip(str(exc))
    shipped = load_taxonomy("tiny-imagenet")
    assert rebuilt.names == shipped.names and rebuilt.parents.tolist() == shipped.parents.tolist()


def test_wordnet_missing_says_how_to_get_it(tmp_path, monkeypatch):
    from hierarchy.wordnet import WordNetUnavailable, prepare_nltk_data
    with pytest.raises(WordNetUnavailable, match="apt-get install wordnet-base"):
        prepare_nltk_data(tmp_path)


def test_csv_taxonomy(tmp_path):
    p = tmp_path / "tree.csv"
    with p.open("w", newline="") as f:
        csv.writer(f).writerows([("parent", "child"), ("r", "x"), ("r", "y"), ("x", "x1"), ("x", "x2")])
    t = load_taxonomy(f"csv:{p}")
    assert [t.names[i] for i in t.leaves] == ["y", "x1", "x2"]


def test_unknown_taxonomy():
    with pytest.raises(HierarchyError, match="unknown taxonomy 'nope'"):
        load_taxonomy("nope")
