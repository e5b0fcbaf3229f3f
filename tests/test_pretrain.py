"""Classification pretraining: recipe pieces, checkpoints, resume and the hand-off to
segmentation. Runs use a tiny generated ImageFolder and a tiny ResNeSt-14 on the CPU."""

from __future__ import annotations

import dataclasses
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import segnest.tasks.classification.task as train_cls
from segnest import create_model, load_pretrained
from segnest.commands.config import resolve_config
from segnest.data.classification import build_classification_dataset, build_transforms
from segnest.data.sampling import SeededSamples
from segnest.engine import state as run_state
from segnest.engine.optim import build_param_groups
from segnest.errors import SegnestError
from segnest.models import model_from_checkpoint
from segnest.models.resnest import Bottleneck
from segnest.runtime.checkpoint import load_checkpoint
from segnest.tasks.classification.config import PRETRAIN_PRESETS, PretrainConfig
from segnest.tasks.classification.task import (
    build_batch_mixer,
    model_kwargs,
    run_pretrain,
    topk_correct,
)

CLASSES = ("blue", "green", "red")
SIZE = 32


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """train/ (8 per class) and val/ (4 per class) of 32 px images tinted by class."""
    root = tmp_path_factory.mktemp("imagefolder")
    rng = np.random.default_rng(0)
    for split, count in (("train", 8), ("val", 4)):
        for index, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True)
            for number in range(count):
                pixels = rng.integers(0, 120, (SIZE, SIZE, 3))
                pixels[..., 2 - index] += 120
                Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{number}.png")
    return root


def tiny_config(data: Path, work_dir: Path, **overrides) -> PretrainConfig:
    values = dict(dataset="imagenet", data_root=str(data), backbone="resnest14", stage_width=8,
                  stem_width=8, crop_size=SIZE, crop_pct=1.0, batch_size=8, epochs=1,
                  warmup_epochs=0.5, workers=0, tensorboard=False, work_dir=str(work_dir),
                  device="cpu")
    return PretrainConfig(**{**values, **overrides})


def test_optimizer_gives_no_decay_to_exactly_norm_parameters_and_biases():
    model = create_model("resnest14", num_classes=3, stage_width=8, stem_width=8)
    groups = build_param_groups(model, lr=0.1, weight_decay=1e-4, no_decay_norm=True)
    decay = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    names = dict(model.named_parameters())
    assert len(decay) == len(names)
    # ResNeSt-14: the deep stem's two BNs and bn1, then per block its BNs, Split-Attention's
    # BNs and fc biases, the shortcut BN, and the classifier's bias.
    expected = {"conv1.1.weight", "conv1.1.bias", "conv1.4.weight", "conv1.4.bias",
                "bn1.weight", "bn1.bias", "fc.bias"}
    for stage in range(1, 5):
        expected |= {f"layer{stage}.0.{name}" for name in (
            "bn1.weight", "bn1.bias", "conv2.bn0.weight", "conv2.bn0.bias", "conv2.fc1.bias",
            "conv2.bn1.weight", "conv2.bn1.bias", "conv2.fc2.bias", "bn3.weight", "bn3.bias",
            "downsample.2.weight", "downsample.2.bias")}
    no_decay = {name for name, param in names.items() if decay[id(param)] == 0.0}
    assert no_decay == expected
    assert all(decay[id(names[name])] == 1e-4 for name in set(names) - expected)


def test_pretraining_model_starts_with_zero_last_gamma_in_every_block(tmp_path):
    cfg = PretrainConfig(backbone="resnest14", stage_width=8, stem_width=8)
    model = create_model(cfg.backbone, **model_kwargs(cfg, 3))
    blocks = [m for m in model.modules() if isinstance(m, Bottleneck)]
    assert blocks and all(torch.count_nonzero(b.bn3.weight) == 0 for b in blocks)
    # Other norms are untouched, so the network is not dead.
    assert torch.all(model.bn1.weight == 1)
    no_gamma = dataclasses.replace(cfg, last_gamma=False)
    plain = create_model(cfg.backbone, **model_kwargs(no_gamma, 3))
    assert all(torch.all(m.bn3.weight == 1) for m in plain.modules() if isinstance(m, Bottleneck))


def test_mixup_gives_soft_targets_that_sum_to_one_with_the_image_mixing_coefficient():
    torch.manual_seed(0)
    num_classes = 6
    images = torch.rand(6, 3, 8, 8)
    labels = torch.arange(6)  # distinct labels: the coefficient can be read off the target
    mixed, soft = build_batch_mixer(0.2, 0.0, num_classes)(images, labels)
    assert soft.shape == (6, num_classes)
    torch.testing.assert_close(soft.sum(dim=1), torch.ones(6))
    lam = soft[0, 0]
    assert 0.0 <= lam <= 1.0
    # Each sample is mixed with its predecessor in the batch, with the same coefficient.
    torch.testing.assert_close(soft, lam * nn.functional.one_hot(labels, num_classes)
                               + (1 - lam) * nn.functional.one_hot(labels.roll(1), num_classes))
    torch.testing.assert_close(mixed, lam * images + (1 - lam) * images.roll(1, 0))


def test_cutmix_target_weight_equals_the_fraction_of_pixels_kept():
    torch.manual_seed(1)
    images = torch.rand(4, 3, 16, 16)
    labels = torch.tensor([0, 1, 2, 3])
    mixed, soft = build_batch_mixer(0.0, 1.0, 4)(images, labels)
    torch.testing.assert_close(soft.sum(dim=1), torch.ones(4))
    kept = (mixed == images).all(dim=1).float().mean(dim=(1, 2))
    torch.testing.assert_close(soft[torch.arange(4), labels], kept)


def test_mixup_and_cutmix_together_pick_one_per_batch_and_no_mixer_when_both_off():
    assert build_batch_mixer(0.0, 0.0, 4) is None
    torch.manual_seed(2)
    _, soft = build_batch_mixer(0.2, 1.0, 4)(torch.rand(4, 3, 8, 8), torch.arange(4))
    torch.testing.assert_close(soft.sum(dim=1), torch.ones(4))


def test_label_smoothing_applies_on_top_of_mixed_soft_targets():
    logits = torch.randn(4, 5)
    soft = torch.softmax(torch.randn(4, 5), dim=1)
    smoothed = nn.CrossEntropyLoss(label_smoothing=0.1)(logits, soft)
    expected = nn.CrossEntropyLoss()(logits, soft * 0.9 + 0.1 / 5)
    torch.testing.assert_close(smoothed, expected)


def test_topk_counts_hits_among_the_k_best_logits():
    logits = torch.tensor([[3.0, 2.0, 1.0], [1.0, 2.0, 3.0], [2.0, 3.0, 1.0]])
    assert topk_correct(logits, torch.tensor([0, 1, 2]), (1, 2)) == [1, 2]


def test_mini_preset_fills_what_the_user_did_not_give():
    cfg = resolve_config(PretrainConfig, {"dataset": "mini", "epochs": 3, "stage_width": 8},
                         PRETRAIN_PRESETS)
    assert (cfg.backbone, cfg.crop_size, cfg.crop_pct) == ("resnest14", 64, 1.0)
    assert (cfg.epochs, cfg.stage_width) == (3, 8)
    # A flag typed at its built-in default still wins over the preset.
    typed = resolve_config(PretrainConfig, {"dataset": "mini", "epochs": 270}, PRETRAIN_PRESETS)
    assert typed.epochs == 270
    assert (resolve_config(PretrainConfig, {"data_root": "x"}, PRETRAIN_PRESETS)
            == PretrainConfig(data_root="x"))


def test_user_errors_are_segnest_errors(tmp_path, image_folder):
    with pytest.raises(SegnestError, match="--data-root"):
        run_pretrain(PretrainConfig(dataset="imagenet", device="cpu"))
    if not torch.cuda.is_available():
        with pytest.raises(SegnestError, match="--amp"):
            run_pretrain(tiny_config(image_folder, tmp_path, amp=True))


def test_pretrained_backbone_loads_into_segmentation_model(tmp_path, image_folder):
    export = tmp_path / "backbone.pth"
    result = run_pretrain(tiny_config(image_folder, tmp_path / "run", export=str(export),
                                      tensorboard=True))
    checkpoint = load_checkpoint(result["last"])
    assert checkpoint["task"] == "classification"
    assert checkpoint["classes"] == list(CLASSES)
    assert (checkpoint["epoch"], checkpoint["iteration"]) == (1, 3)
    assert checkpoint["model_kwargs"]["num_classes"] == 3
    assert Path(result["best"]).is_file()
    assert list((tmp_path / "run" / "tb" / "pretrain").glob("events.out.tfevents.*"))
    trained = {k: v for k, v in checkpoint["model"].items() if not k.startswith("fc.")}

    exported = load_checkpoint(export)
    assert set(exported) == set(trained) and "conv1.0.weight" in exported
    for path in (export, Path(result["last"])):
        seg = create_model("deeplabv3_resnest14", num_classes=5, stage_width=8, stem_width=8,
                           head_channels=16)
        load_pretrained(seg, path)
        seg_backbone = seg.backbone.state_dict()
        assert set(seg_backbone) == set(trained)
        for key, value in trained.items():
            assert torch.equal(seg_backbone[key], value), key
    backbone = create_model("resnest14", output_stride=8, stage_width=8, stem_width=8)
    load_pretrained(backbone, export)
    assert torch.equal(backbone.conv1[0].weight, trained["conv1.0.weight"])

    classifier = model_from_checkpoint(checkpoint, task="classification").eval()
    assert classifier.fc.out_features == 3
    assert torch.equal(classifier.state_dict()["fc.weight"], checkpoint["model"]["fc.weight"])


def test_resumed_run_ends_with_the_same_weights_as_an_uninterrupted_one(tmp_path, image_folder,
                                                                          monkeypatch):
    recipe = dict(epochs=2, mixup=0.2, auto_augment="randaugment")
    straight = run_pretrain(tiny_config(image_folder, tmp_path / "straight", **recipe))

    real_train_one_step = train_cls.train_one_step
    steps = []

    def crash_in_second_epoch(*args, **kwargs):
        steps.append(1)
        if len(steps) == 4:  # 3 iterations per epoch: the first step of epoch 2
            raise KeyboardInterrupt
        return real_train_one_step(*args, **kwargs)

    monkeypatch.setattr(train_cls, "train_one_step", crash_in_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        run_pretrain(tiny_config(image_folder, tmp_path / "resumed", **recipe))
    monkeypatch.setattr(train_cls, "train_one_step", real_train_one_step)
    assert load_checkpoint(tmp_path / "resumed" / "last.pt")["epoch"] == 1
    resumed = run_pretrain(tiny_config(image_folder, tmp_path / "resumed", resume="auto",
                                       **recipe))

    assert resumed["iterations"] == straight["iterations"] == 6
    assert resumed["top1"] == straight["top1"]
    assert resumed["best_top1"] == straight["best_top1"]
    expected = load_checkpoint(straight["last"])
    actual = load_checkpoint(resumed["last"])
    for key, value in expected["model"].items():
        assert torch.equal(actual["model"][key], value), key
    for key, value in expected["optimizer"]["state"].items():
        assert torch.equal(actual["optimizer"]["state"][key]["momentum_buffer"],
                           value["momentum_buffer"])
    assert actual["scheduler"] == expected["scheduler"]


def test_ctrl_c_mid_epoch_saves_and_resuming_matches_an_uninterrupted_run(tmp_path, image_folder,
                                                                         monkeypatch):
    # 24 images, batch 8: 3 iterations per epoch; Ctrl-C lands at iteration 4 of 6.
    recipe = dict(epochs=2, mixup=0.2, auto_augment="randaugment", checkpoint_interval=0)
    straight = run_pretrain(tiny_config(image_folder, tmp_path / "straight", **recipe))

    real_train_one_step = train_cls.train_one_step
    steps = []

    def ctrl_c_at_iteration_4(*args, **kwargs):
        scalars = real_train_one_step(*args, **kwargs)
        steps.append(1)
        if len(steps) == 4:
            os.kill(os.getpid(), signal.SIGINT)  # caught: finish the step, save, stop
        return scalars

    monkeypatch.setattr(train_cls, "train_one_step", ctrl_c_at_iteration_4)
    # Data workers in the interrupted and resumed runs, none in the straight one: the
    # augmentation of a sample must not depend on which process loads it.
    stopped = run_pretrain(tiny_config(image_folder, tmp_path / "resumed", workers=2, **recipe))
    monkeypatch.setattr(train_cls, "train_one_step", real_train_one_step)
    assert stopped["interrupted"] and stopped["iterations"] == 4
    saved = load_checkpoint(tmp_path / "resumed" / "last.pt")
    assert saved["iteration"] == 4 and saved["epoch"] == 1
    resumed = run_pretrain(tiny_config(image_folder, tmp_path / "resumed", workers=2,
                                       resume="auto", **recipe))

    assert resumed["iterations"] == straight["iterations"] == 6
    expected, actual = load_checkpoint(straight["last"]), load_checkpoint(resumed["last"])
    for key, value in expected["model"].items():
        assert torch.equal(actual["model"][key], value), key
    assert resumed["top1"] == straight["top1"]


def test_checkpoint_interval_saves_within_epochs(tmp_path, image_folder, monkeypatch):
    saved = []
    real_save = run_state.save_checkpoint

    def record(state, path):
        saved.append((Path(path).name, state["iteration"]))
        return real_save(state, path)

    monkeypatch.setattr(run_state, "save_checkpoint", record)
    run_pretrain(tiny_config(image_folder, tmp_path / "run", epochs=2, checkpoint_interval=2))
    assert [it for name, it in saved if name == "last.pt"] == [2, 3, 4, 6]


def test_resume_with_another_batch_size_is_refused(tmp_path, image_folder):
    run_pretrain(tiny_config(image_folder, tmp_path / "run"))
    with pytest.raises(SegnestError, match="trained with --batch-size 8, this run has 4"):
        run_pretrain(tiny_config(image_folder, tmp_path / "run", batch_size=4, resume="auto"))


def test_seeded_samples_depend_on_seed_epoch_and_index_only(image_folder):
    train_transform, _ = build_transforms(SIZE, 1.0, "randaugment", (0.08, 1.0))
    dataset = build_classification_dataset(image_folder, "train", train_transform)
    seeded = SeededSamples(dataset, seed=3)
    seeded.set_epoch(1)
    torch.manual_seed(0)
    first = seeded[5][0]
    state = torch.get_rng_state()
    torch.manual_seed(123)
    seeded[2]
    assert torch.equal(seeded[5][0], first), "same sample whatever was drawn before"
    torch.manual_seed(0)
    seeded[5]
    assert torch.equal(torch.get_rng_state(), state), "the caller's generator is untouched"
    seeded.set_epoch(2)
    assert not torch.equal(seeded[5][0], first), "a new epoch gives new augmentations"


def test_pretrain_export_onto_a_checkpoint_or_a_folder_is_refused_before_pretraining(
        tmp_path, image_folder, monkeypatch):
    """segnest pretrain --export runs/f1/best.pt would replace a segmentation checkpoint
    with a bare backbone after the whole pretraining (#25 item 2)."""
    from segnest.runtime.checkpoint import save_checkpoint

    segmentation = tmp_path / "runs" / "f1" / "best.pt"
    save_checkpoint({"iteration": 5, "config": {"lr": 0.1}, "optimizer": {},
                     "model": {"w": torch.ones(2)}}, segmentation)
    before = segmentation.read_bytes()
    folder = tmp_path / "exports"
    folder.mkdir()

    def no_work(*args, **kwargs):
        raise AssertionError("pretraining started before --export was checked")

    monkeypatch.setattr(train_cls, "build_classification_dataset", no_work)
    for target, says in ((segmentation, "segnest training checkpoint"),
                         (folder, "is a folder"),
                         (tmp_path / "work" / "best.pt", "this run's best.pt")):
        with pytest.raises(SegnestError, match=says):
            run_pretrain(tiny_config(image_folder, tmp_path / "work", export=str(target)))
    assert segmentation.read_bytes() == before
    assert not (tmp_path / "work" / "last.pt").exists()


def test_pretrain_data_is_now_data_root_and_the_old_flag_still_works(capsys):
    from segnest.cli import build_parser

    parser, _ = build_parser()
    args = parser.parse_args(["pretrain", "--data", "/x"])
    assert args.data_root == "/x"
    assert "flag '--data' is renamed '--data-root'" in capsys.readouterr().err


def test_no_flag_is_spelled_no_no():
    from segnest.cli import build_parser

    parser, _ = build_parser()
    for command in ("train", "pretrain"):
        text = parser._subparsers._group_actions[0].choices[command].format_help()
        assert "--no-no-" not in text
    assert parser.parse_args(["train", "--no-decay-norm"]).no_decay_norm is True


def test_pretraining_hparams_rows_are_named_apart_and_show_the_columns_that_matter(
        tmp_path, image_folder):
    """As for segmentation: TensorBoard sorts HParams columns by name and shows the first
    five, so those five are the settings that tell pretraining runs apart; the metrics are
    the pretraining headline; two runs' rows have different names."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    from segnest.inference.tensorboard import PRETRAINING_TAGS

    names = []
    for run, overrides in (("a", {"mixup": 0.0}), ("b", {"mixup": 0.2, "cutmix": 1.0})):
        run_pretrain(tiny_config(image_folder, tmp_path / run, tensorboard=True, **overrides))
        events = EventAccumulator(str(tmp_path / run / "tb" / "pretrain")).Reload()
        content = events.PluginTagToContent("hparams")
        data = plugin_data_pb2.HParamsPluginData
        experiment = data.FromString(content["_hparams_/experiment"]).experiment
        start = data.FromString(content["_hparams_/session_start_info"]).session_start_info
        names.append(start.group_name)
        columns = [info.name for info in experiment.hparam_infos]
        assert sorted(columns)[:5] == ["backbone", "crop", "epochs", "lr", "mixing"]
        assert "amp" not in columns and len(columns) == 6
        values = {key: value.string_value or value.number_value
                  for key, value in start.hparams.items()}
        assert values["backbone"] == "resnest14" and values["crop"] == SIZE
        # the learning rate the run computed for its batch, not "default"
        assert values["lr"] == pytest.approx(0.1 * 8 / 256)
        assert values["total_batch"] == 8
        assert values["mixing"] == ("none" if run == "a" else "mixup 0.2+cutmix 1")
        assert [info.name.tag for info in experiment.metric_infos] == list(PRETRAINING_TAGS)
    assert names[0] != names[1]
    assert names[0][8:].startswith(" pretrain a ") and names[1][8:].startswith(" pretrain b ")
