"""Every flag and recipe value is checked before any work: a bad one is a single line that
names the flag (or the recipe and key) and says what to write; recipe values keep their
types (no truthy strings, no truncated floats)."""

import argparse
import time
from dataclasses import fields
from pathlib import Path

import pytest
import torch

from segnest.cli import build_parser, main
from segnest.commands.config import add_dataclass_arguments, resolve_config, validate_config
from segnest.errors import SegnestError
from segnest.inference.config import EvalConfig, ExportConfig, PredictConfig
from segnest.models import create_model
from segnest.models.resnest import RESNEST_VARIANTS, stage_width_fits
from segnest.presets import DATASET_PRESETS
from segnest.tasks.classification.config import PRETRAIN_PRESETS, PretrainConfig
from segnest.tasks.segmentation.config import TrainConfig
from segnest.tools.config import BenchConfig, DemoConfig


def base_argv(command: str, tmp: Path, tiny_flags: list[str]) -> list[str]:
    """A valid command line whose every path is missing: if a bad value slipped through,
    the command would fail on the missing data (differently) or create the work folder."""
    work, missing = str(tmp / "work"), str(tmp / "missing")
    return {
        "train": ["train", "--dataset", "folder", "--data-root", missing, "--work-dir", work,
                  *tiny_flags, "--iters", "2"],
        "pretrain": ["pretrain", "--dataset", "imagenet", "--data", missing, "--work-dir", work,
                     "--backbone", "resnest14", "--stage-width", "8", "--epochs", "1",
                     "--warmup-epochs", "0", "--device", "cpu", "--workers", "0"],
        "eval": ["eval", "--checkpoint", missing, "--out", work, "--device", "cpu"],
        "predict": ["predict", missing, "--checkpoint", missing, "--out", work],
        "export": ["export", "--checkpoint", missing, "--out", work],
        "bench": ["bench", "--model", "resnest14", "--size", "32", "--runs", "1",
                  "--warmup", "0", "--device", "cpu"],
        "demo": ["demo", "--work-dir", work, "--iters", "2", "--pretrain-epochs", "1",
                 "--workers", "0", "--device", "cpu"],
    }[command]


# (command, bad flags appended to its valid command line, the flag the error must name)
BAD_VALUES = [
    # The values of the issue.
    ("train", ["--lr", "-1"], "--lr"),
    ("train", ["--momentum", "-1"], "--momentum"),
    ("train", ["--seed", "-1"], "--seed"),
    ("train", ["--workers", "-1"], "--workers"),
    ("train", ["--crop-size", "0"], "--crop-size"),
    ("train", ["--head-channels", "0"], "--head-channels"),
    ("train", ["--stage-width", "0"], "--stage-width"),
    ("train", ["--base-width", "0"], "--stage-width"),
    ("train", ["--warmup-iters", "5"], "--warmup-iters"),
    ("train", ["--log-interval", "0"], "--log-interval"),
    ("train", ["--weight-decay", "-1"], "--weight-decay"),
    ("train", ["--val-samples", "0"], "--val-samples"),
    # And the rest of train's ranges and rules.
    ("train", ["--lr", "0"], "--lr"),
    ("train", ["--lr", "nan"], "--lr"),
    ("train", ["--momentum", "1"], "--momentum"),
    ("train", ["--seed", str(2**32)], "--seed"),
    ("train", ["--crop-size", "16"], "--crop-size"),
    ("train", ["--base-size", "0"], "--base-size"),
    ("train", ["--stage-width", "7"], "--stage-width"),
    ("train", ["--stem-width", "0"], "--stem-width"),
    ("train", ["--iters", "0"], "--iters"),
    ("train", ["--epochs", "0"], "--epochs"),
    ("train", ["--batch-size", "0"], "--batch-size"),
    ("train", ["--val-interval", "0"], "--val-interval"),
    ("train", ["--panels", "-1"], "--panels"),
    ("train", ["--checkpoint-interval", "-1"], "--checkpoint-interval"),
    ("train", ["--keep-checkpoints", "-1"], "--keep-checkpoints"),
    ("train", ["--aux-weight", "-1"], "--aux-weight"),
    ("train", ["--head-lr-mult", "0"], "--head-lr-mult"),
    ("train", ["--poly-power", "-1"], "--poly-power"),
    ("train", ["--min-lr", "-1"], "--min-lr"),
    ("train", ["--min-lr", "0.5"], "--min-lr"),
    ("train", ["--cat-max-ratio", "0"], "--cat-max-ratio"),
    ("train", ["--cat-max-ratio", "1.5"], "--cat-max-ratio"),
    ("train", ["--scale-min", "0"], "--scale-min"),
    ("train", ["--scale-min", "3"], "--scale-min"),
    ("train", ["--crop-size", "400"], "--crop-size"),
    ("train", ["--output-stride", "4"], "--output-stride"),
    ("train", ["--dataset", "pascal"], "--dataset"),
    ("train", ["--backbone", "resnest13"], "--backbone"),
    ("train", ["--device", "gpu"], "--device"),
    ("train", ["--device", "cuda:x"], "--device"),
    ("pretrain", ["--epochs", "0"], "--epochs"),
    ("pretrain", ["--lr", "-0.1"], "--lr"),
    ("pretrain", ["--label-smoothing", "1"], "--label-smoothing"),
    ("pretrain", ["--mixup", "-1"], "--mixup"),
    ("pretrain", ["--cutmix", "-1"], "--cutmix"),
    ("pretrain", ["--crop-pct", "0"], "--crop-pct"),
    ("pretrain", ["--crop-pct", "1.5"], "--crop-pct"),
    ("pretrain", ["--dropblock-prob", "1"], "--dropblock-prob"),
    ("pretrain", ["--final-drop", "-0.1"], "--final-drop"),
    ("pretrain", ["--warmup-epochs", "-1"], "--warmup-epochs"),
    ("pretrain", ["--warmup-epochs", "2"], "--warmup-epochs"),
    ("pretrain", ["--auto-augment", "trivial"], "--auto-augment"),
    ("pretrain", ["--dataset", "cifar"], "--dataset"),
    ("pretrain", ["--crop-size", "16"], "--crop-size"),
    ("pretrain", ["--stage-width", "3"], "--stage-width"),
    ("pretrain", ["--log-interval", "0"], "--log-interval"),
    ("pretrain", ["--workers", "-2"], "--workers"),
    ("eval", ["--samples", "0"], "--samples"),
    ("eval", ["--stride", "0"], "--stride"),
    ("eval", ["--window-size", "0"], "--window-size"),
    ("eval", ["--base-size", "0"], "--base-size"),
    ("eval", ["--scales", "0,1"], "--scales"),
    ("eval", ["--scales", "abc"], "--scales"),
    ("eval", ["--mode", "tiles"], "--mode"),
    ("eval", ["--split", "training"], "--split"),
    ("eval", ["--dataset", "pascal"], "--dataset"),
    ("eval", ["--workers", "-1"], "--workers"),
    ("eval", ["--window-size", "40", "--stride", "50"], "--stride"),
    ("predict", ["--mode", "tiles"], "--mode"),
    ("predict", ["--scales", "1,,x"], "--scales"),
    ("predict", ["--device", "tpu"], "--device"),
    ("export", ["--format", "tflite"], "--format"),
    ("export", ["--size", "16"], "--size"),
    ("bench", ["--size", "16"], "--size"),
    ("bench", ["--batch", "0"], "--batch"),
    ("bench", ["--warmup", "-1"], "--warmup"),
    ("bench", ["--runs", "0"], "--runs"),
    ("bench", ["--num-classes", "0"], "--num-classes"),
    ("bench", ["--mode", "eval"], "--mode"),
    ("bench", ["--model", "resnest51"], "--model"),
    ("demo", ["--iters", "0"], "--iters"),
    ("demo", ["--pretrain-epochs", "0"], "--pretrain-epochs"),
    ("demo", ["--workers", "-1"], "--workers"),
]


@pytest.mark.parametrize("command", ["train", "pretrain", "eval", "predict", "export", "bench",
                                     "demo"])
def test_the_base_command_lines_are_valid(command, tmp_path, tiny_flags):
    parser, _ = build_parser()
    args = vars(parser.parse_args(base_argv(command, tmp_path, tiny_flags)))
    cls = {"train": TrainConfig, "pretrain": PretrainConfig, "eval": EvalConfig,
           "predict": PredictConfig, "export": ExportConfig, "bench": BenchConfig,
           "demo": DemoConfig}[command]
    presets = {"train": DATASET_PRESETS, "pretrain": PRETRAIN_PRESETS}.get(command)
    given = {k: v for k, v in args.items() if k not in ("command", "debug")}
    assert isinstance(resolve_config(cls, given, presets), cls)


@pytest.mark.parametrize("command,bad,flag", BAD_VALUES,
                         ids=[f"{c} {' '.join(b)}" for c, b, _ in BAD_VALUES])
def test_bad_value_is_one_line_naming_the_flag_before_any_work(command, bad, flag, tmp_path,
                                                               tiny_flags, capsys):
    start = time.perf_counter()
    code = main([*base_argv(command, tmp_path, tiny_flags), *bad])
    elapsed = time.perf_counter() - start
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "is renamed" not in line]
    assert code == 2
    assert len(lines) == 1 and lines[0].startswith("segnest: error: "), err
    assert flag in lines[0]
    assert not (tmp_path / "work").exists() and not (tmp_path / "missing").exists()
    assert elapsed < 1.0


def parse(cls, *argv: str):
    parser = argparse.ArgumentParser()
    add_dataclass_arguments(parser, cls)
    presets = PRETRAIN_PRESETS if cls is PretrainConfig else DATASET_PRESETS
    return resolve_config(cls, vars(parser.parse_args(argv)), presets)


def recipe(tmp_path: Path, text: str) -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text("dataset: mini\n" + text)
    return str(path)


@pytest.mark.parametrize("line,message", [
    ('aux: "no"', r"aux: 'no' in recipe .*recipe.yaml is text, not true or false"),
    ("aux: 1", r"aux: 1 in recipe .* is not a boolean; write true or false"),
    ("iters: 2.9", r"iters: 2.9 in recipe .* is not a whole number; write 2 or 3"),
    ('crop_size: "96"', r"crop_size: '96' in recipe .* is text, not a number; write it without"),
    ('lr: "1e-3"', r"lr: '1e-3' in recipe .* is text, not a number"),
    ("lr: true", r"lr: true in recipe .* is not a number"),
    ("lr: .inf", r"lr: inf in recipe .* is not a finite number"),
    ("iters: .inf", r"iters: inf in recipe .* is not a finite number"),
    ("batch_size: null", r"batch_size: null in recipe .* needs a value"),
    ("backbone: 50", r"backbone: 50 in recipe .* is not text; put it in quotes"),
    ("lr: -0.5", r"lr: -0.5 in recipe .*recipe.yaml is out of range; use a number > 0"),
    ("warmup_iters: 1000", r"warmup_iters: 1000 in recipe .* is longer than the run \(iters: "
                           r"900 in the mini preset\)"),
    ("config: other.yaml", r"cannot name another recipe"),
])
def test_recipe_values_keep_their_types_and_ranges(tmp_path, line, message):
    with pytest.raises(SegnestError, match=message) as caught:
        parse(TrainConfig, "--config", recipe(tmp_path, line + "\n"))
    assert "\n" not in str(caught.value)


def test_recipe_numbers_in_exponent_form_are_numbers(tmp_path):
    # YAML 1.1 (PyYAML) reads an exponent without a dot as text; a recipe means a number.
    cfg = parse(TrainConfig, "--config", recipe(tmp_path, "lr: 1e-3\nmin_lr: 1E-5\n"
                                                          "iters: 1e4\nwarmup_iters: 3.0\n"))
    assert cfg.lr == 0.001 and cfg.min_lr == 1e-5
    assert cfg.iters == 10000 and type(cfg.iters) is int
    assert cfg.warmup_iters == 3 and type(cfg.warmup_iters) is int


def test_recipe_booleans_are_yaml_booleans(tmp_path):
    assert parse(TrainConfig, "--config", recipe(tmp_path, "aux: false\n")).aux is False
    assert parse(TrainConfig, "--config", recipe(tmp_path, "photometric: true\n")).photometric


def test_a_flag_overrides_a_bad_recipe_value(tmp_path):
    cfg = parse(TrainConfig, "--config", recipe(tmp_path, "lr: -1\n"), "--lr", "0.1")
    assert cfg.lr == 0.1


def test_bare_resume_means_auto():
    assert parse(TrainConfig, "--dataset", "mini", "--resume").resume == "auto"
    assert parse(TrainConfig, "--resume", "--dataset", "mini").resume == "auto"
    assert parse(TrainConfig, "--dataset", "mini", "--resume", "auto").resume == "auto"
    assert parse(TrainConfig, "--dataset", "mini", "--resume", "r/last.pt").resume == "r/last.pt"
    assert parse(TrainConfig, "--dataset", "mini").resume is None
    assert parse(PretrainConfig, "--dataset", "mini", "--resume").resume == "auto"


@pytest.mark.parametrize("command,shown", [
    ("train", "--dataset {ade20k,cityscapes,folder,mini,coco}"),
    ("train", "--model {deeplabv3,faster_rcnn,mask_rcnn,cascade_rcnn,cascade_mask_rcnn}"),
    ("train", "--output-stride {8,16,32}"),
    ("train", "cpu, cuda or cuda:N"),
    ("train", "SGD momentum [>= 0 and < 1]"),
    ("eval", "--mode {whole,slide}"),
    ("eval", "--split {train,val,test}"),
    ("export", "--format {pt2,aoti,onnx,openvino,torchscript}"),
    ("pretrain", "--auto-augment {autoaugment,randaugment,none}"),
    ("pretrain", "--dataset {imagenet,mini}"),
    ("bench", "--mode {infer,train}"),
])
def test_help_shows_the_allowed_values(command, shown):
    parser, _ = build_parser()
    text = parser._subparsers._group_actions[0].choices[command].format_help()
    assert shown in " ".join(text.split())


@pytest.mark.parametrize("cls,given", [
    *[(TrainConfig, {"dataset": name, "iters": 10}) for name in DATASET_PRESETS],
    (PretrainConfig, {"dataset": "mini"}),
    (PretrainConfig, {"dataset": "imagenet", "data_root": "x"}),
    (EvalConfig, {"checkpoint": "x.pt"}),
    (PredictConfig, {"checkpoint": "x.pt", "inputs": ["a.png"]}),
    (ExportConfig, {"checkpoint": "x.pt"}),
    (BenchConfig, {}),
    (DemoConfig, {}),
])
def test_defaults_and_presets_pass_their_own_checks(cls, given):
    presets = {TrainConfig: DATASET_PRESETS, PretrainConfig: PRETRAIN_PRESETS}.get(cls)
    cfg = resolve_config(cls, given, presets)
    assert validate_config(cfg) == cfg


def test_every_constraint_key_is_one_the_validator_knows():
    known = {"help", "required", "renamed_from", "const", "min", "above", "max", "below",
             "choices", "pattern", "default_shown"}
    for cls in (TrainConfig, EvalConfig, PredictConfig, ExportConfig, PretrainConfig,
                BenchConfig, DemoConfig):
        for f in fields(cls):
            assert set(f.metadata) <= known, (cls.__name__, f.name)


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
@pytest.mark.parametrize("backbone", ["resnest14", "resnest50_fast_2s2x40d",
                                      "resnest50_fast_1s4x24d", "resnet50d"])
def test_stage_width_rule_matches_what_the_model_builds(backbone):
    # On the meta device: the constructor's checks run, no memory is allocated.
    for width in range(1, 17):
        try:
            with torch.device("meta"):
                create_model(backbone, num_classes=2, stage_width=width, stem_width=4)
            builds = True
        except (ValueError, RuntimeError, ZeroDivisionError):
            builds = False
        assert stage_width_fits(RESNEST_VARIANTS[backbone], width) == builds, width
