"""Experts on a shared trunk (issue 39): the root expert's first blocks are every other
expert's trunk; an expert's round trains only its own layers; evaluation and the exported
bundle decide alike."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from tests.conftest import CFG
from trainer.device.client import Normalizer, local_update, to_numpy
from trainer.device.config import LocalConfig, NetConfig
from trainer.device.nets import ConvNet, build_net, build_trunk, num_params, trunk_weights
from trainer.prepare import open_run, prepare
from trainer.protocol.run import RunError
from trainer.protocol.strategy import trunk_owner
from trainer.transports.inprocess import Federation

TRUNK = replace(CFG, trunk_blocks=1, hmoe_rounds=4)


@pytest.mark.parametrize("blocks", [1, 2])
def test_param_shapes_name_the_networks_own_tensors_only(blocks):
    cfg = NetConfig((1, 28, 28), 3, width=8, depth=2, trunk_blocks=blocks, trunk_width=16).resolved()
    net = ConvNet(cfg)
    assert {k: tuple(v.shape) for k, v in net.state_dict().items()} == cfg.param_shapes()
    assert all(int(k.split(".")[1]) >= 3 * blocks for k in cfg.param_shapes() if k.startswith("features."))
    assert tuple(net(torch.zeros(2, *cfg.feature_shape())).shape) == (2, 3)
    whole = NetConfig((1, 28, 28), 3, width=8, depth=2)
    same = NetConfig((1, 28, 28), 3, width=8, depth=2, trunk_blocks=blocks)   # a trunk of its own width
    assert same.forward_macs() + same.trunk_macs() == whole.forward_macs() and same.trunk_macs() > 0
    assert num_params(ConvNet(same)) < num_params(ConvNet(whole))


def test_the_top_expert_owns_the_trunk_and_the_others_run_on_it():
    from hierarchy import load_taxonomy
    tasks = TRUNK.tasks("hmoe", load_taxonomy("fashion-mnist"), (1, 28, 28))
    owner = trunk_owner(tasks)
    assert owner == "root" and tasks[owner].net.trunk_blocks == 0
    assert all(t.net.trunk_blocks == 1 and t.net.trunk_width == tasks[owner].net.width
               for k, t in tasks.items() if k != owner)
    assert trunk_owner(CFG.tasks("hmoe", load_taxonomy("fashion-mnist"), (1, 28, 28))) is None


def test_an_update_on_the_trunk_trains_only_the_expert_and_reads_the_roots_first_blocks():
    root_cfg = NetConfig((1, 28, 28), 4, width=8, depth=2).resolved()
    torch.manual_seed(0)
    root = to_numpy(build_net(root_cfg))
    cfg = NetConfig((1, 28, 28), 3, width=4, depth=2, trunk_blocks=1, trunk_width=8).resolved()
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 256, (40, 1, 28, 28), dtype=np.uint8), rng.integers(0, 3, 40)
    norm = Normalizer((0.5,), (0.25,))
    with pytest.raises(ValueError, match="trunk"):
        local_update(cfg, None, x, y, LocalConfig(batch_size=8), norm, 0)
    new, metrics = local_update(cfg, None, x, y, LocalConfig(batch_size=8), norm, 0, trunk=root)
    assert set(new) == set(cfg.param_shapes()) and metrics["num_samples"] == 40
    assert set(trunk_weights(cfg, root)) == {"features.0.weight", "features.0.bias"}
    trunk = build_trunk(cfg, root)
    whole = build_net(root_cfg)
    whole.load_state_dict({k: torch.from_numpy(v) for k, v in root.items()})
    xb = norm(torch.from_numpy(x[:5]))
    assert torch.allclose(trunk(xb), whole.features[:3](xb))
    assert not any(p.requires_grad for p in trunk.parameters())


@pytest.fixture(scope="module")
def trunk_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("trunk") / "run"
    cfg, prep = open_run(run, TRUNK, resume=False)
    fed = Federation(run, "hmoe", cfg, prep)
    fed.run(progress=False)
    return run, cfg, prep, fed


def test_a_simulated_run_on_the_trunk_trains_the_root_whole_and_the_others_above_it(trunk_run):
    run, cfg, prep, fed = trunk_run
    assert fed.trunk_owner == "root"
    trained = {e["task"] for e in fed.state["log"]}
    assert "root" in trained and len(trained) > 1
    for key, task in fed.tasks.items():
        assert set(fed.weights[key]) == set(task.net.param_shapes())
    d = prep.data
    scores = fed.evaluate(d.test_x, d.test_y)
    assert 0 <= scores["info_f1"] <= 1
    log = fed.state["log"]
    assert all(e["client_gmacs"] > 0 for e in log if e["clients"])


def test_the_exported_bundle_decides_as_torch_does_on_the_trunk(trunk_run, tmp_path):
    from edge_runtime.engine import Engine
    from exporter.bundle import export_run
    from hierarchy import info_f1
    run, cfg, prep, fed = trunk_run
    export_run(run, tmp_path / "bundle", progress=False)
    d = prep.data
    torch_f1 = fed.evaluate(d.test_x, d.test_y)["info_f1"]
    x = ((d.test_x.astype(np.float32) / 255 - 0.5) / 0.25).astype(np.float32)
    onnx_f1 = float(info_f1(d.tree, d.tree.leaves[d.test_y], Engine(tmp_path / "bundle").decode(x).nodes).mean())
    assert abs(onnx_f1 - torch_f1) <= 0.002


def test_growing_a_run_on_the_trunk_is_refused_clearly(trunk_run):
    from hierarchy import load_taxonomy
    from trainer.grow import extension_config
    run, *_ = trunk_run
    with pytest.raises(RunError, match="trunk-blocks 1"):
        extension_config(run, load_taxonomy("fashion-mnist"), ["hmoe"], None, None, None, "cpu")


def test_trunk_blocks_beyond_the_networks_depth_are_refused():
    with pytest.raises(ValueError, match="trunk-blocks 3"):
        NetConfig((1, 28, 28), 3, width=4, depth=2, trunk_blocks=3).resolved()


def test_a_temperature_fitted_on_validation_softens_an_overconfident_expert():
    from trainer.evaluate import fit_temperature, softmax
    rng = np.random.default_rng(0)
    target = rng.integers(0, 4, 2000)
    logits = rng.normal(0, 1, (2000, 4))
    logits[np.arange(2000), target] += 1.0
    sharp = logits * 6                                  # the same ranking, far too confident
    assert fit_temperature(sharp, target) > 3
    assert 0.6 < fit_temperature(logits, target) < 1.6
    assert fit_temperature(sharp[:0], target[:0]) == 1.0
    assert np.allclose(softmax(sharp, 6.0), softmax(logits))


def test_soft_decoding_scores_a_trunk_run(trunk_run):
    run, cfg, prep, fed = trunk_run
    d = prep.data
    soft = fed.evaluate(d.test_x, d.test_y, "soft:2")
    assert 0 <= soft["info_f1"] <= 1 and soft["experts_per_input"] >= fed.evaluate(d.test_x, d.test_y)[
        "experts_per_input"]


def test_a_round_on_the_trunk_is_measured_with_the_trunk_it_holds():
    """Table 1's figures of an expert on the trunk: its own training state, the trunk's weights
    and the trunk's features, in a fresh process like every other round."""
    from trainer.device.cost import task_cost
    from trainer.device.nets import Trunk, analytic_bytes
    cfg = NetConfig((1, 28, 28), 3, width=4, depth=2, trunk_blocks=2, trunk_width=8).resolved()
    torch.manual_seed(0)
    weights, trunk = to_numpy(build_net(cfg)), to_numpy(Trunk(cfg))
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 256, (64, 1, 28, 28), dtype=np.uint8), rng.integers(0, 3, 64)
    cost = task_cost(cfg, weights, [(x, y, LocalConfig(batch_size=16))], (0.5,), (0.25,), 0, trunk=trunk)
    assert cost["live_mb"] > 0 and cost["time_ms"] > 0
    analytic = analytic_bytes(cfg, 16)
    assert analytic["trunk"] == 4 * sum(p.numel() for p in Trunk(cfg).parameters())
    assert analytic["total"] < analytic_bytes(NetConfig((1, 28, 28), 3, width=8, depth=2), 16)["total"]


def test_a_warm_start_that_can_copy_nothing_is_named():
    import tempfile
    from pathlib import Path

    from trainer.train import cold_experts
    out = []
    for cfg in (replace(CFG, warm_start=2, expert_widths="map:root=8"), replace(CFG, warm_start=2),
                replace(CFG, warm_start=2, expert_widths="map:root=8", trunk_blocks=1)):
        run = Path(tempfile.mkdtemp()) / "run"
        c, p = open_run(run, cfg, resume=False)
        out.append(cold_experts(Federation(run, "hmoe", c, p)))
    assert out == [["Clothes", "Goods"], [], []]
