"""Growing a taxonomy (issue #14, first part): kept experts carry over byte for byte, a
changed expert answers as before on its old children, new experts start fresh."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from hierarchy import Hierarchy
from hierarchy.taxonomies import FASHION_MNIST_TREE
from trainer.protocol.checkpoint import load_checkpoint, read_metadata
from trainer.device.client import load_numpy, to_numpy
from trainer.grow import plan_extension, starting_weights
from trainer.device.nets import build_net
from trainer.protocol.strategy import make_tasks

BIN = Path(sys.executable).parent


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


# ------------------------------------------------------------------ a whole grown run
HELD_OUT = {**FASHION_MNIST_TREE, "Shoes": ["Sandal", "Sneaker"]}
SMALL = ["--dataset", "synthetic:1,28,28:fashion-mnist:600", "--clients", "4", "--clients-per-round", "2",
         "--expert-width", "4", "--flat-width", "4", "--batch-size", "16", "--cost-clients", "0", "--no-progress"]


def hmoe(*args: str) -> subprocess.CompletedProcess:
    r = subprocess.run([str(BIN / "hmoe"), *args], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.fixture(scope="module")
def grown(tmp_path_factory) -> dict:
    """An old run without Ankle boot, and two runs grown from it onto the full tree: one with
    no rounds (its starting point) and one trained, the new class on half the clients."""
    tmp = tmp_path_factory.mktemp("grow")
    held, full = tmp / "held.json", tmp / "full.json"
    held.write_text(json.dumps(HELD_OUT))
    full.write_text(json.dumps(FASHION_MNIST_TREE))
    old, start, trained = tmp / "old", tmp / "start", tmp / "trained"
    hmoe("train", "--model", "both", "--tree", str(held), "--out", str(old), "--hmoe-rounds", "6",
         "--flat-rounds", "2", *SMALL)
    hmoe("train", "--model", "both", "--extend", str(full), "--from-run", str(old), "--out", str(start),
         "--hmoe-rounds", "0", "--flat-rounds", "0", "--cost-clients", "0", "--no-progress")
    out = hmoe("train", "--model", "both", "--extend", str(full), "--from-run", str(old), "--out", str(trained),
               "--arrival", "0.5", "--hmoe-rounds", "3", "--flat-rounds", "2", "--cost-clients", "0", "--no-progress")
    return {"old": old, "start": start, "trained": trained, "stdout": out.stdout, "held": held, "full": full}


def files(run: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((run / "experts").glob("*.safetensors"))}


def test_a_grown_run_keeps_experts_byte_for_byte_and_trains_only_the_changed_one(grown):
    old, trained = files(grown["old"]), files(grown["trained"])
    stems = {json.loads(read_metadata(grown["trained"] / "experts" / n)["meta"])["node"]: n for n in trained}
    assert set(stems) == {"root", "Clothes", "Goods", "Tops", "Shoes"}
    for key in ("root", "Clothes", "Goods", "Tops"):   # kept, and still so after the grown run trained
        assert trained[stems[key]] == old[stems[key]]
    assert trained[stems["Shoes"]] != old[stems["Shoes"]]
    report = json.loads((grown["trained"] / "report.json").read_text())
    ext = report["extension"]
    assert ext["kept"] == ["root", "Clothes", "Goods", "Tops"] and ext["new"] == []
    assert ext["changed"] == {"Shoes": {"added": ["Ankle boot"], "removed": []}} and ext["added_leaves"] == ["Ankle boot"]
    assert report["hmoe"]["rounds_per_task"] == {"root": 0, "Clothes": 0, "Goods": 0, "Tops": 0, "Shoes": 3}
    assert ext["spent"]["hmoe"]["rounds"] == 3 and ext["spent"]["hmoe"]["total_client_gmacs"] > 0
    assert ext["from_run_spent"]["hmoe"]["rounds"] == 6
    assert "kept (bit for bit): root, Clothes, Goods, Tops" in grown["stdout"]
    # the flat model grew a row and fine-tuned everything
    assert report["flat"]["rounds"] == 2 and report["extension"]["spent"]["flat"]["total_client_gmacs"] > 0


def test_a_grown_run_starts_from_the_old_experts(grown):
    """Before any new round: the changed expert answers as the old one on its old children,
    and the flat model's old rows are the old model's."""
    x = torch.randn(8, 1, 28, 28)
    for name, kids_old, kids_new in (("Shoes", ["Sandal", "Sneaker"], ["Sandal", "Sneaker", "Ankle boot"]),):
        old_w, net_old, _ = load_checkpoint(next((grown["old"] / "experts").glob(f"*-{name}.safetensors")))
        new_w, net_new, meta = load_checkpoint(next((grown["start"] / "experts").glob(f"*-{name}.safetensors")))
        a = logits_of(net_old, old_w, x)
        b = logits_of(net_new, new_w, x)
        for i, child in enumerate(kids_old):
            np.testing.assert_array_equal(b[:, kids_new.index(child)], a[:, i])
        assert meta["round"] is None and "grown_from" in meta
    old_leaves = Hierarchy.from_json(grown["old"] / "hierarchy.json")
    new_leaves = Hierarchy.from_json(grown["start"] / "hierarchy.json")
    names = lambda t: [t.names[v] for v in t.leaf_order]   # noqa: E731
    fw, fnet, _ = load_checkpoint(grown["old"] / "flat.safetensors")
    gw, gnet, _ = load_checkpoint(grown["start"] / "flat.safetensors")
    a, b = logits_of(fnet, fw, x), logits_of(gnet, gw, x)
    assert b.shape[1] == a.shape[1] + 1
    for i, leaf in enumerate(names(old_leaves)):
        np.testing.assert_array_equal(b[:, names(new_leaves).index(leaf)], a[:, i])


def logits_of(net_cfg, weights, x):
    net = build_net(net_cfg)
    load_numpy(net, weights)
    net.eval()
    with torch.no_grad():
        return net(x).numpy()


def test_held_out_classes_are_left_out_and_arrive_on_a_share_of_the_clients(grown):
    from trainer.protocol.run import load_run_config
    from trainer.prepare import prepare
    old_cfg, new_cfg = load_run_config(grown["old"]), load_run_config(grown["trained"])
    old, new = prepare(old_cfg), prepare(new_cfg)
    assert "Ankle boot" not in old.data.tree.names and old.data.tree.num_leaves == 9
    boot = [new.data.tree.names[v] for v in new.data.tree.leaf_order].index("Ankle boot")
    holders = [c for c, p in enumerate(new.parts) if (new.data.train_y[p] == boot).any()]
    assert len(holders) == 2                                 # half of 4 clients
    assert sum((new.data.train_y[p] == boot).sum() for p in new.parts) == \
        (new.data.train_y == boot).sum() - np.isin(new.val_idx, np.flatnonzero(new.data.train_y == boot)).sum()
    # every client keeps the same samples of the other classes as in the old run
    for p_old, p_new in zip(old.parts, new.parts):
        kept = p_new[new.data.train_y[p_new] != boot]
        np.testing.assert_array_equal(old.data.train_x[p_old], new.data.train_x[kept])


def test_growing_refuses_what_it_cannot_do(grown, tmp_path):
    def fails(*args) -> str:
        r = subprocess.run([str(BIN / "hmoe"), "train", *args, "--cost-clients", "0", "--no-progress"],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
        return r.stderr
    assert "nothing to train" in fails("--model", "hmoe", "--extend", str(grown["held"]), "--from-run",
                                       str(grown["old"]), "--out", str(tmp_path / "a"))
    assert "not a run directory" in fails("--extend", str(grown["full"]), "--from-run", str(tmp_path / "none"),
                                          "--out", str(tmp_path / "b"))
    assert "needs --from-run" in fails("--extend", str(grown["full"]), "--out", str(tmp_path / "c"))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**FASHION_MNIST_TREE, "Shoes": ["Sandal", "Sneaker", "Ankle boot", "Slipper"]}))
    assert "'Slipper'" in fails("--extend", str(bad), "--from-run", str(grown["old"]), "--out", str(tmp_path / "d"))
    assert "arrival" in fails("--extend", str(grown["full"]), "--from-run", str(grown["old"]), "--out",
                              str(tmp_path / "e"), "--arrival", "2")
    assert not (tmp_path / "d").exists()


def test_a_grown_coordinator_run_trains_only_the_changed_expert(grown):
    from trainer.transports.coordinator.admission import Secrets
    from trainer.transports.coordinator.service import Coordinator
    coord = Coordinator(grown["start"], grown["start"] / "state.sqlite", Secrets("s"), min_devices=1)
    try:
        assert coord.current()["expert"] == "Shoes"
        assert {coord.strategy.choose_task(r) for r in range(10)} == {"Shoes"}
        assert set(coord.tasks) == {"root", "Clothes", "Goods", "Tops", "Shoes"}   # it serves them all
    finally:
        coord.close()


def test_min_children_excuses_a_client_that_holds_one_child_of_an_expert():
    """A client whose samples under an expert all belong to one child can only teach it to
    answer that child (the new-subtree benchmark's Goods expert fell to 0.49 that way)."""
    from trainer.protocol.strategy import Strategy, usable_samples
    t = tree(FASHION_MNIST_TREE)
    tasks = make_tasks(t, "hmoe", (1, 28, 28), 4)
    names = [t.names[v] for v in t.leaf_order]
    bags_only = np.zeros(len(names), dtype=np.int64)
    bags_only[names.index("Bag")] = 30
    bags_only[names.index("Coat")] = 5
    assert usable_samples(t, tasks["Goods"], bags_only) == 30
    assert usable_samples(t, tasks["Goods"], bags_only, min_children=2) == 0
    assert usable_samples(t, tasks["root"], bags_only, min_children=2) == 35     # Clothes and Goods
    s = Strategy(t, tasks, "round-robin", 0, min_children=2)
    both = bags_only.copy()
    both[names.index("Sandal")] = 7
    assert s.task_samples("Goods", bags_only) == 0 and s.task_samples("Goods", both) == 37
