"""`hmoe plan`: a fleet's run prepared without training, its rounds changed without training,
each client's data exported from the run's partition; a bad flag writes nothing."""

import json

import numpy as np
import pytest

from exporter.cli import main
from trainer.prepare import prepare
from trainer.protocol.run import load_run_config

FLAGS = ["--dataset", "synthetic:1,28,28:fashion-mnist:300", "--clients", "4", "--clients-per-round", "3",
         "--hmoe-rounds", "5", "--expert-width", "2"]


def test_plan_writes_an_untrained_run_and_each_clients_data(tmp_path):
    run = tmp_path / "run"
    assert main(["plan", "--out", str(run), *FLAGS, "--export-clients", str(tmp_path / "clients")]) == 0
    state = json.loads((run / "state-hmoe.json").read_text())
    assert state["completed_rounds"] == 0 and state["log"] == [] and "strategy" in state
    assert len(list((run / "experts").glob("*.safetensors"))) == 5
    cfg = load_run_config(run)
    assert cfg.hmoe_rounds == 5 and cfg.clients == 4
    prep = prepare(cfg)
    names = [prep.data.tree.names[v] for v in prep.data.tree.leaf_order]
    for c, part in enumerate(prep.parts):   # client c's file is its partition, labels by leaf name
        with np.load(tmp_path / "clients" / f"client-{c}" / "train.npz") as z:
            np.testing.assert_array_equal(z["images"], prep.data.train_x[part])
            assert list(z["labels"]) == [names[y] for y in prep.data.train_y[part]]


def test_plan_changes_the_rounds_of_a_run_without_training_it(tmp_path, capsys):
    run = tmp_path / "run"
    main(["plan", "--out", str(run), *FLAGS])
    assert main(["plan", "--run", str(run), "--hmoe-rounds", "9"]) == 0
    assert load_run_config(run).hmoe_rounds == 9
    assert json.loads((run / "state-hmoe.json").read_text())["completed_rounds"] == 0
    state = json.loads((run / "state-hmoe.json").read_text())
    state["completed_rounds"] = 7
    (run / "state-hmoe.json").write_text(json.dumps(state))
    assert main(["plan", "--run", str(run), "--hmoe-rounds", "6"]) == 2
    assert "already completed 7" in capsys.readouterr().err
    assert main(["plan", "--run", str(run), "--alpha", "0.1"]) == 2
    assert "--alpha" in capsys.readouterr().err and load_run_config(run).alpha == 0.5


@pytest.mark.parametrize("bad, says", [(["--clients", "2"], "--clients-per-round 3 is more than --clients 2"),
                                        (["--lr", "-1"], "--lr must be positive")])
def test_a_bad_flag_writes_nothing(tmp_path, capsys, bad, says):
    assert main(["plan", "--out", str(tmp_path / "run"), *FLAGS, *bad]) == 2
    assert says in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
