"""Renamed flags and recipe keys keep working with one warning line, and checkpoints that
stored the old names still load."""

import argparse

import torch

from segnest.cli import build_parser
from segnest.commands.config import add_dataclass_arguments, resolve_config
from segnest.inference.config import EvalConfig
from segnest.models import create_model, model_from_checkpoint
from segnest.presets import DATASET_PRESETS
from segnest.tasks.classification.config import PretrainConfig
from segnest.tasks.segmentation.config import TrainConfig


def parse(cls, *argv: str):
    parser = argparse.ArgumentParser()
    add_dataclass_arguments(parser, cls)
    return resolve_config(cls, vars(parser.parse_args(argv)), DATASET_PRESETS)


def test_old_base_width_flag_sets_stage_width_with_one_warning_line(capsys):
    cfg = parse(TrainConfig, "--dataset", "mini", "--base-width", "24")
    assert cfg.stage_width == 24
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'--base-width' is renamed '--stage-width'" in err[0]
    assert parse(PretrainConfig, "--dataset", "mini", "--base-width", "16").stage_width == 16


def test_old_base_width_recipe_key_sets_stage_width(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("dataset: mini\nbase_width: 24\n")
    assert parse(TrainConfig, "--config", str(recipe)).stage_width == 24
    assert "'base_width' is renamed 'stage_width'" in capsys.readouterr().err
    # The new key wins when a recipe holds both.
    recipe.write_text("dataset: mini\nbase_width: 24\nstage_width: 32\n")
    assert parse(TrainConfig, "--config", str(recipe)).stage_width == 32


def test_eval_crop_size_is_the_window_size(capsys):
    parser, _ = build_parser()
    args = parser.parse_args(["eval", "--checkpoint", "x.pt", "--crop-size", "40"])
    assert args.window_size == 40
    assert "'--crop-size' is renamed '--window-size'" in capsys.readouterr().err
    assert parse(EvalConfig, "--checkpoint", "x.pt", "--window-size", "40").window_size == 40


def test_old_flags_stay_out_of_help():
    parser, _ = build_parser()
    help_text = parser._subparsers._group_actions[0].choices["train"].format_help()
    assert "--stage-width" in help_text and "--base-width" not in help_text


def test_checkpoint_that_stored_base_width_rebuilds_the_model():
    kwargs = dict(num_classes=3, stage_width=8, stem_width=8, head_channels=16)
    model = create_model("deeplabv3_resnest14", **kwargs)
    legacy = {**kwargs, "base_width": kwargs.pop("stage_width")}
    rebuilt = model_from_checkpoint({"model_name": "deeplabv3_resnest14", "model_kwargs": legacy,
                                     "model": model.state_dict()})
    for key, value in model.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[key], value), key
