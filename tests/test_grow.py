"""Growing a taxonomy (issue #14, first part): kept experts carry over byte for byte, a
changed expert answers as before on its old children, new experts start fresh."""

import numpy as np
import torch

from hierarchy import Hierarchy
from hierarchy.taxonomies import FASHION_MNIST_TREE
from trainer.client import load_numpy, to_numpy
from trainer.grow import plan_extension, starting_weights
from trainer.nets import build_net
from trainer.strategy import make_tasks


def tree(edges: dict[str, list[str]]) -> Hierarchy:
    return Hierarchy.from_edges([(p, c) for p, kids in edges.items() for c in kids])


def weights_for(tasks, seed: int) -> dict:
    out = {}
    for i, (key, task) in enumerate(tasks.items()):
        torch.manual_seed(seed * 100 + i)
        out[key] = to_numpy(build_net(task.net))
    return out


def logits(task, weights, x: torch.Tensor) -> np.ndarray:
    net = build_net(task.net)
    load_numpy(net, weights)
    net.eval()
    with torch.no_grad():
        return net(x).numpy()


def test_a_held_out_class_and_a_new_subtree_keep_change_and_add_the_right_experts():
    held_out = {**FASHION_MNIST_TREE, "Shoes": ["Sandal", "Sneaker"]}             # Ankle boot not yet known
    grown = {**FASHION_MNIST_TREE, "Accessories": ["Bag", "Hats"], "Hats": ["Cap", "Beanie"]}   # + Ankle boot, + Hats
    old, new = tree(held_out), tree(grown)
    old_tasks, new_tasks = (make_tasks(t, "hmoe", (1, 28, 28), 4) for t in (old, new))
    plan = plan_extension(old, new, old_tasks, new_tasks)
    assert sorted(plan.kept) == ["Clothes", "Goods", "Tops", "root"]
    assert plan.changed == {"Shoes": {"added": ["Ankle boot"], "removed": []}}
    assert sorted(plan.new) == ["Accessories", "Hats"]       # Accessories had one child: no expert before

    old_w, fresh = weights_for(old_tasks, 1), weights_for(new_tasks, 2)
    start = starting_weights(old, new, plan, old_w, fresh)
    assert set(start) == set(new_tasks)
    for key in plan.kept:   # byte for byte
        assert {n: a.tobytes() for n, a in start[key].items()} == {n: a.tobytes() for n, a in old_w[key].items()}
    for key in plan.new:
        assert all(np.array_equal(start[key][n], fresh[key][n]) for n in fresh[key])

    # the changed expert, before any new training: its old children's logits are the old expert's
    x = torch.randn(16, 1, 28, 28)
    before = logits(old_tasks["Shoes"], old_w["Shoes"], x)
    after = logits(new_tasks["Shoes"], start["Shoes"], x)
    kids_before = [old.names[c] for c in old.children(old.index("Shoes"))]
    kids_after = [new.names[c] for c in new.children(new.index("Shoes"))]
    for i, child in enumerate(kids_before):
        np.testing.assert_array_equal(after[:, kids_after.index(child)], before[:, i])
    assert after.shape[1] == 3 and not np.array_equal(after[:, kids_after.index("Ankle boot")], 0)


def test_an_expert_whose_network_changes_starts_fresh():
    t = tree(FASHION_MNIST_TREE)
    narrow, wide = make_tasks(t, "hmoe", (1, 28, 28), 4), make_tasks(t, "hmoe", (1, 28, 28), 4, widths={"Tops": 8})
    plan = plan_extension(t, t, narrow, wide)
    assert plan.new == ["Tops"] and "Tops" not in plan.kept and not plan.changed
