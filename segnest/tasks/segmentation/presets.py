"""``segnest train``'s presets adapted to the data and the machine before the flags are read.

The static presets (``segnest.presets.DATASET_PRESETS``) cannot know a user's images or
cores. Two values are derived here and enter the merge *as preset values*, so a recipe or a
flag always wins over them (precedence: defaults < derived preset < recipe < command line):

- ``--dataset folder``: ``base_size`` = the median long side of the train images (read from
  the file headers of at most ``SIZE_SAMPLES`` of them, evenly spread, nothing decoded),
  rounded to a multiple of 8; ``crop_size`` = that rounded down to a multiple of 8, at most
  480 (the paper's ADE20K crop) and at least ``MIN_INPUT_SIZE``. Without readable images the
  static preset stays.
- ``workers``: the preset's or default number, capped at the CPU count. A number the user
  gave is kept; above the CPU count it gets one warning line.
- ``--dataset folder`` on a machine without a GPU: the model and batch of
  ``segnest.presets.CPU_MODEL`` (the demo's ResNeSt-14: minutes per run on two cores, where
  ResNeSt-50 takes over a second per step), unless the user chose a backbone or gave
  ``--pretrained`` (whose weights fit their own backbone) or a CUDA ``--device``. When
  timm's ImageNet ResNeSt-14 (``CPU_PRETRAINED``) is in the Hugging Face cache, the preset
  takes it instead: the same depth at the published width (slower per step, far better on
  a few dozen images than random weights); ``--pretrained`` naming those weights gets the
  same model and batch. Nothing is downloaded for a preset.
- ``--pretrained NAME`` (named weights) without ``--backbone``: the backbone they fit.

A crop much larger than the images (median long side below half the crop) is named once
the final settings are known: every crop would then be mostly padding or upscaling.
"""

from __future__ import annotations

import os
import statistics
import sys
import warnings
from pathlib import Path
from typing import Any

from PIL import Image

from segnest.commands.config import load_recipe, resolve_config
from segnest.models.weights import NAMED_WEIGHTS, named_weights
from segnest.presets import CPU_MODEL, DATASET_PRESETS
from segnest.schema import MIN_INPUT_SIZE
from segnest.tasks.segmentation.config import TrainConfig

# Enough headers for a stable median; reading them costs milliseconds even on a network disk.
SIZE_SAMPLES = 300
# The largest derived crop: the paper's ADE20K crop, already costly on one GPU.
MAX_DERIVED_CROP = 480
SIZE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".npy")


def _header_size(path: Path) -> tuple[int, int] | None:
    """(width, height) from the file header without decoding the pixels; None if unreadable."""
    try:
        if path.suffix.lower() == ".npy":
            import numpy as np

            shape = np.load(path, mmap_mode="r").shape
            return int(shape[1]), int(shape[0])
        with Image.open(path) as image, warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return image.size
    except (OSError, ValueError, SyntaxError, IndexError, Image.DecompressionBombError):
        return None


def median_long_side(image_dir: Path, samples: int = SIZE_SAMPLES) -> int | None:
    """The median long side of the images in ``image_dir`` (at most ``samples`` files, evenly
    spread over the sorted names); None when there are none to read."""
    if not image_dir.is_dir():
        return None
    files = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in SIZE_SUFFIXES)
    if len(files) > samples:
        files = [files[i * len(files) // samples] for i in range(samples)]
    sizes = [size for size in map(_header_size, files) if size is not None]
    return int(statistics.median(max(size) for size in sizes)) if sizes else None


def folder_sizes(long_side: int) -> dict[str, int]:
    """``base_size`` and ``crop_size`` for images whose median long side is ``long_side``."""
    base = max(MIN_INPUT_SIZE, 8 * round(long_side / 8))
    crop = max(MIN_INPUT_SIZE, min(MAX_DERIVED_CROP, 8 * (base // 8)))
    return {"base_size": base, "crop_size": crop}


def _user_values(given: dict[str, Any]) -> dict[str, Any]:
    """What the user set: the recipe's keys, then the command line's over them."""
    recipe = load_recipe(given["config"], TrainConfig) if given.get("config") else {}
    return {**recipe, **given}


def _without_gpu(user: dict[str, Any]) -> bool:
    """Whether this run trains on a CPU (asked for, or no CUDA device to be had)."""
    device = str(user.get("device") or "")
    if device.startswith("cuda"):
        return False
    if device == "cpu":
        return True
    import torch

    return not torch.cuda.is_available()


# ImageNet weights of CPU_MODEL's depth, taken by the CPU folder preset when cached.
CPU_PRETRAINED = "timm:resnest14d.gluon_in1k"


def _names_cpu_weights(user: dict[str, Any]) -> bool:
    """Whether ``--pretrained`` names ImageNet weights of CPU_MODEL's backbone."""
    weights = named_weights(user["pretrained"]) if user.get("pretrained") else None
    return weights is not None and weights.backbone == CPU_MODEL["backbone"]


def cpu_model_applies(user: dict[str, Any]) -> bool:
    """Whether the folder preset takes ``CPU_MODEL`` (or its pretrained form) for the
    settings in ``user``: a folder dataset without a GPU, no backbone chosen, and no
    ``--pretrained`` other than weights named for that backbone."""
    return (user.get("dataset") == "folder" and "backbone" not in user
            and (not user.get("pretrained") or _names_cpu_weights(user))
            and _without_gpu(user))


def cpu_pretrained_model(user: dict[str, Any]) -> dict[str, Any] | None:
    """``CPU_MODEL`` at the published width with ImageNet weights: those the user named,
    else ``CPU_PRETRAINED`` when it is in its cache already; None otherwise."""
    if _names_cpu_weights(user):
        name = user["pretrained"]
    elif NAMED_WEIGHTS[CPU_PRETRAINED].cached() is not None:
        name = CPU_PRETRAINED
    else:
        return None
    return {**CPU_MODEL, "stage_width": TrainConfig.stage_width, "stem_width": None,
            "pretrained": name}


def _named_backbone(user: dict[str, Any]) -> dict[str, Any]:
    """``{"backbone": ...}`` fitting named ``--pretrained`` weights when no backbone is given."""
    weights = named_weights(user["pretrained"]) if user.get("pretrained") else None
    return {} if weights is None or "backbone" in user else {"backbone": weights.backbone}


def train_presets(user: dict[str, Any], cpu_model: dict[str, Any] | None
                  ) -> tuple[dict[str, dict[str, Any]], int | None]:
    """(``DATASET_PRESETS`` adapted to this data root and machine, the median long side of
    the folder dataset's train images or None), for what the user set (``user``: recipe
    and flags) and the model the folder preset takes without a GPU (``cpu_model``)."""
    cores = os.cpu_count() or 1
    dataset = user.get("dataset", TrainConfig.dataset)
    preset = dict(DATASET_PRESETS.get(dataset, {}))
    preset["workers"] = min(preset.get("workers", TrainConfig.workers), cores)
    long_side = None
    if dataset == "folder" and user.get("data_root"):
        long_side = median_long_side(Path(user["data_root"]) / "images" / "train")
        if long_side is not None:
            preset.update(folder_sizes(long_side))
    preset.update(_named_backbone(user))
    if cpu_model:
        preset.update(cpu_model)
    return {**DATASET_PRESETS, dataset: preset}, long_side


def resolve_train_config(cls: type, given: dict[str, Any],
                         presets: dict[str, dict[str, Any]] | None = None) -> TrainConfig:
    """``resolve_config`` for ``segnest train`` with :func:`train_presets`; prints the derived
    values in one line and warns about crops far larger than the images."""
    resolve_config(cls, given, presets)  # a bad flag or recipe is reported before any file is read
    user = _user_values(given)
    cpu_model = None
    if cpu_model_applies(user):
        cpu_model = cpu_pretrained_model(user) or CPU_MODEL
    table, long_side = train_presets(user, cpu_model)
    cfg = resolve_config(cls, given, table)
    cores = os.cpu_count() or 1
    if "workers" in user and cfg.workers > cores:
        print(f"segnest: warning: --workers {cfg.workers} is more than the {cores} CPU cores; "
              "the loader processes will compete with training for them", file=sys.stderr)
    if long_side is not None:
        derived = {k: v for k, v in folder_sizes(long_side).items() if k not in user}
        if derived:
            shown = ", ".join(f"{k} {v}" for k, v in derived.items())
            print(f"segnest: folder preset from the train images (median long side "
                  f"{long_side} px): {shown}; workers {cfg.workers}")
        if cfg.crop_size > 2 * long_side:
            print(f"segnest: warning: the train images are ~{long_side} px but --crop-size is "
                  f"{cfg.crop_size}: each crop is mostly padding and upscaling; use "
                  f"--crop-size {folder_sizes(long_side)['crop_size']}", file=sys.stderr)
    if cpu_model is CPU_MODEL:
        print("segnest: no GPU: the folder preset trains the small CPU model ("
              + ", ".join(f"{k} {v}" for k, v in CPU_MODEL.items() if k not in user)
              + f") from scratch; ImageNet weights for a ResNeSt-14: --pretrained "
              f"{CPU_PRETRAINED} (downloaded once; the published width, slower per step); "
              "for the paper's model pass --backbone resnest50 --pretrained resnest50")
    elif cpu_model is not None:
        found = "" if "pretrained" in user else " found in the cache"
        print(f"segnest: no GPU: the folder preset trains {cpu_model['backbone']} from "
              f"ImageNet weights{found} ({cfg.pretrained}; "
              + ", ".join(f"{k} {v}" for k, v in cpu_model.items()
                          if k not in user and k not in ("backbone", "pretrained")
                          and v is not None)
              + "); --pretrained NAME or --backbone to choose otherwise")
    return cfg
