"""The run's configuration type is the one source of its flags: every field has one, the
defaults and the help are the field's, and a bad value is refused before anything is written."""

import argparse
import json
from dataclasses import fields

import pytest

from hierarchy.errors import UsageError
from trainer.cli.flags import add_config_flags, config_from_args, flag_name
from trainer.device.config import LocalConfig
from trainer.protocol.run import RunConfig


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    add_config_flags(p)
    return p


def test_every_field_has_a_flag_with_its_help():
    options = {o: a for a in parser()._actions for o in a.option_strings}
    for f in [*fields(RunConfig), *fields(LocalConfig)]:
        if f.name == "local" or f.metadata.get("internal"):   # internal: set by the strategy, never a flag
            assert flag_name(f) not in options
            continue
        assert flag_name(f) in options, f.name
        assert f.metadata["help"] in options[flag_name(f)].help


def test_no_flags_give_the_default_config():
    assert config_from_args(parser().parse_args([])) == RunConfig()


def test_flags_reach_the_config_and_its_strategy():
    args = parser().parse_args(["--weight-decay", "0.001", "--clients", "7", "--no-balanced-epochs",
                                "--train-only", "root,Shoes", "--local-epochs", "2", "--hmoe-rounds", "9"])
    cfg = config_from_args(args)
    assert cfg.local.weight_decay == 0.001 and cfg.local.epochs == 2 and cfg.clients == 7
    assert cfg.train_only == ["root", "Shoes"] and not cfg.balanced_epochs and cfg.hmoe_rounds == 9
    assert RunConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


@pytest.mark.parametrize("flags, named", [
    (["--clients", "3"], "--clients-per-round"), (["--lr", "0"], "--lr"), (["--batch-size", "0"], "--batch-size"),
    (["--min-children", "0"], "--min-children"), (["--dropout", "1"], "--dropout"),
    (["--momentum", "-0.5"], "--momentum")])
def test_a_bad_value_is_refused_naming_its_flag(flags, named):
    with pytest.raises(UsageError, match=named):
        config_from_args(parser().parse_args(flags))


def test_a_saved_config_is_checked_like_the_flags():
    saved = RunConfig().to_dict()
    with pytest.raises(UsageError, match="--local-epochs"):
        RunConfig.from_dict({**saved, "local": {**saved["local"], "epochs": 0}})
    with pytest.raises(UsageError, match="unknown run settings"):
        RunConfig.from_dict({**saved, "rounds_per_day": 3})


def test_a_data_set_with_defaults_of_its_own_starts_from_them_and_flags_still_win():
    """`hmoe train --dataset hanzi:N` alone runs the configuration measured best on the glyphs
    (trainer.protocol.run.DATASET_DEFAULTS); any flag given overrides it; other data sets keep
    the fields' defaults."""
    from trainer.protocol.run import DATASET_DEFAULTS
    hanzi = DATASET_DEFAULTS["hanzi"]
    cfg = config_from_args(parser().parse_args(["--dataset", "hanzi:300"]))
    for name, value in hanzi.items():
        assert getattr(cfg, name) == value, name
    cfg = config_from_args(parser().parse_args(["--dataset", "hanzi", "--trunk-blocks", "0", "--assignment", "one",
                                                "--hmoe-rounds", "7"]))
    assert (cfg.trunk_blocks, cfg.assignment, cfg.hmoe_rounds) == (0, "one", 7)
    assert cfg.warm_start == hanzi["warm_start"]
    assert config_from_args(parser().parse_args(["--dataset", "cifar100"])) == RunConfig(dataset="cifar100")
    assert "hanzi: spread" in {o: a for a in parser()._actions for o in a.option_strings}["--assignment"].help
