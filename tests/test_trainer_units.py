"""Pure pieces of the trainer: FedAvg, partitions, schedules, networks, checkpoints."""

import numpy as np
import pytest

from hierarchy import load_taxonomy
from trainer.protocol.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from trainer.protocol.aggregate import fedavg
from trainer.device.nets import NetConfig, analytic_bytes, build_net, num_params
from trainer.partition import partition
from trainer.protocol.schedules import ScheduleContext, get_schedule
from trainer.protocol.driver import ClientSampler
from trainer.protocol.strategy import Strategy, make_tasks


def test_fedavg_hand_made():
    a = {"w": np.array([1.0, 2.0], dtype=np.float32), "b": np.array([[0.0]], dtype=np.float32)}
    b = {"w": np.array([3.0, 6.0], dtype=np.float32), "b": np.array([[4.0]], dtype=np.float32)}
    out = fedavg([(a, 1), (b, 3)])
    np.testing.assert_allclose(out["w"], [2.5, 5.0])
    np.testing.assert_allclose(out["b"], [[3.0]])
    assert out["w"].dtype == np.float32
    np.testing.assert_allclose(fedavg([(a, 5)])["w"], a["w"])
    with pytest.raises(ValueError, match="at least one"):
        fedavg([])
    with pytest.raises(ValueError, match="disagree on tensor names"):
        fedavg([(a, 1), ({"w": a["w"]}, 1)])
    with pytest.raises(ValueError, match="positive total"):
        fedavg([(a, 0)])


def test_partitions_cover_every_sample_once_and_are_seeded():
    labels = np.random.default_rng(0).integers(0, 10, 2000)
    for name in ("iid", "dirichlet"):
        parts = partition(name, labels, 20, seed=3, alpha=0.3)
        allidx = np.concatenate(parts)
        assert sorted(allidx.tolist()) == list(range(2000)) and all(len(p) for p in parts)
        again = partition(name, labels, 20, seed=3, alpha=0.3)
        assert all((p == q).all() for p, q in zip(parts, again))
    iid_parts = partition("iid", labels, 20, 3)
    dir_parts = partition("dirichlet", labels, 20, 3, alpha=0.1)
    def label_entropy(p):
        c = np.bincount(labels[p], minlength=10) / len(p)
        return -(c[c > 0] * np.log(c[c > 0])).sum()
    assert np.mean([label_entropy(p) for p in dir_parts]) < np.mean([label_entropy(p) for p in iid_parts]) - 0.5
    with pytest.raises(ValueError, match="unknown partition"):
        partition("zipf", labels, 3, 0)


def test_schedules():
    ctx = ScheduleContext(["root", "a", "b"], {"root": 1.0, "a": 0.5, "b": 0.5}, {"root": 0.01, "a": 0.3, "b": 0.1})
    assert [get_schedule("round-robin")(r, ctx) for r in range(4)] == ["root", "a", "b", "root"]
    counts = [get_schedule("proportional")(r, ctx) for r in range(40)]
    assert counts.count("root") == 20 and counts.count("a") == 10 and counts.count("b") == 10
    assert get_schedule("worst-validation")(0, ctx) == "a"
    with pytest.raises(ValueError, match="unknown schedule"):
        get_schedule("random")


def test_strategy_is_deterministic_and_drops_clients():
    tree = load_taxonomy("fashion-mnist")
    tasks = make_tasks(tree, "hmoe", (1, 28, 28), 4)
    s = Strategy(tree, tasks, "round-robin", seed=1)
    sim = ClientSampler(seed=1, num_clients=10, per_round=4, dropout=0.5)
    assert sim.sample(3) == sim.sample(3) and len(sim.sample(3)) == 4
    drops = [sim.drops_out(r, c) for r in range(50) for c in range(10)]
    assert 0.3 < np.mean(drops) < 0.7
    labels = np.arange(10)
    idx, target = s.client_data("Shoes", labels, np.arange(10))
    assert idx.tolist() == [5, 7, 9] and target.tolist() == [0, 1, 2]


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32), (3, 64, 64)])
def test_net_adapts_to_input_shape(shape):
    import torch
    cfg = NetConfig(shape, 7, width=8).resolved()
    net = build_net(cfg)
    assert net(torch.zeros(2, *shape)).shape == (2, 7)
    a = analytic_bytes(cfg, 32)
    assert a["params"] == num_params(net) * 4 and a["activations"] > 0


def test_wider_net_costs_more():
    small = analytic_bytes(NetConfig((1, 28, 28), 10, 16), 32)["total"]
    big = analytic_bytes(NetConfig((1, 28, 28), 10, 32), 32)["total"]
    assert big > 1.8 * small


def test_checkpoint_round_trip_and_corruption(tmp_path):
    from trainer.device.client import to_numpy
    cfg = NetConfig((1, 28, 28), 3, 4).resolved()
    w = to_numpy(build_net(cfg))
    path = tmp_path / "e.safetensors"
    save_checkpoint(path, w, cfg, {"node": "Tops", "round": 4})
    w2, cfg2, meta = load_checkpoint(path)
    assert cfg2 == cfg and meta == {"node": "Tops", "round": 4}
    assert all(np.array_equal(w[k], w2[k]) for k in w)
    data = bytearray(path.read_bytes())
    (tmp_path / "trunc.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="trunc.safetensors"):
        load_checkpoint(tmp_path / "trunc.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="junk.safetensors"):
        load_checkpoint(tmp_path / "junk.safetensors")
    other = NetConfig((1, 28, 28), 5, 4).resolved()
    save_checkpoint(tmp_path / "mismatch.safetensors", w, other)
    with pytest.raises(CheckpointError, match="do not match the stored config"):
        load_checkpoint(tmp_path / "mismatch.safetensors")
    with pytest.raises(CheckpointError, match="missing"):
        load_checkpoint(tmp_path / "nope.safetensors")


def tiny_problem(n: int):
    """A 3-way problem on random 28x28 images: network config, images, targets, initial weights, normaliser."""
    from trainer.device.client import Normalizer, to_numpy
    cfg = NetConfig((1, 28, 28), 3, 4).resolved()
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (n, 1, 28, 28), dtype=np.uint8)
    return cfg, x, rng.integers(0, 3, n), to_numpy(build_net(cfg)), Normalizer((0.5,), (0.25,))


def test_micro_batches_give_the_same_update():
    from trainer.device.client import LocalConfig, local_update
    cfg, x, y, w0, norm = tiny_problem(64)
    full, _ = local_update(cfg, w0, x, y, LocalConfig(batch_size=32), norm, seed=1)
    micro, _ = local_update(cfg, w0, x, y, LocalConfig(batch_size=32), norm, seed=1, micro_batch=8)
    for k in full:
        np.testing.assert_allclose(full[k], micro[k], atol=1e-5)


def test_clip_norm_bounds_each_step():
    from trainer.device.client import LocalConfig, local_update
    cfg, x, y, w0, norm = tiny_problem(32)

    def step_norm(clip: float) -> float:   # one batch, plain SGD: the step is lr * (clipped) gradient
        w1, _ = local_update(cfg, w0, x, y, LocalConfig(batch_size=32, lr=1.0, momentum=0.0, clip_norm=clip),
                             norm, seed=1)
        return float(np.sqrt(sum(np.sum((w1[k] - w0[k]) ** 2) for k in w0)))

    free = step_norm(0.0)
    assert free > 0.02
    assert step_norm(0.01) == pytest.approx(0.01, rel=1e-3)
    assert step_norm(10 * free) == pytest.approx(free, rel=1e-5)


def test_expert_widths_by_rule():
    from trainer.protocol.strategy import expert_widths
    tree = load_taxonomy("fashion-mnist")      # root 10 leaves, Clothes 6, Goods 4, Tops 3, Shoes 3
    assert expert_widths(tree, "", 16) == {}
    assert expert_widths(tree, "leaves:4", 16) == {"root": 16, "Clothes": 10, "Goods": 6, "Tops": 5, "Shoes": 5}
    assert expert_widths(tree, "map:Shoes=4,Goods=8", 16) == {"Shoes": 4, "Goods": 8}
    tasks = make_tasks(tree, "hmoe", (1, 28, 28), 16, widths=expert_widths(tree, "leaves:4", 16))
    sizes = {k: analytic_bytes(t.net, 32)["total"] for k, t in tasks.items()}
    assert sizes["Shoes"] < sizes["Goods"] < sizes["Clothes"] < sizes["root"]
    for rule, words in (("map:Hats=4", "'Hats' is not an expert"), ("map:Shoes=0", "positive integer"),
                        ("leaves:x", "leaves:MIN"), ("bytes:3", "unknown expert widths rule")):
        with pytest.raises(ValueError, match=words):
            expert_widths(tree, rule, 16)


def test_a_run_with_expert_widths_trains_exports_and_refuses_a_bad_rule_before_writing(tmp_path):
    from dataclasses import replace

    from exporter.bundle import export_run
    from tests.conftest import CFG
    from trainer.transports.inprocess import Federation
    from trainer.prepare import open_run
    bad = replace(CFG, expert_widths="map:Hats=2")
    with pytest.raises(ValueError, match="Hats"):
        open_run(tmp_path / "bad", bad, resume=False)
    assert not (tmp_path / "bad" / "config.json").exists()
    cfg = replace(CFG, expert_width=8, expert_widths="leaves:2", hmoe_rounds=5)
    cfg, prep = open_run(tmp_path / "run", cfg, resume=False)
    fed = Federation(tmp_path / "run", "hmoe", cfg, prep)
    fed.run(progress=False)
    widths = {k: t.net.width for k, t in fed.tasks.items()}
    assert widths == {"root": 8, "Clothes": 5, "Goods": 3, "Tops": 2, "Shoes": 2}
    result = export_run(tmp_path / "run", tmp_path / "bundle", progress=False, validate_images=50)
    assert {r["model"]: r["params"] for r in result.rows}["Shoes"] < {r["model"]: r["params"] for r in result.rows}["root"]
    # the bundle records each expert's network, and the edge engine serves it like uniform experts
    import numpy as np

    from edge_runtime.bundle import load_bundle
    from edge_runtime.engine import Engine
    bundle = load_bundle(tmp_path / "bundle")
    assert {k: m.net["width"] for k, m in bundle.manifest.models().items() if k != "flat"} == widths
    preds = Engine(tmp_path / "bundle").predict(prep.data.test_x[:8].astype(np.float32))
    assert all(p.leaf and p.path[0] == "root" for p in preds)


def test_the_influence_bound_reads_the_experts_own_history():
    """issue 25: the bound holds at any round size. Cold (no history, under three results):
    against the norm of the base weights; then against the median of the task's accepted
    changes. Over factor x that, a change is scaled down to it; over 100 x, left out."""
    from trainer.protocol.aggregate import bound_results, delta_norm
    base = {"w": np.ones(100, dtype=np.float32)}           # norm 10
    step = {"w": base["w"] + np.float32(0.1)}              # change of norm 1
    huge = {"w": np.full(100, 1e4, dtype=np.float32)}      # the audit's attack
    kept, rejected, norms = bound_results([(step, 10), (huge, 100_000)], base, 3.0)   # two results, no history
    assert list(kept) == [0] and 1 in rejected and "norm of its weights" in rejected[1]
    assert norms == [pytest.approx(1.0, rel=1e-4)]
    kept, rejected, _ = bound_results([(huge, 1)], base, 3.0)   # the attacker alone
    assert not kept and "over 100 x" in rejected[0]
    history = [1.0, 1.0, 1.0]
    big = {"w": base["w"] + np.float32(0.5)}               # change of norm 5: over 3 x the history's 1
    kept, rejected, norms = bound_results([(big, 10)], base, 3.0, history)
    assert not rejected and delta_norm(kept[0][0], base) == pytest.approx(3.0, rel=1e-4)
    assert norms == [pytest.approx(3.0, rel=1e-4)]   # the history keeps the scaled change, not the claim
    kept, rejected, _ = bound_results([(step, 10), (huge, 10)], base, 0.0)   # 0: off
    assert len(kept) == 2 and not rejected


def test_a_claimed_sample_count_buys_at_most_three_typical_clients():
    from trainer.protocol.aggregate import fedavg
    tree = load_taxonomy("fashion-mnist")
    s = Strategy(tree, make_tasks(tree, "hmoe", (1, 28, 28), 4), "round-robin", 0, influence_bound=3.0)
    assert s.sample_cap([100, 120, 0, 100_000]) == 360   # the lower median of what clients hold, times 3
    assert s.sample_cap([100, 100_000]) == 300            # of two, the smaller: one claim cannot raise it
    base = {"w": np.zeros(4, dtype=np.float32)}
    honest, bold = {"w": np.ones(4, dtype=np.float32)}, {"w": -np.ones(4, dtype=np.float32)}
    out = s.combine([(honest, 100), (bold, 100_000)], base, "root", s.sample_cap([100, 100_000]))
    np.testing.assert_allclose(out["w"], fedavg([(honest, 100), (bold, 300)])["w"])


def test_warm_start_trains_the_root_alone_then_starts_each_expert_from_its_parent():
    """--warm-start K (HD-CNN's fine-from-coarse initialisation): rounds before K train only
    the root; at the end of round K-1 every other expert takes its parent's weights in every
    tensor but its own output layer (a grandchild what its parent just took), and the others
    train at --warm-lr times the learning rate."""
    import torch

    from trainer.device.client import to_numpy
    tree = load_taxonomy("fashion-mnist")
    tasks = make_tasks(tree, "hmoe", (1, 28, 28), 4)
    s = Strategy(tree, tasks, "round-robin", seed=1, assignment="spread", min_clients=1, warm_start=3, warm_lr=0.1)
    weights = {}
    for i, (k, t) in enumerate(tasks.items()):
        torch.manual_seed(i)
        weights[k] = to_numpy(build_net(t.net))
    offers = {c: set(tasks) for c in range(6)}
    assert set(s.assign(2, offers).values()) == {"root"}
    assert len(set(s.assign(3, offers).values())) > 1
    assert s.warm_starts(1, weights) == {} and s.warm_starts(3, weights) == {}
    warm = s.warm_starts(2, weights)
    assert set(warm) == set(tasks) - {"root"}
    last = list(weights["root"])[-1].rsplit(".", 1)[0] + "."
    for key, new in warm.items():
        parent = tree.names[int(tree.parents[tasks[key].node])]
        for n, a in new.items():
            want = weights[key][n] if n.startswith(last) else weights["root"][n]   # the chain leads to the root
            np.testing.assert_array_equal(a, want, err_msg=f"{key} {n} (parent {parent})")
    assert "Tops" in warm and tree.names[int(tree.parents[tasks["Tops"].node])] == "Clothes"
    assert s.client_config("root", 5).lr == s.lr(5) and s.client_config("Tops", 5).lr == pytest.approx(0.1 * s.lr(5))


def test_fltrust_weighs_a_change_by_its_direction_and_gives_it_the_references_size():
    """trust_results (Cao et al., NDSS 2021): a reversed change earns nothing whatever its size
    or claimed samples; a change 50 times the server's own is scaled down to it; honest ones
    count by their cosine with the server's change."""
    from trainer.protocol.aggregate import fedavg, trust_results
    rng = np.random.default_rng(0)
    base = {"w": rng.normal(0, 1, (20, 10)).astype(np.float32), "b": np.zeros(10, np.float32)}
    step = {"w": rng.normal(0, 0.01, (20, 10)), "b": rng.normal(0, 0.01, 10)}
    ref = {k: (base[k] + step[k]).astype(np.float32) for k in base}

    def moved(scale, noise=0.0):
        return {k: (base[k] + scale * step[k] + noise * rng.normal(0, 0.01, base[k].shape)).astype(np.float32)
                for k in base}
    honest, reversed_, huge = moved(1.0, 0.5), moved(-2.5), moved(50.0)
    kept, rejected, cosines = trust_results([(honest, 10), (reversed_, 100_000), (huge, 10)], base, ref)
    assert set(kept) == {0, 2} and "against the server's reference" in rejected[1]
    r0 = np.sqrt(sum(np.sum(v ** 2) for v in step.values()))
    for i in kept:
        w, trust = kept[i]
        norm = np.sqrt(sum(np.sum((w[k].astype(np.float64) - base[k]) ** 2) for k in base))
        assert norm <= r0 * (1 + 1e-4) and 0 < trust <= 1 + 1e-9
    huge_norm = np.sqrt(sum(np.sum((kept[2][0][k].astype(np.float64) - base[k]) ** 2) for k in base))
    assert abs(huge_norm - r0) < 1e-4 * r0   # 50 times the reference: scaled down to it
    assert kept[2][1] > kept[0][1]          # the one along the reference counts more
    agg = fedavg(list(kept.values()))       # trust as the weight: within the reference's norm of the base
    assert np.sqrt(sum(np.sum((agg[k].astype(np.float64) - base[k]) ** 2) for k in base)) <= r0 * (1 + 1e-4)
    assert trust_results([(honest, 1)], base, base) is None   # a reference that did not move: no judgement
