"""Recipes, flags and config fields are one thing; precedence is defaults < preset < recipe
< command line."""

import argparse
from dataclasses import fields

import pytest

from segnest.cli import build_parser, main
from segnest.commands.config import (
    add_dataclass_arguments,
    packaged_recipes,
    read_recipe,
    resolve_config,
)
from segnest.errors import SegnestError
from segnest.models import create_model
from segnest.presets import DATASET_PRESETS
from segnest.tasks.segmentation.config import TrainConfig

RECIPES = list(packaged_recipes())


def parse_train(*argv: str) -> TrainConfig:
    parser = argparse.ArgumentParser()
    add_dataclass_arguments(parser, TrainConfig)
    return resolve_config(TrainConfig, vars(parser.parse_args(argv)), DATASET_PRESETS)


def test_the_published_recipes_ship_inside_the_package():
    # 7 segmentation recipes and the paper's 9 COCO detection rows.
    assert len(RECIPES) == 16 and "deeplabv3_resnest101_ade20k" in RECIPES
    assert sum(name.endswith("_coco") for name in RECIPES) == 9


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_packaged_recipe_resolves_by_name_and_names_its_target(recipe):
    from segnest.tasks.train import resolve_train_config

    # The COCO recipes need the user's COCO folder, as their launch line says.
    given = {"config": recipe, **({"data_root": "/data/coco"} if "_coco" in recipe else {})}
    cfg = resolve_train_config(TrainConfig, given, DATASET_PRESETS)
    assert cfg.backbone in recipe and cfg.dataset in recipe and cfg.model in recipe
    _, keys = read_recipe(recipe)
    assert keys["target"] and keys["hardware"]


def test_a_recipe_name_may_end_in_yaml():
    cfg = resolve_config(TrainConfig, {"config": "deeplabv3_resnest14_mini.yaml"},
                         DATASET_PRESETS)
    assert (cfg.dataset, cfg.iters, cfg.crop_size) == ("mini", 900, 96)


def test_a_file_that_exists_wins_over_the_packaged_recipe_of_that_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "deeplabv3_resnest14_mini.yaml").write_text("dataset: mini\niters: 5\n")
    cfg = resolve_config(TrainConfig, {"config": "deeplabv3_resnest14_mini.yaml"},
                         DATASET_PRESETS)
    assert cfg.iters == 5
    packaged = resolve_config(TrainConfig, {"config": "deeplabv3_resnest14_mini"},
                              DATASET_PRESETS)
    assert packaged.iters == 900  # no file of that exact name: the packaged recipe


def test_an_unknown_recipe_is_one_line_listing_the_packaged_names():
    with pytest.raises(SegnestError) as err:
        resolve_config(TrainConfig, {"config": "deeplabv3_resnest999"}, DATASET_PRESETS)
    message = str(err.value)
    assert "\n" not in message and "deeplabv3_resnest999 not found" in message
    assert all(name in message for name in RECIPES)


def test_a_packaged_recipe_is_named_in_errors_by_its_name():
    with pytest.raises(SegnestError, match="crop_size: 96 in recipe deeplabv3_resnest14_mini"):
        resolve_config(TrainConfig, {"config": "deeplabv3_resnest14_mini", "base_size": 40},
                       DATASET_PRESETS)


def test_segnest_recipes_lists_each_with_dataset_backbone_target_and_hardware(capsys):
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    for name in RECIPES:
        _, keys = read_recipe(name)
        block = out.split(name, 1)[1]
        assert f"({keys['dataset']}, {keys['backbone']})" in block.splitlines()[0]
        assert keys["target"] in block and keys["hardware"] in block
    assert "ADE20K val mIoU 46.91" in out


def test_segnest_recipes_name_prints_the_recipe_yaml(capsys):
    assert main(["recipes", "deeplabv3_resnest101_ade20k"]) == 0
    out = capsys.readouterr().out
    assert out == packaged_recipes()["deeplabv3_resnest101_ade20k"].read_text()
    assert "backbone: resnest101" in out


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


def test_a_bare_recipe_name_beside_a_copy_of_that_name_says_which_file_it_used(
        tmp_path, monkeypatch, capsys):
    """--config NAME means the packaged recipe; a local NAME.yaml must not go unused in
    silence (#25 item 7)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "deeplabv3_resnest14_mini.yaml").write_text("dataset: mini\niters: 5\n")
    cfg = resolve_config(TrainConfig, {"config": "deeplabv3_resnest14_mini"}, DATASET_PRESETS)
    assert cfg.iters == 900
    err = capsys.readouterr().err
    assert err.count("using the packaged recipe deeplabv3_resnest14_mini, not your copy") == 1
    assert "--config deeplabv3_resnest14_mini.yaml" in err
    resolve_config(TrainConfig, {"config": "deeplabv3_resnest14_mini.yaml"}, DATASET_PRESETS)
    assert "packaged" not in capsys.readouterr().err  # the copy, named as a file: no note


def test_a_recipe_that_is_not_utf8_is_one_line(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_bytes("dataset: folder\n# café\n".encode("latin-1"))
    with pytest.raises(SegnestError, match=r"r\.yaml is not UTF-8 text") as error:
        resolve_config(TrainConfig, {"config": str(recipe)}, DATASET_PRESETS)
    assert "\n" not in str(error.value)
