"""``segnest train``'s settings for segmentation: the shared training flags
(:class:`IterationTrainingConfig`) and those of segmentation, with their rules. The dataset
presets under them live in :mod:`segnest.presets`; those derived from the data and the
machine in presets.py here.

Torch-free: the command line imports it to build its flags."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from segnest.engine.config import (
    IterationTrainingConfig,
    backbone_fits,
    lr_rule_text,
    work_dirs_text,
)
from segnest.errors import SegnestError
from segnest.presets import CPU_MODEL, DATASET_PRESETS, DATASETS
from segnest.schema import MIN_INPUT_SIZE, Names, default_of, help_

OUTPUT_STRIDES = (8, 16, 32)
# ``segnest train --model``: the segmentation heads (segnest.models.registry, task
# "segmentation"; a test keeps the two equal, this module does not import torch).
SEGMENTATION_MODELS = ("deeplabv3",)
# The base learning rate without --lr: linear in the total batch (batch size x processes),
# (lr, batch) as the authors' segmentation script states it.
TRAIN_LR_RULE = (0.01, 16)
# Images per device per step without --batch-size (and a preset that sets it).
TRAIN_BATCH_SIZE = 2
# What --help names as the presets' values of a flag (segnest.commands.config).
HELP_PRESETS = {**DATASET_PRESETS, "folder without a GPU": CPU_MODEL}


def _ohem_min_kept_text() -> str:
    """--ohem-min-kept's default in --help (segnest.tasks.segmentation.losses keeps 1/10)."""
    counts = [f"{name}: {int(0.1 * preset.get('batch_size', TRAIN_BATCH_SIZE) * crop**2)}"
              for name, preset in DATASET_PRESETS.items()
              if (crop := preset["crop_size"]) and name != "folder"]
    return ("1/10 of its pixels, batch x crop x crop / 10: " + "; ".join(counts)
            + "; folder: from the crop derived from its images")


def _val_interval_text() -> str:
    return "a tenth of the run: " + "; ".join(
        f"{name}: {preset['iters'] // 10} iterations" if preset.get("iters") else
        f"{name}: {preset['epochs'] / 10:g} epochs" for name, preset in DATASET_PRESETS.items())


def _scale_range(cfg: TrainConfig, names: Names) -> None:
    if cfg.scale_min > cfg.scale_max:
        raise SegnestError(f"{names.show('scale_min', cfg.scale_min)} is above "
                           f"{names.show('scale_max', cfg.scale_max)}; swap them")


def _crop_fits(cfg: TrainConfig, names: Names) -> None:
    if cfg.crop_size is None or cfg.base_size is None:
        raise SegnestError(f"--crop-size and --base-size are needed for --dataset "
                           f"{cfg.dataset}; give both")
    if cfg.base_size * cfg.scale_max < cfg.crop_size:
        raise SegnestError(
            f"{names.show('crop_size', cfg.crop_size)} is larger than any scaled image (long "
            f"side at most {names.show('base_size', cfg.base_size)} x "
            f"{names.show('scale_max', cfg.scale_max)}); every crop would be mostly padding: "
            "lower the crop size or raise the base size")


def _floor_below_lr(cfg: TrainConfig, names: Names) -> None:
    if cfg.lr is not None and cfg.min_lr > cfg.lr:
        raise SegnestError(f"{names.show('min_lr', cfg.min_lr)} is above "
                           f"{names.show('lr', cfg.lr)}: the poly schedule would raise the "
                           "learning rate; lower the floor")


def _class_weights_source(cfg: TrainConfig, names: Names) -> None:
    if cfg.class_weights not in (None, "auto") and not Path(cfg.class_weights).is_file():
        raise SegnestError(f"{names.show('class_weights', cfg.class_weights)} is neither 'auto' "
                           "nor a file; give 'auto' or a text file of one weight per class")


def _ohem_settings_need_ohem(cfg: TrainConfig, names: Names) -> None:
    """The OHEM knobs change nothing under cross-entropy: a user who sets them expects
    hard-pixel mining, so say that it is off instead of training without it."""
    if cfg.loss == "ohem":
        return
    default_thresh = default_of(TrainConfig, "ohem_thresh")
    for name, value, default in (("ohem_thresh", cfg.ohem_thresh, default_thresh),
                                 ("ohem_min_kept", cfg.ohem_min_kept, None)):
        if value != default:
            raise SegnestError(f"{names.show(name, value)} applies to the OHEM loss only, but "
                               f"{names.show('loss', cfg.loss)}; add --loss ohem or drop "
                               f"{names.name(name)}")


@dataclass
class TrainConfig(IterationTrainingConfig):
    """``segnest train``: DeepLabV3 on a ResNeSt backbone with the paper's recipe."""

    checks = (_scale_range, _crop_fits, _floor_below_lr, _class_weights_source,
              _ohem_settings_need_ohem, backbone_fits)
    help_presets = HELP_PRESETS

    model: str = field(default="deeplabv3", metadata=help_(
        "the segmentation head", choices=SEGMENTATION_MODELS))
    dataset: str = field(default="ade20k", metadata=help_("dataset", choices=DATASETS))
    data_root: str | None = field(
        default=None,
        metadata=help_("dataset root, stored absolute (see datasets/README.md)",
                       default_shown="ade20k: ./data/ade20k; cityscapes: ./data/cityscapes "
                                     "($SEGNEST_DATA/<dataset> when set); folder: required; "
                                     "mini: generated in the cache"),
    )
    batch_size: int = field(default=TRAIN_BATCH_SIZE,
                            metadata=help_("images per device per step", min=1))
    lr: float | None = field(
        default=None,
        metadata=help_("base learning rate", above=0,
                       default_shown=lr_rule_text(TRAIN_LR_RULE, TRAIN_BATCH_SIZE)),
    )
    no_decay_norm: bool = field(
        default=False, metadata=help_("no weight decay on norm layers and biases")
    )
    head_lr_mult: float = field(
        default=10.0, metadata=help_("lr multiplier of head and aux head", above=0)
    )
    poly_power: float = field(default=0.9, metadata=help_("poly schedule power", min=0))
    min_lr: float = field(default=0.0, metadata=help_("poly schedule floor", min=0))
    crop_size: int | None = field(
        default=None, metadata=help_("training crop (square)", min=MIN_INPUT_SIZE)
    )
    base_size: int | None = field(
        default=None, metadata=help_("long side before random scaling; eval long side", min=1)
    )
    scale_min: float = field(default=0.5, metadata=help_("random scale lower bound", above=0))
    scale_max: float = field(default=2.0, metadata=help_("random scale upper bound", above=0))
    cat_max_ratio: float = field(
        default=1.0,
        metadata=help_("re-draw crops where one class covers more than this (1 = off)",
                       above=0, max=1),
    )
    photometric: bool = field(default=False, metadata=help_("photometric distortion"))
    output_stride: int | None = field(
        default=None,
        metadata=help_("backbone output stride", choices=OUTPUT_STRIDES, default_shown="8"),
    )
    aux: bool = field(default=True, metadata=help_("auxiliary FCN head on layer3"))
    aux_weight: float = field(default=0.2, metadata=help_("weight of the auxiliary loss", min=0))
    head_channels: int | None = field(
        default=None, metadata=help_("ASPP channels", min=1, default_shown="256")
    )
    checkpoint_activations: bool = field(
        default=False, metadata=help_("recompute backbone activations in backward to save memory")
    )
    work_dir: str | None = field(
        default=None, metadata=help_("output folder", default_shown=work_dirs_text(
            "runs/{}_{}", HELP_PRESETS, "ade20k", "resnest50"))
    )
    val_interval: int | None = field(
        default=None,
        metadata=help_("validate every N iterations", min=1, default_shown=_val_interval_text()),
    )
    skip_bad_samples: bool = field(
        default=False, metadata=help_("warn about and skip unreadable samples instead of stopping")
    )
    label_map: str | None = field(
        default=None,
        metadata=help_("folder masks: raw value -> train id, e.g. 255:1,128:2 (other values "
                       "unchanged; a recipe may give a mapping {255: 1})"),
    )
    in_channels: int = field(
        default=3,
        metadata=help_("channels of the input images: 3 for RGB (8- or 16-bit files), other "
                       "counts from HxWxN .npy arrays (folder datasets)", min=1),
    )
    mean: str | None = field(
        default=None,
        metadata=help_("per-channel mean on a 0-1 scale, comma-separated",
                       default_shown="ImageNet's, 0.485,0.456,0.406, for 3 channels; required "
                                     "otherwise"),
    )
    std: str | None = field(
        default=None,
        metadata=help_("per-channel standard deviation on a 0-1 scale, comma-separated",
                       default_shown="ImageNet's, 0.229,0.224,0.225, for 3 channels; required "
                                     "otherwise"),
    )
    class_weights: str | None = field(
        default=None,
        metadata=help_("per-class loss weights: 'auto' (ENet's 1/ln(1.02 + pixel share) from "
                       "the train masks) or a file of one weight per class"),
    )
    loss: str = field(
        default="ce", metadata=help_("pixel loss: cross-entropy or OHEM (hard pixels only)",
                                     choices=("ce", "ohem"))
    )
    ohem_thresh: float = field(
        default=0.7,
        metadata=help_("--loss ohem: keep pixels whose true-class probability is below this",
                       above=0, max=1),
    )
    ohem_min_kept: int | None = field(
        default=None,
        metadata=help_("--loss ohem: keep at least this many hardest pixels per device batch",
                       min=0, default_shown=_ohem_min_kept_text()),
    )
