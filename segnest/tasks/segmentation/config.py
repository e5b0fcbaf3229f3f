"""``segnest train``'s settings: the shared training flags (:class:`TrainingConfig`) and
those of segmentation, with their rules. The dataset presets under them live in
:mod:`segnest.presets`; those derived from the data and the machine in presets.py here.

Torch-free: the command line imports it to build its flags."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from segnest.engine.config import TrainingConfig
from segnest.errors import SegnestError
from segnest.presets import CPU_MODEL, DATASET_PRESETS, DATASETS
from segnest.schema import MIN_INPUT_SIZE, Names, default_of, help_

OUTPUT_STRIDES = (8, 16, 32)


def _training_length(cfg: TrainConfig, names: Names) -> None:
    if cfg.iters is None and cfg.epochs is None:
        raise SegnestError("give the training length with --iters or --epochs")


def _warmup_within_iters(cfg: TrainConfig, names: Names) -> None:
    # The schedule accepts warmup == iters (the whole run warms up); longer cannot run.
    if cfg.iters is not None and cfg.warmup_iters > cfg.iters:
        raise SegnestError(f"{names.show('warmup_iters', cfg.warmup_iters)} is longer than "
                           f"the run ({names.show('iters', cfg.iters)}); lower the warmup")


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
class TrainConfig(TrainingConfig):
    """``segnest train``: DeepLabV3 on a ResNeSt backbone with the paper's recipe."""

    checks = (_training_length, _warmup_within_iters, _scale_range, _crop_fits,
              _floor_below_lr, _class_weights_source, _ohem_settings_need_ohem)
    # What --help names as the presets' values of a flag (segnest.commands.config).
    help_presets = {**DATASET_PRESETS, "folder without a GPU": CPU_MODEL}

    dataset: str = field(default="ade20k", metadata=help_("dataset", choices=DATASETS))
    data_root: str | None = field(
        default=None,
        metadata=help_("dataset root (default: ./data/<dataset>, see datasets/README.md)"),
    )
    pretrained: str | None = field(
        default=None, metadata=help_("backbone weights: a checkpoint file or ImageNet weights "
                                     "by name (resnest50, timm:resnest14d.gluon_in1k, ...; "
                                     "see docs/recipes.md)")
    )
    iters: int | None = field(
        default=None, metadata=help_("training iterations (overrides --epochs)", min=1)
    )
    lr: float | None = field(
        default=None,
        metadata=help_("base learning rate (default 0.01 x total batch / 16)", above=0),
    )
    no_decay_norm: bool = field(
        default=False, metadata=help_("no weight decay on norm layers and biases")
    )
    head_lr_mult: float = field(
        default=10.0, metadata=help_("lr multiplier of head and aux head", above=0)
    )
    poly_power: float = field(default=0.9, metadata=help_("poly schedule power", min=0))
    min_lr: float = field(default=0.0, metadata=help_("poly schedule floor", min=0))
    warmup_iters: int = field(default=0, metadata=help_("linear warmup iterations", min=0))
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
        metadata=help_("backbone output stride (default 8, the model's)", choices=OUTPUT_STRIDES),
    )
    aux: bool = field(default=True, metadata=help_("auxiliary FCN head on layer3"))
    aux_weight: float = field(default=0.2, metadata=help_("weight of the auxiliary loss", min=0))
    head_channels: int | None = field(
        default=None, metadata=help_("ASPP channels (default: the model's, 256)", min=1)
    )
    checkpoint_activations: bool = field(
        default=False, metadata=help_("recompute backbone activations in backward to save memory")
    )
    work_dir: str | None = field(
        default=None, metadata=help_("output folder (default runs/<dataset>_<backbone>)")
    )
    val_interval: int | None = field(
        default=None,
        metadata=help_("validate every N iterations (default: 10 times per run)", min=1),
    )
    val_samples: int | None = field(
        default=None, metadata=help_("validate on the first N images only (default all)", min=1)
    )
    panels: int = field(
        default=4, metadata=help_("validation images shown in TensorBoard", min=0)
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
        metadata=help_("per-channel mean on a 0-1 scale, comma-separated (default: ImageNet's "
                       "for 3 channels; required otherwise)"),
    )
    std: str | None = field(
        default=None,
        metadata=help_("per-channel standard deviation on a 0-1 scale, comma-separated "
                       "(default: ImageNet's for 3 channels; required otherwise)"),
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
        metadata=help_("--loss ohem: keep at least this many hardest pixels per device batch "
                       "(default 1/10 of its pixels)", min=0),
    )
