"""segnest train's presets derived from the data and the machine
(segnest.tasks.segmentation.presets)."""

import os

from conftest import write_folder_dataset
from PIL import Image

from segnest.presets import DATASET_PRESETS
from segnest.tasks.segmentation.config import TrainConfig
from segnest.tasks.segmentation.presets import (
    folder_sizes,
    median_long_side,
    resolve_train_config,
)


def _resolve(**given):
    return resolve_train_config(TrainConfig, {"iters": 10, **given}, DATASET_PRESETS)


def test_folder_sizes_follow_the_median_long_side_of_the_train_images(tmp_path):
    root = write_folder_dataset(tmp_path / "data", n_train=5, size=40)  # 40..48 px
    for i, side in enumerate((100, 130, 131, 200, 300)):
        Image.new("RGB", (side, side // 2)).save(root / "images" / "train" / f"img{i}.png")
    assert median_long_side(root / "images" / "train") == 131
    cfg = _resolve(dataset="folder", data_root=str(root))
    assert (cfg.base_size, cfg.crop_size) == (128, 128)


def test_derived_crop_is_capped_and_never_below_the_smallest_input():
    assert folder_sizes(1000) == {"base_size": 1000, "crop_size": 480}
    assert folder_sizes(20) == {"base_size": 32, "crop_size": 32}


def test_flags_and_recipe_win_over_derived_sizes(tmp_path):
    root = write_folder_dataset(tmp_path / "data", n_train=3, size=60)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("base_size: 96\n")
    cfg = _resolve(dataset="folder", data_root=str(root), config=str(recipe), crop_size=40)
    assert (cfg.base_size, cfg.crop_size) == (96, 40)


def test_without_readable_images_the_static_folder_preset_stays(tmp_path):
    cfg = _resolve(dataset="folder", data_root=str(tmp_path / "missing"))
    assert cfg.crop_size == DATASET_PRESETS["folder"]["crop_size"]


def test_a_crop_far_larger_than_the_images_is_named(tmp_path, capsys):
    root = write_folder_dataset(tmp_path / "data", n_train=3, size=60)
    _resolve(dataset="folder", data_root=str(root), crop_size=480, base_size=480)
    err = capsys.readouterr().err
    assert "the train images are ~6" in err and "but --crop-size is 480" in err
    assert "use --crop-size 64" in err


def test_default_workers_are_capped_at_the_cores_silently(monkeypatch, capsys):
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert _resolve(dataset="ade20k").workers == 2
    assert "warning" not in capsys.readouterr().err


def test_workers_asked_above_the_cores_are_kept_with_a_warning(monkeypatch, capsys):
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert _resolve(dataset="ade20k", workers=6).workers == 6
    assert "--workers 6 is more than the 2 CPU cores" in capsys.readouterr().err


def test_without_a_gpu_the_folder_preset_trains_the_cpu_model(tmp_path, capsys):
    from segnest.presets import CPU_MODEL

    root = write_folder_dataset(tmp_path / "d", n_train=4, n_val=2)
    cfg = resolve_train_config(TrainConfig, dict(dataset="folder", data_root=str(root),
                                                 device="cpu"), DATASET_PRESETS)
    assert cfg.epochs == 50 and cfg.iters is None  # no length given: the preset's
    assert {k: getattr(cfg, k) for k in CPU_MODEL} == CPU_MODEL
    assert "no GPU: the folder preset trains the small CPU model" in capsys.readouterr().out
    # A chosen backbone, pretrained weights or a GPU keep the static preset's model.
    for given in (dict(backbone="resnest50"), dict(pretrained="w.pth"), dict(device="cuda")):
        cfg = _resolve(dataset="folder", data_root=str(root), **given)
        assert cfg.backbone == given.get("backbone", TrainConfig.backbone)
        assert cfg.batch_size == TrainConfig.batch_size
    cfg = _resolve(dataset="folder", data_root=str(root), device="cpu", batch_size=4)
    assert cfg.backbone == "resnest14" and cfg.batch_size == 4  # a flag still wins


def _cache_timm_resnest14(hub_cache):
    """timm's ResNeSt-14 ImageNet file where huggingface_hub keeps it (random weights)."""
    import hashlib

    import torch

    from segnest.models import create_model

    folder = hub_cache / "models--timm--resnest14d.gluon_in1k"
    (folder / "blobs").mkdir(parents=True)
    saved = folder / "saved"
    torch.manual_seed(0)
    torch.save(create_model("resnest14", num_classes=1000).state_dict(), saved)
    blob = folder / "blobs" / hashlib.sha256(saved.read_bytes()).hexdigest()
    saved.rename(blob)
    snapshot = folder / "snapshots" / ("ab" * 20)
    snapshot.mkdir(parents=True)
    (snapshot / "pytorch_model.bin").symlink_to(blob)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text("ab" * 20)


def test_the_cpu_folder_preset_takes_cached_imagenet_weights_and_says_which(
        tmp_path, capsys, monkeypatch):
    from segnest.tasks.segmentation.presets import CPU_PRETRAINED

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    root = write_folder_dataset(tmp_path / "d", n_train=4, n_val=2)
    given = dict(dataset="folder", data_root=str(root), device="cpu")
    _resolve(**given)
    said = capsys.readouterr().out
    assert "from scratch" in said and f"--pretrained {CPU_PRETRAINED}" in said
    _cache_timm_resnest14(tmp_path / "hub")
    cfg = _resolve(**given)
    assert cfg.pretrained == CPU_PRETRAINED and cfg.backbone == "resnest14"
    assert cfg.stage_width == TrainConfig.stage_width and cfg.stem_width is None
    assert f"from ImageNet weights found in the cache ({CPU_PRETRAINED}" in capsys.readouterr().out


def test_named_weights_pick_their_backbone_unless_one_is_given(tmp_path):
    root = write_folder_dataset(tmp_path / "d", n_train=4, n_val=2)
    cfg = _resolve(dataset="folder", data_root=str(root), pretrained="timm:resnest26d")
    assert cfg.backbone == "resnest26"
    cfg = _resolve(dataset="ade20k", pretrained="resnest101")
    assert cfg.backbone == "resnest101"
    cfg = _resolve(dataset="ade20k", pretrained="resnest101", backbone="resnest50")
    assert cfg.backbone == "resnest50"  # the user's choice stands (and fails to load, loudly)


def test_named_cpu_weights_get_the_cpu_presets_batch_and_lr(tmp_path, capsys):
    from segnest.presets import CPU_MODEL

    root = write_folder_dataset(tmp_path / "d", n_train=4, n_val=2)
    cfg = _resolve(dataset="folder", data_root=str(root), device="cpu",
                   pretrained="timm:resnest14d.gluon_in1k")
    assert (cfg.backbone, cfg.batch_size, cfg.lr) == ("resnest14", CPU_MODEL["batch_size"],
                                                      CPU_MODEL["lr"])
    assert cfg.stage_width == TrainConfig.stage_width  # the width the weights fit
    assert "from ImageNet weights (timm:resnest14d.gluon_in1k;" in capsys.readouterr().out
