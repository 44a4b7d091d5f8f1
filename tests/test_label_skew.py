"""The label-skew remedies (docs/TRAINING.md, "Label skew"): each one's effect on a small skewed
case, their bounds, and a run that keeps them for life. That every transport applies them
alike is tests/test_round_protocol.py's "label-skew-remedies" case."""

import json
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest

from hierarchy.errors import UsageError
from tests.conftest import CFG
from trainer.device.client import Normalizer, local_update, to_numpy
from trainer.device.config import LocalConfig, NetConfig
from trainer.device.nets import build_net
from trainer.partition import shards
from trainer.protocol.aggregate import fedavg, server_step
from trainer.protocol.run import RunConfig, RunError, merged_config, start_run
from trainer.protocol.strategy import Strategy, make_tasks

NET = NetConfig((1, 8, 8), 3, width=2).resolved()
NORM = Normalizer((0.5,), (0.25,))
PLAIN = {"momentum": 0.0, "logit_adjust": 0.0}   # plain cross entropy (the default adjusts logits)


def one_child_update(**remedy) -> tuple[dict, dict]:
    """A client that holds only output 0's samples, from seeded weights: (before, after)."""
    import torch
    torch.manual_seed(0)
    before = to_numpy(build_net(NET))
    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, (64, 1, 8, 8), dtype=np.uint8)
    y = np.zeros(64, dtype=np.int64)
    after, _ = local_update(NET, before, x, y, LocalConfig(**{**PLAIN, **remedy}), NORM, seed=1)
    return before, after


def row_change(before: dict, after: dict, rows) -> float:
    w = "head.3.weight"
    return float(np.abs(after[w][rows] - before[w][rows]).max())


def test_restricted_softmax_leaves_the_missing_outputs_rows_unchanged():
    plain = one_child_update()
    fedrs = one_child_update(restricted_softmax=0.0)
    half = one_child_update(restricted_softmax=0.5)
    assert row_change(*plain, [1, 2]) > 1e-3, "plain softmax pushes the missing outputs' rows"
    assert row_change(*fedrs, [1, 2]) == 0.0, "factor 0: their logits are constant, their rows untouched"
    assert 0 < row_change(*half, [1, 2]) < row_change(*plain, [1, 2])


def test_logit_adjustment_gives_a_one_child_client_nothing_to_learn():
    """Balanced softmax: a client that holds one output's samples sees that output with
    probability one, so its update changes nothing (no drift towards 'always output 0')."""
    before, after = one_child_update(logit_adjust=1.0)
    assert all(np.array_equal(before[k], after[k]) for k in before)
    before, plain = one_child_update()
    assert plain["head.3.bias"][0] - before["head.3.bias"][0] > 1e-3   # plain: output 0's bias climbs


def test_logit_adjustment_balances_an_imbalanced_client():
    """With two outputs held 90:10, the plain update's bias gap grows towards the majority far
    more than the balanced-softmax one's."""
    import torch
    torch.manual_seed(0)
    before = to_numpy(build_net(NET))
    rng = np.random.default_rng(1)
    x = rng.integers(0, 255, (100, 1, 8, 8), dtype=np.uint8)
    y = np.array([0] * 90 + [1] * 10)
    gaps = {}
    for tau in (0.0, 1.0):
        after, _ = local_update(NET, before, x, y, LocalConfig(**{**PLAIN, "epochs": 3, "logit_adjust": tau}), NORM, 1)
        gaps[tau] = (after["head.3.bias"][0] - after["head.3.bias"][1]) - (before["head.3.bias"][0]
                                                                            - before["head.3.bias"][1])
    assert gaps[0.0] > 0.02 and abs(gaps[1.0]) < gaps[0.0] / 3


def test_proximal_term_keeps_the_update_near_the_rounds_weights():
    def dist(a, b):
        return float(np.sqrt(sum(((a[k] - b[k]) ** 2).sum() for k in a)))
    b0, plain = one_child_update(epochs=5)   # plain cross entropy, no proximal term
    b1, prox = one_child_update(epochs=5, prox_mu=10.0)
    assert dist(b1, prox) < 0.5 * dist(b0, plain)


def test_remedies_off_are_plain_cross_entropy_bit_for_bit():
    a = one_child_update()
    b = one_child_update(prox_mu=0.0, restricted_softmax=1.0, logit_adjust=0.0)
    assert all(np.array_equal(a[1][k], b[1][k]) for k in a[1])


def test_server_optimizers():
    base = {"w": np.zeros(4, np.float32)}
    agg = {"w": np.array([1, -1, 0.5, 0], np.float32)}
    same, _ = server_step("avgm", base, agg, {}, lr=1.0, momentum=0.0)
    np.testing.assert_allclose(same["w"], agg["w"])                       # avgm, lr 1, no momentum: FedAvg
    first, state = server_step("avgm", base, agg, {}, lr=1.0, momentum=0.5)
    second, _ = server_step("avgm", first, {"w": first["w"] + agg["w"]}, state, lr=1.0, momentum=0.5)
    np.testing.assert_allclose(second["w"] - first["w"], 1.5 * agg["w"])  # momentum carries half the last step
    for rule in ("adam", "yogi"):
        new, st = server_step(rule, base, agg, {}, lr=0.01, momentum=0.9)
        assert set(st) == {"m/w", "v/w"}
        moved = np.abs(new["w"])
        assert (moved[:3] > 0.005).all() and (moved[:3] < 0.05).all() and moved[3] == 0   # about lr per coordinate
        assert (np.sign(new["w"][:3]) == np.sign(agg["w"][:3])).all()
    none, st = server_step("none", base, agg, {}, lr=1.0, momentum=0.9)
    assert none is agg and st == {}


def test_strategy_applies_the_server_optimizer_per_task():
    from tests.conftest import CFG as cfg
    from trainer.datasets import load_dataset
    tree = load_dataset(cfg.dataset, None).tree
    tasks = make_tasks(tree, "hmoe", (1, 28, 28), 2)
    key = next(iter(tasks))
    base = {"w": np.zeros(2, np.float32)}
    res = [({"w": np.ones(2, np.float32)}, 10), ({"w": np.full(2, 3, np.float32)}, 30)]
    plain = Strategy(tree, tasks, "round-robin", 0)
    np.testing.assert_allclose(plain.aggregate(res, base, key)["w"], fedavg(res)["w"])
    avgm = Strategy(tree, tasks, "round-robin", 0, server_optimizer="avgm", server_lr=0.5, server_momentum=0.0)
    np.testing.assert_allclose(avgm.aggregate(res, base, key)["w"], 0.5 * fedavg(res)["w"])
    assert key in avgm.server_state


def test_balanced_epochs_cap():
    from trainer.datasets import load_dataset
    tree = load_dataset(CFG.dataset, None).tree
    tasks = make_tasks(tree, "hmoe", (1, 28, 28), 2)
    leafy = next(k for k, t in tasks.items() if t.node != 0)
    free = Strategy(tree, tasks, "round-robin", 0, balanced_epochs=True)
    capped = Strategy(tree, tasks, "round-robin", 0, balanced_epochs=True, epochs_cap=2)
    assert free.client_config(leafy, 0, 1000, 50).epochs > 2
    assert capped.client_config(leafy, 0, 1000, 50).epochs == 2


@pytest.mark.parametrize("kw, flag, bound", [
    ({"prox_mu": -0.1}, "--prox-mu", "[0, 1000]"),
    ({"restricted_softmax": 1.5}, "--restricted-softmax", "[0, 1]"),
    ({"restricted_softmax": -0.1}, "--restricted-softmax", "[0, 1]"),
    ({"logit_adjust": -1.0}, "--logit-adjust", "[0, 10]")])
def test_local_remedy_out_of_range_names_flag_and_range(kw, flag, bound):
    with pytest.raises(UsageError, match=rf"{flag} must be in \{bound}"):
        LocalConfig(**kw)


@pytest.mark.parametrize("kw, message", [
    ({"server_lr": 0.0}, r"--server-lr must be in \(0, 10\]"),
    ({"server_momentum": 1.0}, r"--server-momentum must be in \[0, 1\)"),
    ({"epochs_cap": -1}, r"--balanced-epochs-cap must be at least 0")])
def test_server_remedy_out_of_range_names_flag_and_range(kw, message):
    with pytest.raises(UsageError, match=message):
        RunConfig(**kw)


def test_cli_refuses_a_bad_remedy_before_writing_the_run(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "exporter.cli", "train", "--out", str(out), "--server-lr", "0"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "--server-lr must be in (0, 10]" in proc.stderr
    assert not out.exists()


def test_resume_with_another_remedy_is_refused_naming_both(tmp_path):
    cfg = replace(CFG, local=replace(CFG.local, prox_mu=0.01), server_optimizer="avgm")
    start_run(tmp_path, cfg, resume=False)
    assert merged_config(tmp_path, cfg, resume=True).local.prox_mu == 0.01
    other = replace(cfg, local=replace(cfg.local, prox_mu=0.1))
    with pytest.raises(RunError, match=r"--prox-mu 0\.1 vs 0\.01"):
        merged_config(tmp_path, other, resume=True)
    with pytest.raises(RunError, match=r"--server-optimizer 'adam' vs 'avgm'"):
        merged_config(tmp_path, replace(cfg, server_optimizer="adam"), resume=True)


def test_cli_resume_keeps_the_runs_remedies_unless_told_otherwise(tmp_path):
    from trainer.cli.flags import config_from_args
    from exporter.cli import build_parser
    cfg = replace(CFG, local=replace(CFG.local, logit_adjust=0.5), min_children=2)
    start_run(tmp_path, cfg, resume=False)
    p = build_parser()
    args = p.parse_args(["train", "--out", str(tmp_path), "--resume"])
    kept = config_from_args(args, resume=True)
    assert kept.local.logit_adjust == 0.5 and kept.min_children == 2
    merged_config(tmp_path, kept, resume=True)
    told = config_from_args(p.parse_args(["train", "--out", str(tmp_path), "--resume", "--logit-adjust", "1"]), True)
    with pytest.raises(RunError, match=r"--logit-adjust 1\.0 vs 0\.5"):
        merged_config(tmp_path, told, resume=True)


def test_a_run_saved_before_the_remedies_keeps_them_off(tmp_path):
    start_run(tmp_path, CFG, resume=False)
    saved = json.loads((tmp_path / "config.json").read_text())
    for name in ("server_optimizer", "server_lr", "server_momentum", "epochs_cap"):
        saved.pop(name)
    for name in ("prox_mu", "restricted_softmax", "logit_adjust"):
        saved["local"].pop(name)
    cfg = RunConfig.from_dict(saved)
    assert (cfg.local.prox_mu, cfg.local.restricted_softmax, cfg.local.logit_adjust, cfg.server_optimizer) == \
        (0.0, 1.0, 0.0, "none")


def test_shards_give_every_client_exactly_two_labels():
    labels = np.repeat(np.arange(10), 600)
    parts = shards(labels, 20, seed=3)
    assert sorted(np.concatenate(parts)) == list(range(len(labels)))
    assert all(len(np.unique(labels[p])) == 2 for p in parts)
    assert [list(p) for p in parts] == [list(p) for p in shards(labels, 20, seed=3)]


def test_logit_adjustment_calibrates_to_the_federations_prior():
    """A client holding outputs 0 and 1 equally, in a federation where output 0 is four times
    as frequent: with the prior, its update moves output 0's bias ahead of output 1's (the
    stored logits are the federation's); without, it keeps them level."""
    import torch
    torch.manual_seed(0)
    before = to_numpy(build_net(NET))
    rng = np.random.default_rng(2)
    x = rng.integers(0, 255, (100, 1, 8, 8), dtype=np.uint8)
    y = np.array([0, 1] * 50)
    gap = {}
    for prior in ((), (0.8, 0.2, 0.0)):
        cfg = LocalConfig(momentum=0.0, epochs=5, logit_adjust=1.0, prior=prior)
        after, _ = local_update(NET, before, x, y, cfg, NORM, 1)
        gap[prior] = after["head.3.bias"][0] - after["head.3.bias"][1]
    assert gap[(0.8, 0.2, 0.0)] - gap[()] > 0.05


def test_strategy_sends_the_prior_only_with_logit_adjustment():
    from trainer.datasets import load_dataset
    from trainer.protocol.strategy import task_priors
    data = load_dataset(CFG.dataset, None)
    tasks = make_tasks(data.tree, "hmoe", (1, 28, 28), 2)
    priors = task_priors(data.tree, tasks, data.train_y)
    assert all(abs(sum(p) - 1) < 1e-4 for p in priors.values())
    plain = Strategy(data.tree, tasks, "round-robin", 0, local=LocalConfig(logit_adjust=0.0), priors=priors)
    adjusted = Strategy(data.tree, tasks, "round-robin", 0, local=LocalConfig(logit_adjust=1.0), priors=priors)
    key = next(iter(tasks))
    assert plain.client_config(key, 0).prior == ()
    assert list(adjusted.client_config(key, 0).prior) == priors[key]
    assert LocalConfig.from_dict(adjusted.client_config(key, 0).to_dict()) == adjusted.client_config(key, 0)
    with pytest.raises(UsageError, match="prior"):
        LocalConfig(prior=(0.5, "x"))
