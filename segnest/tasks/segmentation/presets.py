"""``segnest train``'s presets adapted to the data and the machine before the flags are read.

The static presets (``segnest.config.DATASET_PRESETS``) cannot know a user's images or
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
  ``segnest.config.CPU_MODEL`` (the demo's ResNeSt-14: minutes per run on two cores, where
  ResNeSt-50 takes over a second per step), unless the user chose a backbone or gave
  ``--pretrained`` (whose weights fit their own backbone) or a CUDA ``--device``.

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

from segnest.config import (
    CPU_MODEL,
    DATASET_PRESETS,
    MIN_INPUT_SIZE,
    TrainConfig,
    load_recipe,
    resolve_config,
)

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


def cpu_model_applies(user: dict[str, Any]) -> bool:
    """Whether the folder preset takes ``CPU_MODEL`` for the settings in ``user``."""
    return (user.get("dataset") == "folder" and "backbone" not in user
            and not user.get("pretrained") and _without_gpu(user))


def train_presets(user: dict[str, Any], cpu_model: bool
                  ) -> tuple[dict[str, dict[str, Any]], int | None]:
    """(``DATASET_PRESETS`` adapted to this data root and machine, the median long side of
    the folder dataset's train images or None), for what the user set (``user``: recipe
    and flags) and whether the folder preset takes ``CPU_MODEL`` (``cpu_model``)."""
    cores = os.cpu_count() or 1
    dataset = user.get("dataset", TrainConfig.dataset)
    preset = dict(DATASET_PRESETS.get(dataset, {}))
    preset["workers"] = min(preset.get("workers", TrainConfig.workers), cores)
    long_side = None
    if dataset == "folder" and user.get("data_root"):
        long_side = median_long_side(Path(user["data_root"]) / "images" / "train")
        if long_side is not None:
            preset.update(folder_sizes(long_side))
    if cpu_model:
        preset.update(CPU_MODEL)
    return {**DATASET_PRESETS, dataset: preset}, long_side


def resolve_train_config(cls: type, given: dict[str, Any],
                         presets: dict[str, dict[str, Any]] | None = None) -> TrainConfig:
    """``resolve_config`` for ``segnest train`` with :func:`train_presets`; prints the derived
    values in one line and warns about crops far larger than the images."""
    resolve_config(cls, given, presets)  # a bad flag or recipe is reported before any file is read
    user = _user_values(given)
    cpu_model = cpu_model_applies(user)
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
    if cpu_model:
        print("segnest: no GPU: the folder preset trains the small CPU model ("
              + ", ".join(f"{k} {v}" for k, v in CPU_MODEL.items() if k not in user)
              + "); for the paper's model pass --backbone resnest50 (and --pretrained)")
    return cfg
