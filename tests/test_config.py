"""Recipes, flags and config fields are one thing; precedence is defaults < preset < recipe
< command line."""

import argparse
from dataclasses import fields
from pathlib import Path

import pytest

from segnest.cli import build_parser
from segnest.config import DATASET_PRESETS, TrainConfig, add_dataclass_arguments, resolve_config
from segnest.errors import SegnestError
from segnest.models import create_model

RECIPES = sorted((Path(__file__).parents[1] / "experiments").glob("*.yaml"))


def parse_train(*argv: str) -> TrainConfig:
    parser = argparse.ArgumentParser()
    add_dataclass_arguments(parser, TrainConfig)
    return resolve_config(TrainConfig, vars(parser.parse_args(argv)), DATASET_PRESETS)


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_every_recipe_resolves_and_names_its_target(recipe):
    cfg = resolve_config(TrainConfig, {"config": str(recipe)}, DATASET_PRESETS)
    assert cfg.backbone in recipe.name and cfg.dataset in recipe.name
    assert "reference:" in recipe.read_text()


def test_command_line_beats_recipe_beats_preset_beats_default(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("dataset: ade20k\ncrop_size: 320\nlr: 0.02\n")
    cfg = parse_train("--config", str(recipe), "--lr", "0.05")
    assert cfg.lr == 0.05  # flag over recipe
    assert cfg.crop_size == 320  # recipe over preset (480)
    assert cfg.base_size == 520  # preset over default (None)
    assert cfg.momentum == 0.9  # default


def test_paper_settings_without_a_recipe():
    cfg = parse_train("--dataset", "ade20k", "--backbone", "resnest101")
    assert (cfg.base_size, cfg.crop_size, cfg.epochs, cfg.aux_weight) == (520, 480, 180, 0.2)
    assert (cfg.head_lr_mult, cfg.poly_power) == (10.0, 0.9)
    # Architecture defaults are the model's own: stride 8 and 256 head channels.
    assert cfg.output_stride is None and cfg.head_channels is None
    model = create_model("deeplabv3_resnest14", num_classes=2, stage_width=8, stem_width=8)
    assert model.backbone.output_stride == 8 and model.head_channels == 256


def test_unknown_recipe_key_is_a_clear_error(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("crop_sise: 320\n")
    with pytest.raises(SegnestError, match="unknown key.*crop_sise"):
        parse_train("--config", str(recipe))


def test_every_train_field_is_a_flag():
    parser, _ = build_parser()
    train = parser._subparsers._group_actions[0].choices["train"]
    flags = {opt for action in train._actions for opt in action.option_strings}
    for f in fields(TrainConfig):
        assert "--" + f.name.replace("_", "-") in flags
