"""Configuration: one dataclass per command, whose field names are the CLI flags and the
recipe (YAML) keys: ``--crop-size`` <-> ``crop_size``. Defaults live here and only here.

Precedence, lowest first: dataclass defaults < dataset preset < recipe file (``--config``)
< flags given on the command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import functools
import importlib.resources
import math
import os
import re
import sys
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from segnest.errors import SegnestError

if typing.TYPE_CHECKING:  # importlib.resources.abc is Python 3.11+
    from importlib.resources.abc import Traversable

# The CPU model: a small ResNeSt-14 that trains in minutes on two cores (the demo's, and the
# folder preset's on a machine without a GPU).
CPU_MODEL: dict[str, Any] = dict(backbone="resnest14", stage_width=16, stem_width=16,
                                 head_channels=64, batch_size=8, lr=0.02)

# Per-dataset settings from the paper's recipe (REFERENCE.md). Eval scales: long side =
# base_size x scale; crop_size is also the sliding-window size.
DATASET_PRESETS: dict[str, dict[str, Any]] = {
    "ade20k": dict(
        base_size=520,
        crop_size=480,
        epochs=180,
        iters=None,
        scales=(0.5, 0.75, 1.0, 1.25, 1.5, 1.75),
    ),
    "cityscapes": dict(
        base_size=1024,
        crop_size=768,
        epochs=240,
        iters=None,
        scales=(0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.25),
    ),
    # Your own images, 50 epochs: `segnest train` replaces base_size and crop_size with
    # values derived from the train images and, without a GPU, the model with CPU_MODEL
    # (segnest.tasks.segmentation.presets); these stand where nothing can be derived.
    "folder": dict(base_size=520, crop_size=480, epochs=50,
                   scales=(0.5, 0.75, 1.0, 1.25, 1.5, 1.75)),
    "mini": dict(**CPU_MODEL, base_size=112, crop_size=96, scale_min=0.75, scale_max=1.5,
                 iters=900, workers=2, scales=(0.75, 1.0, 1.25)),
}

# The base learning rate without --lr: linear in the total batch (batch size x processes),
# (lr, batch) it is stated for: the authors' segmentation script and ImageNet training.
TRAIN_LR_RULE = (0.01, 16)
PRETRAIN_LR_RULE = (0.1, 256)
# Images per device per step without --batch-size (and a preset that sets it).
TRAIN_BATCH_SIZE = 2
PRETRAIN_BATCH_SIZE = 64


def linear_lr(rule: tuple[float, int], total_batch: int) -> float:
    """The learning rate ``rule`` gives a total batch: ``lr x total_batch / batch``."""
    lr, batch = rule
    return lr * total_batch / batch


def _lr_rule_text(rule: tuple[float, int], batch_size: int) -> str:
    """``--lr``'s default in --help: the number at the default batch, then the rule."""
    return (f"{linear_lr(rule, batch_size):g} at batch {batch_size} on one process: "
            f"lr = {rule[0]:g} x total batch / {rule[1]}")


# ``segnest pretrain --dataset mini``: the bundled 64 px, 8-class set, about 1.5 minutes on
# two CPU cores (no AutoAugment or mixup: they slow learning on this small set).
PRETRAIN_PRESETS: dict[str, dict[str, Any]] = {
    "mini": dict(backbone="resnest14", stage_width=16, stem_width=16, crop_size=64,
                 crop_pct=1.0, batch_size=32, epochs=15, lr=0.05, warmup_epochs=1.0,
                 mixup=0.0, auto_augment="none", workers=2),
}


# The allowed values of the choice flags (the commands' modules use these).
DATASETS = ("ade20k", "cityscapes", "folder", "mini")
PRETRAIN_DATASETS = ("imagenet", "mini")
INFERENCE_MODES = ("whole", "slide")
EVAL_SPLITS = ("train", "val", "test")
# pt2 (torch.export) first: the recommended format and the default; torchscript is legacy.
EXPORT_FORMATS = ("pt2", "aoti", "onnx", "openvino", "torchscript")
# The formats that take --end-to-end (uint8 image in, label map out).
END_TO_END_FORMATS = ("pt2", "aoti", "onnx")
# Convolution types ``segnest quantize`` tells apart (segnest.inference.quantize): 1x1,
# dense kxk, grouped (Split-Attention's radix groups) and dilated dense (the ASPP's).
QUANTIZE_LAYER_TYPES = ("pointwise", "dense", "grouped", "dilated")
# The runtimes ``segnest quantize`` writes int8 models for.
QUANTIZE_BACKENDS = ("onnxruntime", "openvino")
AUTO_AUGMENT_CHOICES = ("autoaugment", "randaugment", "none")
BENCH_MODES = ("infer", "train")
# --precision: float32, bf16 or fp16 autocast, or the fastest native one (runtime/precision.py).
PRECISIONS = ("fp32", "bf16", "fp16", "auto")
PRECISION_HELP = ("number format: fp32, bf16 or fp16 autocast (weights, loss, softmax and "
                  "metrics stay fp32), or auto: the fastest this hardware runs natively "
                  "(bf16 on a CPU with AVX512-BF16/AMX or a recent GPU, fp16 on an older GPU, "
                  "else fp32)")
TRAIN_PRECISION_HELP = PRECISION_HELP + " (default: fp32, fp16 with --amp)"
AMP_HELP = "the same as --precision fp16: fp16 autocast with a gradient scaler, CUDA only"
OUTPUT_STRIDES = (8, 16, 32)
DEVICE = (r"cpu|cuda(:\d+)?", "cpu, cuda or cuda:N")
DEVICE_HELP = "device (default: cuda if present)"
# What --save-confidence writes, for both commands' --help.
CONFIDENCE_PNG = ("8-bit PNG, round(255 x the largest class probability averaged over the "
                  "scales and flips)")
# The smallest training crop and example input: ResNeSt's total stride is 32, so a smaller
# image leaves the last stage (and a classifier's pooling) a single pixel or less. Such a
# run "works" and learns nothing; it is refused instead.
MIN_INPUT_SIZE = 32
# NumPy's seed range; it also keeps the samplers' seed arithmetic within 64 bits.
MAX_SEED = 2**32 - 1

# Field metadata keys that constrain a value (see ``help_``); they are not argparse's.
CONSTRAINTS = ("min", "above", "max", "below", "choices", "pattern")


def help_(text: str, **extra: Any) -> dict[str, Any]:
    """A field's metadata: its ``--help`` text and what the value may be, declared next to
    its default and checked by :func:`validate_config` for every command:

    ``min`` / ``max``: inclusive bounds; ``above`` / ``below``: exclusive bounds;
    ``choices``: the allowed values; ``pattern``: (regular expression, how to write it).
    Other keys (``required``, ``renamed_from``, ``const``) shape the flag;
    ``default_shown`` is the default --help shows where the run computes it (a number and
    its rule).
    """
    return {"help": text, **extra}


# The two training commands save alike (segnest.engine).
CHECKPOINT_INTERVAL = 1000
CHECKPOINT_INTERVAL_HELP = ("save last.pt every N iterations, also mid-epoch (0 = only at "
                            "validations, epoch ends and when stopped)")
KEEP_CHECKPOINTS_HELP = "also keep the K newest periodic checkpoints as iter_N.pt (0 = none)"
RESUME_HELP = ("continue from this checkpoint, or 'auto' (also a bare --resume): the newest "
               "in the work folder")
OVERWRITE_HELP = ("start a new run in a work folder that holds an earlier run's checkpoints, "
                  "deleting them (without it such a run is refused)")


# --stem-width's default, the backbone's own (segnest.models.resnest.RESNEST_VARIANTS; a test
# holds this text to the table).
STEM_WIDTH_SHOWN = ("the backbone's: 32 for resnest14/26/50, the resnest50_fast variants and "
                    "resnet50d/101d; 64 for resnest101/200/269")


def _work_dirs(pattern: str, presets: dict[str, dict[str, Any]], dataset: str,
               backbone: str) -> str:
    """The default work folders in --help: ``pattern`` filled for the default dataset and
    each preset that changes the backbone."""
    shown = [pattern.format(dataset, backbone)]
    shown += [f"{name}: {pattern.format(name.split()[0], preset['backbone'])}"
              for name, preset in presets.items() if "backbone" in preset]
    return f"{pattern.format('<dataset>', '<backbone>')}: " + "; ".join(shown)


def _ohem_min_kept_text() -> str:
    """--ohem-min-kept's default in --help (segnest.tasks.segmentation.losses keeps 1/10)."""
    counts = [f"{name}: {int(0.1 * preset.get('batch_size', TRAIN_BATCH_SIZE) * crop**2)}"
              for name, preset in DATASET_PRESETS.items()
              if (crop := preset["crop_size"]) and name != "folder"]
    return ("1/10 of its pixels, batch x crop x crop / 10: " + "; ".join(counts)
            + "; folder: from the crop derived from its images")


# --------------------------------------------------------------------------- detection
# ``segnest train --model <architecture>``: the model decides the task (segnest.tasks.train).
# Detection's fields are one block at the end of TrainConfig, its rules one block before
# CHECKS; segmentation's fields keep their defaults there and detection refuses them.
SEGMENTATION_MODELS = ("deeplabv3",)
# The R-CNN architectures of segnest.models.detection.rcnn.ARCHITECTURES (a test keeps
# the two equal; config.py does not import torch).
DETECTION_MODELS = ("faster_rcnn", "mask_rcnn", "cascade_rcnn", "cascade_mask_rcnn")
TRAIN_MODELS = SEGMENTATION_MODELS + DETECTION_MODELS
DETECTION_DATASETS = ("coco", "mini")
DEMO_TASKS = ("segmentation", "detection")
TRAIN_DATASETS = DATASETS + tuple(d for d in DETECTION_DATASETS if d not in DATASETS)
# Per-dataset settings of the detection models: COCO is the authors' 1x (90k iterations,
# 2 images per device on 8 devices, 1000 warmup iterations; lr 0.02 x total batch / 16 by
# default); mini is the CPU demo's Mask R-CNN-ResNeSt-14 (segnest demo --task detection).
DETECTION_PRESETS: dict[str, dict[str, Any]] = {
    "coco": dict(iters=90000, batch_size=2, warmup_iters=1000),
    "mini": dict(backbone="resnest14", stage_width=16, detector_width=32, roi_batch_size=64,
                 batch_size=4, lr=0.02, iters=800, warmup_iters=100, train_min_size="96-128",
                 test_min_size=128, max_size=160, workers=2, val_interval=200),
}
# Fields that only segmentation reads; a detection model refuses them when set.
SEGMENTATION_FIELDS = (
    "no_decay_norm", "head_lr_mult", "poly_power", "min_lr", "crop_size", "base_size",
    "scale_min", "scale_max", "cat_max_ratio", "photometric", "output_stride", "aux",
    "aux_weight", "head_channels", "stem_width", "checkpoint_activations", "skip_bad_samples",
    "label_map", "in_channels", "mean", "std", "class_weights", "loss", "ohem_thresh",
    "ohem_min_kept")


@dataclass
class TrainConfig:
    """``segnest train``: DeepLabV3 on a ResNeSt backbone with the paper's recipe."""

    dataset: str = field(default="ade20k", metadata=help_("dataset", choices=TRAIN_DATASETS))
    backbone: str = field(default="resnest50", metadata=help_("backbone name (segnest models)"))
    data_root: str | None = field(
        default=None,
        metadata=help_("dataset root, stored absolute (see datasets/README.md)",
                       default_shown="ade20k: ./data/ade20k; cityscapes: ./data/cityscapes "
                                     "($SEGNEST_DATA/<dataset> when set); folder: required; "
                                     "mini: generated in the cache"),
    )
    config: str | None = field(
        default=None, metadata=help_("recipe YAML; its keys are these flags")
    )
    pretrained: str | None = field(
        default=None, metadata=help_("backbone weights: a checkpoint file or ImageNet weights "
                                     "by name (resnest50, timm:resnest14d.gluon_in1k, ...; "
                                     "see docs/recipes.md)")
    )
    iters: int | None = field(
        default=None, metadata=help_("training iterations (overrides --epochs)", min=1,
                                     default_shown="from --epochs")
    )
    epochs: int | None = field(default=None, metadata=help_("training epochs", min=1))
    batch_size: int = field(default=TRAIN_BATCH_SIZE,
                            metadata=help_("images per device per step", min=1))
    lr: float | None = field(
        default=None,
        metadata=help_("base learning rate", above=0,
                       default_shown=_lr_rule_text(TRAIN_LR_RULE, TRAIN_BATCH_SIZE)
                       + "; detection models: 0.02 x total batch / 16"),
    )
    momentum: float = field(default=0.9, metadata=help_("SGD momentum", min=0, below=1))
    weight_decay: float = field(default=1e-4, metadata=help_("SGD weight decay", min=0))
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
        metadata=help_("backbone output stride", choices=OUTPUT_STRIDES, default_shown="8"),
    )
    aux: bool = field(default=True, metadata=help_("auxiliary FCN head on layer3"))
    aux_weight: float = field(default=0.2, metadata=help_("weight of the auxiliary loss", min=0))
    head_channels: int | None = field(
        default=None, metadata=help_("ASPP channels", min=1, default_shown="256")
    )
    stage_width: int = field(
        default=64,
        metadata=help_("planes of the backbone's first stage, doubled per stage (64 = published)",
                       renamed_from="base_width", min=1),
    )
    stem_width: int | None = field(
        default=None, metadata=help_("backbone stem width", min=1,
                                     default_shown=STEM_WIDTH_SHOWN)
    )
    workers: int = field(default=4, metadata=help_("data loader workers per process", min=0))
    precision: str | None = field(
        default=None, metadata=help_(TRAIN_PRECISION_HELP, choices=PRECISIONS))
    amp: bool = field(default=False, metadata=help_(AMP_HELP))
    compile: bool = field(default=False, metadata=help_("torch.compile the model"))
    checkpoint_activations: bool = field(
        default=False, metadata=help_("recompute backbone activations in backward to save memory")
    )
    work_dir: str | None = field(
        default=None, metadata=help_("output folder", default_shown=_work_dirs(
            "runs/{}_{}", {**DATASET_PRESETS, "folder without a GPU": CPU_MODEL},
            "ade20k", "resnest50"))
    )
    resume: str | None = field(default=None, metadata=help_(RESUME_HELP, const="auto"))
    overwrite: bool = field(default=False, metadata=help_(OVERWRITE_HELP))
    seed: int = field(default=0, metadata=help_("random seed", min=0, max=MAX_SEED))
    val_interval: int | None = field(
        default=None,
        metadata=help_("validate every N iterations", min=1, default_shown=(
            "a tenth of the run: " + "; ".join(
                f"{name}: {preset['iters'] // 10} iterations" if preset.get("iters") else
                f"{name}: {preset['epochs'] / 10:g} epochs"
                for name, preset in DATASET_PRESETS.items()))),
    )
    val_samples: int | None = field(
        default=None, metadata=help_("validate on the first N images only (default all)", min=1)
    )
    checkpoint_interval: int = field(
        default=CHECKPOINT_INTERVAL, metadata=help_(CHECKPOINT_INTERVAL_HELP, min=0)
    )
    keep_checkpoints: int = field(default=0, metadata=help_(KEEP_CHECKPOINTS_HELP, min=0))
    log_interval: int = field(
        default=10, metadata=help_("scalar logging every N iterations", min=1)
    )
    panels: int = field(
        default=4, metadata=help_("validation images shown in TensorBoard", min=0)
    )
    tensorboard: bool = field(default=True, metadata=help_("write TensorBoard logs"))
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
    device: str | None = field(
        default=None, metadata=help_(DEVICE_HELP, pattern=DEVICE)
    )
    # ----------------------------------------------------------------------- detection
    model: str = field(default="deeplabv3", metadata=help_(
        "deeplabv3 trains segmentation; faster_rcnn, mask_rcnn, cascade_rcnn or "
        "cascade_mask_rcnn train COCO-format detection (docs/detection.md)",
        choices=TRAIN_MODELS))
    train_ann: str | None = field(default=None, metadata=help_(
        "detection on own data: the training COCO annotation JSON (with --train-images, "
        "--val-ann, --val-images)"))
    train_images: str | None = field(default=None, metadata=help_(
        "detection on own data: the folder the training JSON's file_name entries are in"))
    val_ann: str | None = field(default=None, metadata=help_(
        "detection on own data: the validation COCO annotation JSON"))
    val_images: str | None = field(default=None, metadata=help_(
        "detection on own data: the folder of the validation images"))
    train_min_size: str | None = field(default=None, metadata=help_(
        "detection: training short side, drawn from a range LOW-HIGH (640-800), from a "
        "list (640,672,704) or fixed (800) (default: the authors' 640-800)"))
    test_min_size: int | None = field(default=None, metadata=help_(
        "detection: short side at validation and test (default: 800)", min=MIN_INPUT_SIZE))
    max_size: int | None = field(default=None, metadata=help_(
        "detection: longest side after resizing (default: 1333)", min=MIN_INPUT_SIZE))
    detector_width: int | None = field(default=None, metadata=help_(
        "detection: channels of the FPN and of the RPN, box and mask heads; the box head's "
        "fc has 4x (default: 256, the published width)", min=8))
    roi_batch_size: int | None = field(default=None, metadata=help_(
        "detection: RoIs sampled per image to train the box head, a quarter of them "
        "positive at most (default: 512, detectron2's)", min=1))


@dataclass
class InferenceFlags:
    """The inference flags that ``segnest eval`` and ``segnest predict`` share; turned into
    validated settings by ``segnest.inference.settings.InferenceSettings.from_flags``."""

    multi_scale: bool = field(default=False, metadata=help_("average the dataset's eval scales"))
    flip: bool = field(default=False, metadata=help_("add horizontally flipped views"))
    scales: str | None = field(
        default=None, metadata=help_("comma-separated scales, e.g. 0.5,1.0 (implies multi-scale)")
    )
    mode: str = field(default="whole", metadata=help_("inference mode", choices=INFERENCE_MODES))
    base_size: int | None = field(
        default=None, metadata=help_("long side at scale 1.0 (default: the checkpoint's)", min=1)
    )
    window_size: int | None = field(
        default=None,
        metadata=help_("sliding-window size (default: the checkpoint's training crop)",
                       renamed_from="crop_size", min=1),
    )
    stride: int | None = field(
        default=None, metadata=help_("sliding-window stride (default 2/3 of the window)", min=1)
    )
    fuse_bn: bool = field(default=True, metadata=help_("fold BN into convs (same outputs, faster)"))
    compile: bool = field(
        default=False, metadata=help_("torch.compile with frozen weights (compiles per input size)")
    )
    batch_size: int = field(default=1, metadata=help_(
        "images (whole mode: those of equal working size) or windows (slide mode) per "
        "forward pass; never padded, results equal batch 1", min=1))
    precision: str = field(
        default="fp32", metadata=help_(PRECISION_HELP, choices=PRECISIONS))
    device: str | None = field(default=None, metadata=help_(DEVICE_HELP, pattern=DEVICE))


@dataclass
class EvalConfig(InferenceFlags):
    """``segnest eval``: metrics of a checkpoint on a dataset split."""

    checkpoint: str = field(default="", metadata=help_("segnest checkpoint (.pt)", required=True))
    dataset: str | None = field(
        default=None, metadata=help_("dataset (default: the checkpoint's)", choices=DATASETS)
    )
    data_root: str | None = field(default=None, metadata=help_(
        "dataset root (default: the checkpoint's, else ./data/<dataset>)"))
    split: str = field(default="val", metadata=help_("dataset split", choices=EVAL_SPLITS))
    save_pred: str | None = field(default=None, metadata=help_("write predictions here"))
    save_confidence: bool = field(default=False, metadata=help_(
        f"also write each prediction's confidence to <save-pred>_confidence/ (needs "
        f"--save-pred): {CONFIDENCE_PNG}"))
    out: str | None = field(
        default=None, metadata=help_("metrics folder (default next to checkpoint)")
    )
    samples: int | None = field(
        default=None, metadata=help_("first N images only (default all)", min=1))
    skip_bad_samples: bool = field(
        default=False, metadata=help_("warn about and skip unreadable samples instead of stopping")
    )
    workers: int = field(default=2, metadata=help_("data loader workers", min=0))


@dataclass
class PredictConfig(InferenceFlags):
    """``segnest predict``: coloured masks (and overlays) for images of any size and mode."""

    inputs: list[str] = field(default_factory=list, metadata=help_("image files or folders"))
    checkpoint: str = field(default="", metadata=help_("segnest checkpoint (.pt)", required=True))
    out: str = field(default="predictions", metadata=help_("output folder"))
    overlay: bool = field(default=False, metadata=help_("also write image/mask overlays"))
    save_confidence: bool = field(default=False, metadata=help_(
        f"also write <stem>_confidence.png: {CONFIDENCE_PNG}"))
    skip_bad_samples: bool = field(
        default=False, metadata=help_("warn about and skip unreadable samples instead of stopping")
    )


@dataclass
class ExportConfig:
    """``segnest export``: a stand-alone inference model from a checkpoint, verified."""

    checkpoint: str = field(default="", metadata=help_("segnest checkpoint (.pt)", required=True))
    format: str = field(default="pt2", metadata=help_(
        "pt2: torch.export program (recommended); aoti: AOTInductor package compiled for "
        "this machine; onnx: ONNX Runtime; openvino: OpenVINO IR (.xml + .bin); torchscript: "
        "legacy", choices=EXPORT_FORMATS))
    end_to_end: bool = field(default=False, metadata=help_(
        "uint8 N x H x W x C image in, uint8 label map out, pre- and post-processing in the "
        "graph (pt2, aoti, onnx)"))
    out: str | None = field(
        default=None, metadata=help_("output file (default next to checkpoint)")
    )
    size: int = field(
        default=512,
        metadata=help_("example input side used for tracing and the checks", min=MIN_INPUT_SIZE),
    )


@dataclass
class QuantizeConfig:
    """``segnest quantize``: an int8 ONNX or OpenVINO model of a checkpoint for CPU inference."""

    checkpoint: str = field(default="", metadata=help_("segnest checkpoint (.pt)", required=True))
    out: str | None = field(
        default=None, metadata=help_("output file (default next to checkpoint, .int8.onnx)")
    )
    dataset: str | None = field(
        default=None,
        metadata=help_("dataset of the calibration and check images (default: the "
                       "checkpoint's)", choices=DATASETS),
    )
    data_root: str | None = field(
        default=None, metadata=help_("dataset root (default: the checkpoint's)")
    )
    calibration_images: int = field(
        default=16, metadata=help_("training images that calibrate the int8 ranges", min=1)
    )
    check_images: int = field(
        default=16,
        metadata=help_("validation images on which the int8 labels are compared with fp32",
                       min=1),
    )
    layer_types: str = field(
        default=",".join(QUANTIZE_LAYER_TYPES),
        metadata=help_("comma-separated convolution types to quantize, of "
                       + ",".join(QUANTIZE_LAYER_TYPES) + " (onnxruntime)"),
    )
    backend: str = field(default="onnxruntime", metadata=help_(
        "onnxruntime: int8 ONNX (.int8.onnx); openvino: NNCF int8 OpenVINO IR "
        "(.int8.openvino.xml, needs segnest[openvino])", choices=QUANTIZE_BACKENDS))


@dataclass
class PretrainConfig:
    """``segnest pretrain``: ImageNet-style classification pretraining of a backbone."""

    dataset: str = field(
        default="imagenet",
        metadata=help_("imagenet (a folder via --data-root) or the bundled mini set",
                       choices=PRETRAIN_DATASETS),
    )
    data_root: str | None = field(
        default=None, metadata=help_("folder with train/<class>/ and val/<class>/",
                                     renamed_from="data")
    )
    backbone: str = field(default="resnest50", metadata=help_("backbone name"))
    config: str | None = field(default=None, metadata=help_("recipe YAML"))
    epochs: int = field(default=270, metadata=help_("training epochs", min=1))
    batch_size: int = field(default=PRETRAIN_BATCH_SIZE,
                            metadata=help_("images per device per step", min=1))
    lr: float | None = field(
        default=None, metadata=help_("base lr", above=0,
                                     default_shown=_lr_rule_text(PRETRAIN_LR_RULE,
                                                                 PRETRAIN_BATCH_SIZE))
    )
    momentum: float = field(default=0.9, metadata=help_("SGD momentum", min=0, below=1))
    weight_decay: float = field(
        default=1e-4, metadata=help_("weight decay (not on norm/bias)", min=0)
    )
    warmup_epochs: float = field(default=5.0, metadata=help_("linear warmup epochs", min=0))
    label_smoothing: float = field(
        default=0.1, metadata=help_("label smoothing", min=0, below=1)
    )
    mixup: float = field(default=0.2, metadata=help_("mixup alpha (0 = off)", min=0))
    cutmix: float = field(default=0.0, metadata=help_("cutmix alpha (0 = off)", min=0))
    auto_augment: str = field(
        default="autoaugment",
        metadata=help_("augmentation policy", choices=AUTO_AUGMENT_CHOICES),
    )
    crop_size: int = field(
        default=224, metadata=help_("train crop / eval crop", min=MIN_INPUT_SIZE)
    )
    crop_pct: float = field(
        default=0.875,
        metadata=help_("eval: resize to crop/crop_pct, centre crop", above=0, max=1),
    )
    dropblock_prob: float = field(
        default=0.0, metadata=help_("DropBlock on the last two stages", min=0, below=1)
    )
    final_drop: float = field(
        default=0.0, metadata=help_("dropout before fc", min=0, below=1)
    )
    last_gamma: bool = field(default=True, metadata=help_("zero-init the last BN gamma per block"))
    stage_width: int = field(
        default=64,
        metadata=help_("planes of the backbone's first stage, doubled per stage (64 = published)",
                       renamed_from="base_width", min=1),
    )
    stem_width: int | None = field(default=None, metadata=help_(
        "backbone stem width", min=1, default_shown=STEM_WIDTH_SHOWN))
    workers: int = field(default=4, metadata=help_("data loader workers per process", min=0))
    precision: str | None = field(
        default=None, metadata=help_(TRAIN_PRECISION_HELP, choices=PRECISIONS))
    amp: bool = field(default=False, metadata=help_(AMP_HELP))
    compile: bool = field(default=False, metadata=help_("torch.compile the model"))
    work_dir: str | None = field(
        default=None, metadata=help_("output folder", default_shown=_work_dirs(
            "runs/pretrain_{}_{}", PRETRAIN_PRESETS, "imagenet", "resnest50")))
    resume: str | None = field(default=None, metadata=help_(RESUME_HELP, const="auto"))
    overwrite: bool = field(default=False, metadata=help_(OVERWRITE_HELP))
    export: str | None = field(
        default=None,
        metadata=help_("also write the bare backbone state dict (official key layout) here"),
    )
    seed: int = field(default=0, metadata=help_("random seed", min=0, max=MAX_SEED))
    checkpoint_interval: int = field(
        default=CHECKPOINT_INTERVAL, metadata=help_(CHECKPOINT_INTERVAL_HELP, min=0)
    )
    keep_checkpoints: int = field(default=0, metadata=help_(KEEP_CHECKPOINTS_HELP, min=0))
    log_interval: int = field(
        default=10, metadata=help_("scalar logging every N iterations", min=1)
    )
    tensorboard: bool = field(default=True, metadata=help_("write TensorBoard logs"))
    device: str | None = field(default=None, metadata=help_(DEVICE_HELP, pattern=DEVICE))
    skip_bad_samples: bool = field(
        default=False, metadata=help_("warn about and skip unreadable samples instead of stopping")
    )


@dataclass
class BenchConfig:
    """``segnest bench``: speed, memory and achieved FLOP/s of a model."""

    model: str = field(default="deeplabv3_resnest50", metadata=help_("model name"))
    size: int = field(default=512, metadata=help_("input side", min=MIN_INPUT_SIZE))
    batch: int = field(default=2, metadata=help_("batch size", min=1))
    mode: str = field(default="infer", metadata=help_("what to time", choices=BENCH_MODES))
    compile: bool = field(default=False, metadata=help_("torch.compile the model"))
    fuse_bn: bool = field(default=True, metadata=help_("fold BN into convs for inference"))
    checkpoint_activations: bool = field(default=False, metadata=help_("activation checkpointing"))
    precision: str = field(
        default="fp32", metadata=help_(PRECISION_HELP + "; the conv probe runs in the same",
                                       choices=PRECISIONS))
    warmup: int = field(default=2, metadata=help_("untimed runs", min=0))
    runs: int = field(default=5, metadata=help_("timed runs (median reported)", min=1))
    num_classes: int = field(default=150, metadata=help_("classes of the head", min=1))
    json: bool = field(default=False, metadata=help_("print one JSON object"))
    device: str | None = field(default=None, metadata=help_(DEVICE_HELP, pattern=DEVICE))


@dataclass
class DemoConfig:
    """``segnest demo``: the whole pipeline on bundled data, in minutes, on a CPU."""

    task: str = field(default="segmentation", metadata=help_(
        "segmentation: pretrain a ResNeSt-14, train DeepLabV3 on it; detection: train Mask "
        "R-CNN-ResNeSt-14 on the mini detection set, report box and mask AP",
        choices=DEMO_TASKS))
    work_dir: str = field(default="runs/demo", metadata=help_("output folder"))
    pretrain_epochs: int = field(
        default=15, metadata=help_("classification pretraining epochs", min=1)
    )
    iters: int | None = field(default=None, metadata=help_(
        "training iterations (default: the mini presets': 900 segmentation, "
        f"{DETECTION_PRESETS['mini']['iters']} detection)", min=1))
    compare_scratch: bool = field(
        default=False,
        metadata=help_("also train from scratch with the same budget and report both"),
    )
    workers: int = field(default=2, metadata=help_("data loader workers", min=0))
    precision: str = field(
        default="fp32",
        metadata=help_(PRECISION_HELP + "; for pretraining, training and evaluation",
                       choices=PRECISIONS))
    device: str | None = field(default=None, metadata=help_(DEVICE_HELP, pattern=DEVICE))


@functools.cache
def _field_types(owner: type) -> dict[str, tuple[Any, bool]]:
    """Field name -> (type without ``None``, whether ``None`` is allowed)."""
    out = {}
    for name, tp in typing.get_type_hints(owner).items():
        optional = False
        if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
            args = typing.get_args(tp)
            optional = type(None) in args
            tp = next(a for a in args if a is not type(None))
        out[name] = (tp, optional)
    return out


def _field_type(f: dataclasses.Field, owner: type) -> Any:
    return _field_types(owner)[f.name][0]


def renamed_keys(cls: type) -> dict[str, str]:
    """Old name -> current name of every renamed field of ``cls`` (flags and recipe keys)."""
    return {f.metadata["renamed_from"]: f.name for f in fields(cls) if "renamed_from" in f.metadata}


def warn_renamed(old: str, new: str, where: str) -> None:
    print(f"segnest: warning: {where} '{old}' is renamed '{new}'; the old name still works "
          "but will be removed", file=sys.stderr)


class _RenamedFlag(argparse.Action):
    """The old spelling of a renamed flag: sets the new field and says so once."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        warn_renamed(option_string, "--" + self.dest.replace("_", "-"), "flag")
        setattr(namespace, self.dest, values)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _bounds_text(meta: typing.Mapping[str, Any]) -> str | None:
    """``">= 0 and < 1"`` from a field's bounds; None when it has none."""
    parts = [f"{op} {meta[key]}" for key, op in
             (("min", ">="), ("above", ">"), ("max", "<="), ("below", "<")) if key in meta]
    return " and ".join(parts) or None


# --help sections, in this order; a field in none of them is listed under "other".
HELP_GROUPS: dict[str, tuple[str, ...]] = {
    "model": ("backbone", "pretrained", "output_stride", "aux", "aux_weight",
              "head_channels", "stage_width", "stem_width", "dropblock_prob", "final_drop",
              "last_gamma", "in_channels", "loss", "ohem_thresh", "ohem_min_kept",
              "class_weights"),
    "data": ("dataset", "data_root", "config", "crop_size", "base_size", "scale_min",
             "scale_max", "cat_max_ratio", "photometric", "label_map", "mean", "std",
             "skip_bad_samples", "crop_pct", "auto_augment", "mixup", "cutmix",
             "label_smoothing", "workers"),
    "optimisation": ("iters", "epochs", "batch_size", "lr", "momentum", "weight_decay",
                     "no_decay_norm", "head_lr_mult", "poly_power", "min_lr", "warmup_iters",
                     "warmup_epochs", "seed"),
    "checkpoints": ("work_dir", "resume", "overwrite", "checkpoint_interval",
                    "keep_checkpoints", "export", "val_interval", "val_samples"),
    "logging": ("log_interval", "panels", "tensorboard"),
    "hardware": ("device", "precision", "amp", "compile", "checkpoint_activations"),
    "detection": ("model", "train_ann", "train_images", "val_ann", "val_images",
                  "train_min_size", "test_min_size", "max_size", "detector_width",
                  "roi_batch_size"),
}


def _help_sections(parser: argparse.ArgumentParser, names: list[str]
                   ) -> dict[str, argparse._ArgumentGroup]:
    """field name -> the --help section it is listed in (sections made in HELP_GROUPS'
    order, only those with fields)."""
    where: dict[str, argparse._ArgumentGroup] = {}
    for title, members in (*HELP_GROUPS.items(), ("other", tuple(names))):
        present = [name for name in names if name in members and name not in where]
        if present:
            group = parser.add_argument_group(title)
            where.update(dict.fromkeys(present, group))
    return where


def add_dataclass_arguments(
    parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()
) -> None:
    """One ``--flag-name`` per field. Defaults are suppressed so that only what the user
    typed overrides the recipe and the presets; a renamed field also takes its old flag.
    The help shows a field's allowed values; they are checked by :func:`validate_config`
    (not by argparse), so that a flag and a recipe key fail alike, in one line. Flags are
    listed in the sections of :data:`HELP_GROUPS`."""
    sections = _help_sections(parser, [f.name for f in fields(cls) if f.name not in skip])
    for f in fields(cls):
        if f.name in skip:
            continue
        tp = _field_type(f, cls)
        meta = {k: v for k, v in f.metadata.items() if k not in CONSTRAINTS}
        required = meta.pop("required", False)
        old_name = meta.pop("renamed_from", None)
        const = meta.pop("const", None)
        meta.pop("default_shown", None)
        bounds = _bounds_text(f.metadata)
        if bounds:
            meta["help"] += f" [{bounds}]"
        if "pattern" in f.metadata:
            meta["help"] += f" [{f.metadata['pattern'][1]}]"
        if not required:
            meta["help"] += _default_text(f, cls)
        kwargs: dict[str, Any] = dict(dest=f.name, default=argparse.SUPPRESS, **meta)
        if required:
            kwargs["required"] = True
        if const is not None:
            kwargs.update(nargs="?", const=const)
        if tp is bool:
            # --no-decay-norm, never --no-no-decay-norm: a negative flag only switches on.
            kwargs["action"] = ("store_true" if f.name.startswith("no_")
                                else argparse.BooleanOptionalAction)
        else:
            kwargs["type"] = tp
            kwargs["metavar"] = f.name.upper() if tp is str else tp.__name__.upper()
            if "choices" in f.metadata:
                kwargs["metavar"] = "{" + ",".join(map(str, f.metadata["choices"])) + "}"
        sections[f.name].add_argument(_flag(f.name), **kwargs)
        if old_name is not None and tp is not bool:
            parser.add_argument(_flag(old_name), dest=f.name, type=tp,
                                default=argparse.SUPPRESS, action=_RenamedFlag,
                                help=argparse.SUPPRESS)


def _default_text(f: dataclasses.Field, cls: type) -> str:
    """`` (default: X)`` for a flag's help, from the field's default (argparse cannot show
    it: the parser's defaults are suppressed); nothing where the help already names the
    default. The ``--dataset`` presets that change a value are named with theirs."""
    if "default" in f.metadata.get("help", "").lower():
        return ""
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return ""
    if value is None:
        shown = "none"
    elif isinstance(value, bool):
        shown = "on" if value else "off"
    elif isinstance(value, list | tuple):
        if not value:
            return ""
        shown = ",".join(map(str, value))
    else:
        shown = str(value)
    presets = dict({TrainConfig: DATASET_PRESETS, PretrainConfig: PRETRAIN_PRESETS}.get(cls, {}))
    if cls is TrainConfig:  # segnest.tasks.segmentation.presets: the folder preset without a GPU
        presets["folder without a GPU"] = CPU_MODEL
    # The number each preset uses, e.g. "2; mini: 8" or, with no built-in value,
    # "ade20k: 180; cityscapes: 240; folder: 50".
    changed = [f"{name}: {_shown(preset[f.name])}" for name, preset in presets.items()
               if preset.get(f.name, value) != value]
    if "default_shown" in f.metadata:  # a default computed by the run, as a number
        shown = "; ".join([f.metadata["default_shown"], *changed])
    elif value is None and changed:
        shown = "; ".join(changed)
    else:
        shown = "; ".join([shown, *changed])
    return f" (default: {shown})".replace("%", "%%")


def _shown(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, list | tuple) else str(value)


class _RecipeLoader(yaml.SafeLoader):
    """YAML as PyYAML reads it, except that ``1e-3`` is a number (as in YAML 1.2) rather
    than the string YAML 1.1 makes of an exponent without a dot. Quoted values stay text."""


_RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


# --------------------------------------------------------------------------- recipes
# The published recipes ship inside the package (segnest/recipes/<name>.yaml, package data
# in setup.cfg), so that ``--config <name>`` works after a plain ``pip install``.
RECIPE_FOLDER = "recipes"
# Keys that describe a recipe for people and ``segnest recipes``; they are not flags.
RECIPE_INFO_KEYS = ("target", "hardware", "reference", "notes")


def packaged_recipes() -> dict[str, Traversable]:
    """Name -> file of every recipe shipped in the package, sorted by name."""
    folder = importlib.resources.files("segnest") / RECIPE_FOLDER
    files = [f for f in folder.iterdir() if f.name.endswith(".yaml")] if folder.is_dir() else []
    return {f.name[: -len(".yaml")]: f for f in sorted(files, key=lambda f: f.name)}


def find_recipe(name: str | Path) -> tuple[str, str]:
    """``(how messages name it, its YAML text)`` for ``--config name``: a path that exists is
    that file; otherwise a packaged recipe's name (``.yaml`` optional); otherwise a
    one-line error listing the packaged names."""
    path = Path(name)
    if path.is_file():
        return str(path), _recipe_text(path.read_bytes(), path)
    packaged = packaged_recipes()
    stem = str(name)[: -len(".yaml")] if str(name).endswith(".yaml") else str(name)
    if stem in packaged:
        return stem, _recipe_text(packaged[stem].read_bytes(), stem)
    raise SegnestError(f"recipe {name} not found: no such file and no packaged recipe of that "
                       f"name; packaged recipes: {', '.join(packaged)} ('segnest recipes' "
                       "describes them)")


def _recipe_text(data: bytes, label: str | Path) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise SegnestError(
            f"recipe {label} is not UTF-8 text (byte {err.start}: {err.reason}); save it as "
            "UTF-8 (e.g. iconv -f latin1 -t utf-8, or 'Save as UTF-8' in an editor)") from err


def _note_unused_copy(name: str | Path) -> None:
    """``--config NAME`` means the packaged recipe even beside a ``NAME.yaml``; say so,
    so that an edited copy of that name never goes unused in silence."""
    _note_unused_copy_once(str(name), os.getcwd())


@functools.cache
def _note_unused_copy_once(name: str, folder: str) -> None:
    # Once per name and working folder (where the copy is looked for) in a process:
    # segnest train resolves its flags twice, the first time for its presets.
    copy = Path(f"{name}.yaml")
    if not Path(name).is_file() and str(name) in packaged_recipes() and copy.is_file():
        print(f"recipe: using the packaged recipe {name}, not your copy {copy}; pass "
              f"--config {copy} to use the copy", file=sys.stderr)


def read_recipe(name: str | Path) -> tuple[str, dict[str, Any]]:
    """``(how messages name it, its keys and values as written)``, info keys included."""
    label, text = find_recipe(name)
    try:
        data = yaml.load(text, Loader=_RecipeLoader) or {}
    except yaml.YAMLError as err:
        problem = " ".join(str(err).split())
        raise SegnestError(f"recipe {label} is not valid YAML: {problem}") from err
    if not isinstance(data, dict):
        raise SegnestError(f"recipe {label} must be a mapping of flag names to values")
    return label, data


def load_recipe(path: str | Path, cls: type) -> dict[str, Any]:
    """The flags a recipe (a file or a packaged name, :func:`find_recipe`) sets for ``cls``."""
    path, data = read_recipe(path)
    data = {str(k).replace("-", "_"): v for k, v in data.items()
            if k not in RECIPE_INFO_KEYS}
    for old, new in renamed_keys(cls).items():
        if old in data:
            warn_renamed(old, new, f"recipe {path}: key")
            data.setdefault(new, data.pop(old))
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise SegnestError(
            f"recipe {path}: unknown key(s) {', '.join(unknown)}; valid keys are the flags of "
            f"this command ({', '.join(sorted(known))})"
        )
    if "config" in data:
        raise SegnestError(f"recipe {path}: a recipe cannot name another recipe (key config); "
                           "copy the keys you need into this one")
    return data


# --------------------------------------------------------------------------- validation


class _Names:
    """How to name a value in an error: the flag as typed (``--lr -1.0``) unless it came
    from a recipe or a preset, which are named with the key (``lr: -1.0 in recipe r.yaml``)."""

    def __init__(self, sources: typing.Mapping[str, str] | None = None) -> None:
        self.sources = dict(sources or {})

    def show(self, name: str, value: Any) -> str:
        if isinstance(value, str):
            shown = repr(value)
        elif value is None or isinstance(value, bool):
            shown = {None: "null", True: "true", False: "false"}[value]
        else:
            shown = str(value)
        source = self.sources.get(name)
        return f"{name}: {shown} in {source}" if source else f"{_flag(name)} {shown}"


def _typed(name: str, value: Any, tp: Any, optional: bool, names: _Names) -> Any:
    """``value`` as the field's type, or a SegnestError: nothing is truncated, nothing
    truthy-converted. An int field takes an integral float (``1e4`` -> 10000); a float field
    takes an int; text is never read as a number or a boolean."""
    what = names.show(name, value)
    if value is None:
        if optional:
            return None
        raise SegnestError(f"{what} needs a value; remove the key to use the default")
    if isinstance(value, str) and tp is bool:
        raise SegnestError(f"{what} is text, not true or false; write true or false without "
                           "quotes")
    if isinstance(value, str) and tp in (int, float):
        raise SegnestError(f"{what} is text, not a number; write it without quotes")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise SegnestError(f"{what} is not a boolean; write true or false")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise SegnestError(f"{what} is not a whole number; write one such as 2")
        if isinstance(value, float) and not math.isfinite(value):
            raise SegnestError(f"{what} is not a finite number; write a whole number")
        if isinstance(value, float) and not value.is_integer():
            raise SegnestError(f"{what} is not a whole number; write {math.floor(value)} or "
                               f"{math.ceil(value)}")
        return int(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise SegnestError(f"{what} is not a number; write one such as 0.01")
        if not math.isfinite(value):
            raise SegnestError(f"{what} is not a finite number; write one such as 0.01")
        return float(value)
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, dict) and all(isinstance(k, int) and isinstance(v, int)
                                           for k, v in value.items()):
            # A recipe's mapping for a "k:v,k:v" flag (label_map: {255: 1}).
            return ",".join(f"{key}:{item}" for key, item in value.items())
        raise SegnestError(f"{what} is not text; put it in quotes")
    if typing.get_origin(tp) is list:
        if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
            return list(value)
        raise SegnestError(f"{what} is not a list of text")
    return value


def _in_range(name: str, value: Any, meta: typing.Mapping[str, Any], names: _Names) -> None:
    if value is None:
        return
    what = names.show(name, value)
    if "choices" in meta and value not in meta["choices"]:
        raise SegnestError(f"{what} is not one of {', '.join(map(str, meta['choices']))}; "
                           "pick one of those")
    if "pattern" in meta and not re.fullmatch(meta["pattern"][0], value):
        raise SegnestError(f"{what} is not a device; use {meta['pattern'][1]}")
    bounds = _bounds_text(meta)
    if bounds and not (value >= meta.get("min", -math.inf) and value > meta.get("above", -math.inf)
                       and value <= meta.get("max", math.inf)
                       and value < meta.get("below", math.inf)):
        kind = "a whole number" if isinstance(value, int) else "a number"
        raise SegnestError(f"{what} is out of range; use {kind} {bounds}")


# Cross-field rules: one function per rule, listed per config class (subclasses inherit
# their bases' rules). Each raises a one-line SegnestError naming the values involved.
Check = Callable[[Any, _Names], None]


def _training_length(cfg: TrainConfig, names: _Names) -> None:
    if cfg.iters is None and cfg.epochs is None:
        raise SegnestError("give the training length with --iters or --epochs")


def _warmup_within_iters(cfg: TrainConfig, names: _Names) -> None:
    # The schedule accepts warmup == iters (the whole run warms up); longer cannot run.
    if cfg.iters is not None and cfg.warmup_iters > cfg.iters:
        raise SegnestError(f"{names.show('warmup_iters', cfg.warmup_iters)} is longer than "
                           f"the run ({names.show('iters', cfg.iters)}); lower the warmup")


def _scale_range(cfg: TrainConfig, names: _Names) -> None:
    if cfg.scale_min > cfg.scale_max:
        raise SegnestError(f"{names.show('scale_min', cfg.scale_min)} is above "
                           f"{names.show('scale_max', cfg.scale_max)}; swap them")


def _crop_fits(cfg: TrainConfig, names: _Names) -> None:
    if cfg.crop_size is None or cfg.base_size is None:
        raise SegnestError(f"--crop-size and --base-size are needed for --dataset "
                           f"{cfg.dataset}; give both")
    if cfg.base_size * cfg.scale_max < cfg.crop_size:
        raise SegnestError(
            f"{names.show('crop_size', cfg.crop_size)} is larger than any scaled image (long "
            f"side at most {names.show('base_size', cfg.base_size)} x "
            f"{names.show('scale_max', cfg.scale_max)}); every crop would be mostly padding: "
            "lower the crop size or raise the base size")


def _floor_below_lr(cfg: TrainConfig, names: _Names) -> None:
    if cfg.lr is not None and cfg.min_lr > cfg.lr:
        raise SegnestError(f"{names.show('min_lr', cfg.min_lr)} is above "
                           f"{names.show('lr', cfg.lr)}: the poly schedule would raise the "
                           "learning rate; lower the floor")


def _warmup_within_epochs(cfg: PretrainConfig, names: _Names) -> None:
    if cfg.warmup_epochs > cfg.epochs:
        raise SegnestError(f"{names.show('warmup_epochs', cfg.warmup_epochs)} is longer than "
                           f"the run ({names.show('epochs', cfg.epochs)}); lower the warmup")


def _imagenet_needs_data(cfg: PretrainConfig, names: _Names) -> None:
    if cfg.dataset == "imagenet" and not cfg.data_root:
        raise SegnestError("--dataset imagenet needs --data-root: a folder with train/<class>/ and "
                           "val/<class>/ image folders (ImageNet layout)")


def parse_scales(text: str, flag: str = "--scales") -> tuple[float, ...]:
    """``"0.5,0.75,1"`` -> ``(0.5, 0.75, 1.0)``; anything else is a SegnestError naming the flag."""
    parts = [part.strip() for part in str(text).split(",") if part.strip()]
    try:
        scales = tuple(float(part) for part in parts)
    except ValueError:
        scales = ()
    if not scales or any(not math.isfinite(s) or s <= 0 for s in scales):
        raise SegnestError(
            f"{flag} {text!r} is not a list of positive numbers; write e.g. {flag} 0.5,0.75,1.0"
        )
    return scales


def parse_layer_types(text: str, flag: str = "--layer-types") -> tuple[str, ...]:
    """``"pointwise,dense"`` -> ``("pointwise", "dense")``, each one of QUANTIZE_LAYER_TYPES."""
    types_ = tuple(dict.fromkeys(part.strip() for part in str(text).split(",") if part.strip()))
    unknown = [t for t in types_ if t not in QUANTIZE_LAYER_TYPES]
    if not types_ or unknown:
        raise SegnestError(f"{flag} {text!r} must list one or more of "
                           f"{','.join(QUANTIZE_LAYER_TYPES)}; write e.g. {flag} pointwise,dense")
    return types_


def _layer_types_parse(cfg: QuantizeConfig, names: _Names) -> None:
    parse_layer_types(cfg.layer_types)


def _scales_parse(cfg: InferenceFlags, names: _Names) -> None:
    if cfg.scales is not None:
        parse_scales(cfg.scales)


def _stride_within_window(cfg: InferenceFlags, names: _Names) -> None:
    if cfg.stride is not None and cfg.window_size is not None and cfg.stride > cfg.window_size:
        raise SegnestError(f"{names.show('stride', cfg.stride)} is larger than "
                           f"{names.show('window_size', cfg.window_size)} and would skip "
                           "pixels; use a stride of at most the window size")


def _confidence_needs_save_pred(cfg: EvalConfig, names: _Names) -> None:
    if cfg.save_confidence and not cfg.save_pred:
        raise SegnestError("--save-confidence writes beside the predictions and needs "
                           "--save-pred; add --save-pred FOLDER")


def _class_weights_source(cfg: TrainConfig, names: _Names) -> None:
    if cfg.class_weights not in (None, "auto") and not Path(cfg.class_weights).is_file():
        raise SegnestError(f"{names.show('class_weights', cfg.class_weights)} is neither 'auto' "
                           "nor a file; give 'auto' or a text file of one weight per class")


def _ohem_settings_need_ohem(cfg: TrainConfig, names: _Names) -> None:
    """The OHEM knobs change nothing under cross-entropy: a user who sets them expects
    hard-pixel mining, so say that it is off instead of training without it."""
    if cfg.loss == "ohem":
        return
    default_thresh = next(f.default for f in fields(TrainConfig) if f.name == "ohem_thresh")
    for name, value, default in (("ohem_thresh", cfg.ohem_thresh, default_thresh),
                                 ("ohem_min_kept", cfg.ohem_min_kept, None)):
        if value != default:
            raise SegnestError(f"{names.show(name, value)} applies to the OHEM loss only, but "
                               f"{names.show('loss', cfg.loss)}; add --loss ohem or drop "
                               f"{_flag(name)}")


def _backbone_fits(cfg: TrainConfig | PretrainConfig, names: _Names) -> None:
    """The backbone exists and ``stage_width`` splits into its radix x cardinality groups
    (the Split-Attention convolutions need whole channels per group)."""
    from segnest.models.resnest import RESNEST_VARIANTS  # torch: only once the flags are fine

    if cfg.backbone not in RESNEST_VARIANTS:
        raise SegnestError(f"unknown {names.show('backbone', cfg.backbone)}; choose one of: "
                           f"{', '.join(RESNEST_VARIANTS)}")
    variant = RESNEST_VARIANTS[cfg.backbone]
    if stage_width_fits(variant, cfg.stage_width):
        return
    lower = next((w for w in range(cfg.stage_width - 1, 0, -1) if stage_width_fits(variant, w)),
                 None)
    upper = next(w for w in range(cfg.stage_width + 1, 64 * cfg.stage_width + 64)
                 if stage_width_fits(variant, w))
    nearest = f"{lower} or {upper}" if lower else str(upper)
    raise SegnestError(f"{names.show('stage_width', cfg.stage_width)} does not fit "
                       f"{cfg.backbone}: its blocks split the channels into radix "
                       f"{variant.get('radix', 0)} x {variant.get('groups', 1)} groups; "
                       f"use {nearest}")


def stage_width_fits(variant: dict[str, Any], stage_width: int) -> bool:
    """Whether ResNeSt ``variant`` (a row of RESNEST_VARIANTS) builds with ``stage_width``:
    every stage's bottleneck width is a whole number of channels per radix split and group,
    and the attention's hidden width divides into the groups."""
    radix, groups = variant.get("radix", 0), variant.get("groups", 1)
    width = variant.get("bottleneck_width", 64)
    for stage in range(4):
        group_width = int(stage_width * 2**stage * width / 64.0) * groups
        if group_width < 1 or group_width % (groups * max(radix, 1)):
            return False
        if radix >= 1 and max(group_width * radix // 4, 32) % groups:
            return False
    return True


def _amp_alias(cfg: TrainConfig | PretrainConfig, names: _Names) -> None:
    if cfg.amp and cfg.precision not in (None, "fp16"):
        amp = names.show("amp", cfg.amp).removesuffix(" true")  # the bare flag as typed
        raise SegnestError(f"{amp} means --precision fp16 but "
                           f"{names.show('precision', cfg.precision)} is given too; give one "
                           "of them")


def _known_model(cfg: BenchConfig, names: _Names) -> None:
    from segnest.models import list_models

    if cfg.model not in list_models():
        close = difflib.get_close_matches(cfg.model, list_models(), n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise SegnestError(f"unknown {names.show('model', cfg.model)}; {hint}'segnest models' "
                           "lists the valid names")


def _end_to_end_format(cfg: ExportConfig, names: _Names) -> None:
    if cfg.end_to_end and cfg.format not in END_TO_END_FORMATS:
        formats = f"{', '.join(END_TO_END_FORMATS[:-1])} or {END_TO_END_FORMATS[-1]}"
        raise SegnestError(f"--end-to-end is not available for --format {cfg.format} (legacy); "
                           f"use --format {formats}, or leave out --end-to-end for a logits "
                           "model")


# --------------------------------------------------------------------------- detection
OWN_COCO_FIELDS = ("train_ann", "train_images", "val_ann", "val_images")
DETECTION_FIELDS = ("train_min_size", "test_min_size", "max_size", "detector_width",
                    "roi_batch_size", *OWN_COCO_FIELDS)


def is_detection(cfg: TrainConfig) -> bool:
    return cfg.model in DETECTION_MODELS


def parse_min_sizes(text: str, flag: str = "--train-min-size") -> tuple[tuple[int, ...], str]:
    """``"640-800"`` -> ``((640, 800), "range")``; ``"640,672"`` -> ``((640, 672),
    "choice")``; ``"800"`` -> ``((800,), "choice")``; anything else is one SegnestError."""
    text = str(text).strip()
    sampling, separator = ("range", "-") if "-" in text else ("choice", ",")
    try:
        sizes = tuple(int(part) for part in text.split(separator))
    except ValueError:
        sizes = ()
    if (not sizes or any(size < MIN_INPUT_SIZE for size in sizes)
            or (sampling == "range" and (len(sizes) != 2 or sizes[0] > sizes[1]))):
        raise SegnestError(f"{flag} {text!r} is not a size range, list or size of at least "
                           f"{MIN_INPUT_SIZE} px; write e.g. {flag} 640-800, 640,672,704 or 800")
    return sizes, sampling


def _fields_of_the_model(cfg: TrainConfig, names: _Names) -> None:
    """A flag the chosen model does not read is refused, not ignored."""
    defaults = {f.name: f.default for f in fields(TrainConfig)}
    unread = SEGMENTATION_FIELDS if is_detection(cfg) else DETECTION_FIELDS
    for name in unread:
        if getattr(cfg, name) != defaults[name]:
            kind = ("segmentation (--model deeplabv3)" if is_detection(cfg)
                    else "detection models (--model mask_rcnn, ...)")
            raise SegnestError(f"{names.show(name, getattr(cfg, name))} applies to {kind} "
                               f"only, not to {names.show('model', cfg.model)}; drop it")


def _dataset_of_the_model(cfg: TrainConfig, names: _Names) -> None:
    if is_detection(cfg) and cfg.dataset not in DETECTION_DATASETS:
        raise SegnestError(f"{names.show('dataset', cfg.dataset)} is a segmentation dataset; "
                           f"{names.show('model', cfg.model)} trains on --dataset coco (with "
                           "--data-root, or own data with --train-ann, --train-images, "
                           "--val-ann, --val-images) or mini")
    if not is_detection(cfg) and cfg.dataset not in DATASETS:
        raise SegnestError(f"{names.show('dataset', cfg.dataset)} is a detection dataset; "
                           "give --model faster_rcnn, mask_rcnn, cascade_rcnn or "
                           "cascade_mask_rcnn, or a segmentation dataset")


def _coco_data_given(cfg: TrainConfig, names: _Names) -> None:
    if not is_detection(cfg):
        return
    given = [name for name in OWN_COCO_FIELDS if getattr(cfg, name)]
    if given and len(given) < len(OWN_COCO_FIELDS):
        missing = ", ".join(_flag(n) for n in OWN_COCO_FIELDS if n not in given)
        raise SegnestError(f"own COCO-format data needs all four of --train-ann, "
                           f"--train-images, --val-ann and --val-images; add {missing}")
    if given and (cfg.dataset != "coco" or cfg.data_root):
        raise SegnestError("--train-ann/--train-images/--val-ann/--val-images give the data; "
                           f"drop {names.show('dataset', cfg.dataset)} or --data-root")
    if not given and cfg.dataset == "coco" and not cfg.data_root:
        raise SegnestError("--dataset coco needs --data-root (the folder holding "
                           "annotations/instances_{train,val}2017.json, train2017/ and "
                           "val2017/), or own data with --train-ann, --train-images, "
                           "--val-ann and --val-images")


def _detection_sizes(cfg: TrainConfig, names: _Names) -> None:
    if cfg.train_min_size is not None:
        parse_min_sizes(cfg.train_min_size)


def _detection_backbone(cfg: TrainConfig, names: _Names) -> None:
    if not is_detection(cfg):
        return
    from segnest.models.detection.backbone import DETECTION_BACKBONES
    from segnest.models.resnest import RESNEST_VARIANTS

    if cfg.backbone not in DETECTION_BACKBONES:
        raise SegnestError(f"unknown {names.show('backbone', cfg.backbone)} for detection; "
                           f"choose one of: {', '.join(DETECTION_BACKBONES)}")
    if cfg.backbone in RESNEST_VARIANTS:
        _backbone_fits(cfg, names)
    elif cfg.stage_width != TrainConfig.stage_width:
        raise SegnestError(f"{names.show('stage_width', cfg.stage_width)} applies to ResNeSt "
                           f"backbones; {cfg.backbone} has torchvision's widths")


def _segmentation_only(check: Check) -> Check:
    def checked(cfg: TrainConfig, names: _Names) -> None:
        if not is_detection(cfg):
            check(cfg, names)
    return checked


DETECTION_CHECKS = (_fields_of_the_model, _dataset_of_the_model, _coco_data_given,
                    _detection_sizes)


# Rules in order: cheap ones first; those that import the models (and torch) last.
CHECKS: dict[type, tuple[Check, ...]] = {
    TrainConfig: (*DETECTION_CHECKS, _training_length, _warmup_within_iters, _scale_range,
                  _segmentation_only(_crop_fits), _floor_below_lr, _class_weights_source,
                  _ohem_settings_need_ohem, _amp_alias, _segmentation_only(_backbone_fits),
                  _detection_backbone),
    InferenceFlags: (_scales_parse, _stride_within_window),
    EvalConfig: (_confidence_needs_save_pred,),
    PretrainConfig: (_warmup_within_epochs, _imagenet_needs_data, _amp_alias, _backbone_fits),
    BenchConfig: (_known_model,),
    ExportConfig: (_end_to_end_format,),
    QuantizeConfig: (_layer_types_parse,),
}


def validate_config(cfg: Any, sources: typing.Mapping[str, str] | None = None) -> Any:
    """``cfg`` with every value type-checked, range-checked (the field's ``help_``
    constraints) and cross-checked (``CHECKS``), or the first problem as a one-line
    SegnestError. ``sources`` names where a value came from (field -> "recipe r.yaml");
    values without one are named by their flag. Returns a copy whose values have the
    field types (a recipe's ``1e4`` for an int field becomes 10000)."""
    cls, names = type(cfg), _Names(sources)
    typed = {}
    for f in fields(cls):
        tp, optional = _field_types(cls)[f.name]
        value = _typed(f.name, getattr(cfg, f.name), tp, optional, names)
        _in_range(f.name, value, f.metadata, names)
        typed[f.name] = value
    cfg = dataclasses.replace(cfg, **typed)
    for owner in reversed(cls.__mro__):
        for check in CHECKS.get(owner, ()):
            check(cfg, names)
    return cfg


def resolve_config(
    cls: type, cli: dict[str, Any], presets: dict[str, dict[str, Any]] | None = None
):
    """Merge defaults < dataset preset < recipe < command line into one ``cls`` instance,
    validated before any work (:func:`validate_config`)."""
    recipe_path = cli.get("config")
    recipe = load_recipe(recipe_path, cls) if recipe_path else {}
    known = {f.name for f in fields(cls)}
    merged: dict[str, Any] = {}
    sources: dict[str, str] = {}
    dataset = cli.get("dataset") or recipe.get("dataset")
    if presets is not None:
        dataset = dataset or next(f.default for f in fields(cls) if f.name == "dataset")
        preset = presets.get(dataset, {}) if isinstance(dataset, str) else {}
        merged.update({k: v for k, v in preset.items() if k in known})
        sources.update({k: f"the {dataset} preset" for k in merged})
    merged.update(recipe)
    recipe_label = find_recipe(recipe_path)[0] if recipe_path else None
    if recipe_path:
        _note_unused_copy(recipe_path)
    sources.update({k: f"recipe {recipe_label}" for k in recipe})
    merged.update(cli)
    for k in cli:
        sources.pop(k, None)
    unknown = sorted(set(merged) - known)
    if unknown:
        raise SegnestError(f"unknown setting(s) {', '.join(unknown)} for {cls.__name__}")
    return validate_config(cls(**merged), sources)
