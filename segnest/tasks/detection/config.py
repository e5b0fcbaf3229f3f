"""``segnest train --model faster_rcnn|mask_rcnn|cascade_rcnn|cascade_mask_rcnn``'s settings:
the shared training flags (:class:`IterationTrainingConfig`) and those of detection, with
their rules and presets.

Torch-free: the command line imports it to build its flags."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from segnest.engine.config import (
    IterationTrainingConfig,
    backbone_fits,
    lr_rule_text,
    work_dirs_text,
)
from segnest.errors import SegnestError
from segnest.schema import MIN_INPUT_SIZE, Names, default_of, help_

# The R-CNN architectures of segnest.models.detection.rcnn.ARCHITECTURES (a test keeps the
# two equal; this module does not import torch).
DETECTION_MODELS = ("faster_rcnn", "mask_rcnn", "cascade_rcnn", "cascade_mask_rcnn")
DETECTION_DATASETS = ("coco", "mini")
# The authors' 1x: lr 0.02 for 16 images, linear in the total batch; 2 images per device.
DETECTION_LR_RULE = (0.02, 16)
DETECTION_BATCH_SIZE = 2
# Per-dataset settings: COCO is the authors' 1x (90k iterations, 2 images per device on 8
# devices, 1000 warmup iterations); mini is the CPU demo's Mask R-CNN-ResNeSt-14
# (segnest demo --task detection).
DETECTION_PRESETS: dict[str, dict[str, Any]] = {
    "coco": dict(iters=90000, batch_size=DETECTION_BATCH_SIZE, warmup_iters=1000),
    "mini": dict(backbone="resnest14", stage_width=16, detector_width=32, roi_batch_size=64,
                 batch_size=4, lr=0.02, iters=800, warmup_iters=100, train_min_size="96-128",
                 test_min_size=128, max_size=160, workers=2, val_interval=200),
}
# Own COCO-format data: the four flags come together.
OWN_COCO_FIELDS = ("train_ann", "train_images", "val_ann", "val_images")


def parse_min_sizes(text: str, flag_: str = "--train-min-size") -> tuple[tuple[int, ...], str]:
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
        raise SegnestError(f"{flag_} {text!r} is not a size range, list or size of at least "
                           f"{MIN_INPUT_SIZE} px; write e.g. {flag_} 640-800, 640,672,704 or "
                           "800")
    return sizes, sampling


def _coco_data_given(cfg: DetectionConfig, names: Names) -> None:
    given = [name for name in OWN_COCO_FIELDS if getattr(cfg, name)]
    if given and len(given) < len(OWN_COCO_FIELDS):
        missing = ", ".join(names.name(n) for n in OWN_COCO_FIELDS if n not in given)
        raise SegnestError(f"own COCO-format data needs all four of "
                           f"{', '.join(map(names.name, OWN_COCO_FIELDS[:3]))} and "
                           f"{names.name(OWN_COCO_FIELDS[3])}; add {missing}")
    if given and (cfg.dataset != "coco" or cfg.data_root):
        raise SegnestError(f"{'/'.join(map(names.name, OWN_COCO_FIELDS))} give the data; "
                           f"drop {names.show('dataset', cfg.dataset)} or "
                           f"{names.name('data_root')}")
    if not given and cfg.dataset == "coco" and not cfg.data_root:
        raise SegnestError(f"{names.name('dataset')} coco needs {names.name('data_root')} "
                           "(the folder holding annotations/instances_{train,val}2017.json, "
                           "train2017/ and val2017/), or own data with "
                           f"{', '.join(map(names.name, OWN_COCO_FIELDS))}")


def _detection_sizes(cfg: DetectionConfig, names: Names) -> None:
    if cfg.train_min_size is not None:
        parse_min_sizes(cfg.train_min_size, names.name("train_min_size"))


def _stem_of_the_variant(cfg: DetectionConfig, names: Names) -> None:
    # The detection backbone keeps each variant's own stem (its ImageNet weights fit it).
    if cfg.stem_width is not None:
        raise SegnestError(f"{names.show('stem_width', cfg.stem_width)} applies to "
                           "segmentation and pretraining; a detection backbone keeps its "
                           "variant's stem: drop it")


def _detection_backbone(cfg: DetectionConfig, names: Names) -> None:
    from segnest.models.detection.backbone import DETECTION_BACKBONES  # torch: last
    from segnest.models.resnest import RESNEST_VARIANTS

    if cfg.backbone not in DETECTION_BACKBONES:
        raise SegnestError(f"unknown {names.show('backbone', cfg.backbone)} for detection; "
                           f"choose one of: {', '.join(DETECTION_BACKBONES)}")
    if cfg.backbone in RESNEST_VARIANTS:
        backbone_fits(cfg, names)
    elif cfg.stage_width != default_of(DetectionConfig, "stage_width"):
        raise SegnestError(f"{names.show('stage_width', cfg.stage_width)} applies to ResNeSt "
                           f"backbones; {cfg.backbone} has torchvision's widths")


@dataclass
class DetectionConfig(IterationTrainingConfig):
    """``segnest train --model <R-CNN>``: detection and instance segmentation on a
    ResNeSt-FPN backbone with the authors' recipe (docs/detection.md)."""

    checks = (_coco_data_given, _detection_sizes, _stem_of_the_variant, _detection_backbone)
    help_presets = DETECTION_PRESETS

    model: str = field(default="mask_rcnn", metadata=help_(
        "the detector (docs/detection.md)", choices=DETECTION_MODELS))
    dataset: str = field(default="coco", metadata=help_(
        "COCO (--data-root, or own data with --train-ann ...) or the bundled mini set",
        choices=DETECTION_DATASETS))
    data_root: str | None = field(default=None, metadata=help_(
        "COCO root: annotations/instances_{train,val}2017.json, train2017/, val2017/"))
    batch_size: int = field(default=DETECTION_BATCH_SIZE,
                            metadata=help_("images per device per step", min=1))
    lr: float | None = field(default=None, metadata=help_(
        "base learning rate", above=0,
        default_shown=lr_rule_text(DETECTION_LR_RULE, DETECTION_BATCH_SIZE)))
    work_dir: str | None = field(default=None, metadata=help_(
        "output folder", default_shown=work_dirs_text(
            "runs/{}_<model>_{}", DETECTION_PRESETS, "coco", "resnest50")
        + "; own data: runs/own_<model>_<backbone>"))
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

