"""--help shows the numbers a run will use where the run computes a default (the learning
rate from the batch, the stem width from the backbone, ...), with the rule in words, and
those numbers are the ones the code computes."""

import re

import pytest

from segnest.cli import build_parser
from segnest.presets import DATASET_PRESETS
from segnest.tasks.classification.config import PretrainConfig
from segnest.tasks.segmentation.config import TrainConfig


def help_text(command: str, flat: bool = True) -> str:
    parser, _ = build_parser()
    text = parser._subparsers._group_actions[0].choices[command].format_help()
    return " ".join(text.split()) if flat else text


def flag_help(command: str, flag: str) -> str:
    """The help of one flag: its entry's lines, up to the next entry or section."""
    lines = help_text(command, flat=False).splitlines()
    start = next(i for i, line in enumerate(lines) if re.match(rf"  {flag}\b", line))
    end = next((i for i in range(start + 1, len(lines))
                if not lines[i].startswith(" " * 5)), len(lines))
    return " ".join(" ".join(lines[start:end]).split())


def test_train_lr_shows_the_number_the_run_computes_and_the_rule():
    from segnest.tasks.segmentation.task import default_lr

    lr = default_lr(TrainConfig(), world_size=1)
    shown = flag_help("train", "--lr")
    assert f"(default: {lr:g} at batch {TrainConfig.batch_size} on one process: lr = 0.01 x " \
           "total batch / 16; detection models: 0.02 x total batch / 16; mini: 0.02; folder " \
           "without a GPU: 0.02; mini detection: 0.02)" in shown
    assert default_lr(TrainConfig(batch_size=16), world_size=1) == 0.01


def test_pretrain_lr_shows_the_number_the_run_computes_and_the_rule():
    from segnest.tasks.classification.task import ClassificationTask

    task = ClassificationTask()
    task.cfg = PretrainConfig()
    lr = task.default_lr(world_size=1)
    assert (f"(default: {lr:g} at batch {PretrainConfig.batch_size} on one process: lr = 0.1 x "
            "total batch / 256; mini: 0.05)") in flag_help("pretrain", "--lr")


@pytest.mark.parametrize("command", ["train", "pretrain"])
def test_stem_width_names_each_backbones_own_width(command):
    from segnest.models.resnest import RESNEST_VARIANTS

    shown = flag_help(command, "--stem-width")
    by_width = {}
    for name, variant in RESNEST_VARIANTS.items():
        by_width.setdefault(variant["stem_width"], []).append(name)
    assert sorted(by_width) == [32, 64]
    assert by_width[64] == ["resnest101", "resnest200", "resnest269"]
    assert "64 for resnest101/200/269" in shown
    assert "32 for resnest14/26/50, the resnest50_fast variants and resnet50d/101d" in shown
    assert all(name.startswith(("resnest14", "resnest26", "resnest50", "resnet50d",
                                "resnet101d")) for name in by_width[32])


def test_derived_defaults_of_train_are_numbers():
    from segnest.data.transforms import MEAN, STD
    from segnest.tasks.segmentation.losses import OHEM_MIN_KEPT_SHARE

    assert "(default: 8)" in flag_help("train", "--output-stride")
    assert "(default: 256; mini: 64; folder without a GPU: 64)" in flag_help(
        "train", "--head-channels")
    kept = int(OHEM_MIN_KEPT_SHARE * TrainConfig.batch_size * 480 * 480)
    assert f"ade20k: {kept};" in flag_help("train", "--ohem-min-kept")
    mini = DATASET_PRESETS["mini"]
    assert f"mini: {int(OHEM_MIN_KEPT_SHARE * mini['batch_size'] * 96 * 96)}" in flag_help(
        "train", "--ohem-min-kept")
    # The segmentation task validates every total_iters // 10 iterations.
    assert (f"a tenth of the run: ade20k: 18 epochs; cityscapes: 24 epochs; folder: 5 epochs; "
            f"mini: {mini['iters'] // 10} iterations") in flag_help("train", "--val-interval")
    assert "(default: from --epochs; mini: 900; coco: 90000; mini detection: 800)" in \
        flag_help("train", "--iters")
    assert ",".join(map(str, MEAN)) in flag_help("train", "--mean")
    assert ",".join(map(str, STD)) in flag_help("train", "--std")
    assert ("runs/ade20k_resnest50; mini: runs/mini_resnest14; folder without a GPU: "
            "runs/folder_resnest14") in flag_help("train", "--work-dir")
    assert "runs/pretrain_imagenet_resnest50; mini: runs/pretrain_mini_resnest14" in flag_help(
        "pretrain", "--work-dir")


@pytest.mark.parametrize("command", ["train", "pretrain"])
def test_no_default_is_a_rule_without_its_number(command):
    """The spellings that once stood where a number belongs."""
    text = help_text(command)
    for rule in ("the model's", "the variant's", "times per run", "(default 0.", "(default 8"):
        assert rule not in text, rule


def test_train_lr_help_states_the_detection_rule_the_detection_task_computes_with():
    from segnest.tasks.detection.config import DETECTION_LR_RULE

    lr, batch = DETECTION_LR_RULE
    assert f"detection models: {lr:g} x total batch / {batch};" in \
        flag_help("train", "--lr")
