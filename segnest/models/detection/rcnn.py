"""Faster, Mask, Cascade and Cascade Mask R-CNN on an FPN backbone, assembled from
torchvision's detection blocks and :mod:`segnest.models.detection.heads`.

Every setting where the authors' recipe (their detectron2 configs: ``Base-RCNN-FPN`` plus
``*_ResNeSt_*_FPN_syncbn_range-scale_1x``) and torchvision's ``*_fpn_v2`` models differ is
a field of :class:`RCNNSettings`; ``recipe="authors"`` (the default) and
``recipe="torchvision"`` pick the one or the other, and any field can be overridden.

``num_classes`` counts object classes (80 for COCO); the models use label 0 for the
background internally, so object labels are 1..num_classes in targets and outputs.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, fields, replace
from os import PathLike
from typing import Any

from torch import nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.rpn import RPNHead

from segnest.errors import SegnestError
from segnest.models.detection.backbone import (
    BACKBONE_NORMS,
    DETECTION_BACKBONES,
    ROI_LEVELS,
    FPNBackbone,
    build_trunk,
    freeze_trunk,
)
from segnest.models.detection.heads import (
    RPN,
    TORCHVISION_BOX_LOSS_BETA,
    TRAIN_SIZE_SAMPLINGS,
    CascadeRoIHeads,
    LevelRoIAlign,
    RCNNRoIHeads,
    RCNNTransform,
)
from segnest.models.registry import register_head
from segnest.models.weights import load_pretrained

# ImageNet statistics on [0, 1] images: detectron2's ResNeSt configs use the same values
# on 0-255 RGB (PIXEL_MEAN 123.68, 116.779, 103.939; PIXEL_STD 58.393, 57.12, 57.375).
IMAGE_MEAN = [0.485, 0.456, 0.406]
IMAGE_STD = [0.229, 0.224, 0.225]

# architecture -> (has a mask head, is a cascade)
ARCHITECTURES: dict[str, tuple[bool, bool]] = {
    "faster_rcnn": (False, False),
    "mask_rcnn": (True, False),
    "cascade_rcnn": (False, True),
    "cascade_mask_rcnn": (True, True),
}

ANCHOR_SIZES = ((32,), (64,), (128,), (256,), (512,))
ANCHOR_RATIOS = ((0.5, 1.0, 2.0),) * len(ANCHOR_SIZES)
BOX_POOL_SIZE, MASK_POOL_SIZE = 7, 14
HEAD_CONVS = 4


@dataclass(frozen=True)
class RCNNSettings:
    """The recipe settings; the defaults are the authors' (detectron2) values."""

    # Short side at training: drawn from [low, high] ("range") or from the list ("choice").
    train_min_size: tuple[int, ...] = (640, 800)
    train_size_sampling: str = "range"
    test_min_size: int = 800
    max_size: int = 1333
    # Trunk stages 2-4: trainable BN ("bn", SyncBN under DDP) or frozen BN ("frozen").
    backbone_norm: str = "bn"
    # Stem + this many stages get no gradients and frozen BN (detectron2 FREEZE_AT=2 -> 1).
    frozen_stages: int = 1
    # BatchNorm in the FPN and in the box/mask head convolutions.
    fpn_norm: bool = True
    head_norm: bool = True
    # 3x3 convolutions in the RPN head (detectron2's StandardRPNHead: 1; torchvision v2: 2).
    rpn_convs: int = 1
    rpn_post_nms_top_n_train: int = 1000
    # detectron2's ROIAlignV2: half-pixel aligned, adaptive sampling (0).
    roi_align_aligned: bool = True
    roi_sampling_ratio: int = 0
    # Smooth-L1 beta of the box regression losses; 0 is L1 (detectron2 SMOOTH_L1_BETA 0).
    rpn_box_loss_beta: float = 0.0
    box_loss_beta: float = 0.0
    # Sizes (the same in both recipes; smaller values make the tiny models of tests and
    # CPU demos).
    fpn_channels: int = 256
    head_channels: int = 256
    box_fc_channels: int = 1024
    roi_batch_size_per_image: int = 512
    rpn_pre_nms_top_n_train: int = 2000
    rpn_pre_nms_top_n_test: int = 1000
    rpn_post_nms_top_n_test: int = 1000
    detections_per_image: int = 100
    cascade_ious: tuple[float, ...] = (0.5, 0.6, 0.7)
    cascade_box_weights: tuple[tuple[float, float, float, float], ...] = (
        (10.0, 10.0, 5.0, 5.0), (20.0, 20.0, 10.0, 10.0), (30.0, 30.0, 15.0, 15.0))


AUTHORS = RCNNSettings()
# torchvision's fasterrcnn/maskrcnn_resnet50_fpn_v2 with a pretrained trunk.
TORCHVISION = RCNNSettings(
    train_min_size=(800,), train_size_sampling="choice", backbone_norm="frozen", rpn_convs=2,
    rpn_post_nms_top_n_train=2000, roi_align_aligned=False, roi_sampling_ratio=2,
    rpn_box_loss_beta=TORCHVISION_BOX_LOSS_BETA, box_loss_beta=TORCHVISION_BOX_LOSS_BETA)
RECIPES = {"authors": AUTHORS, "torchvision": TORCHVISION}
SETTING_NAMES = frozenset(field.name for field in fields(RCNNSettings))


def recipe_settings(recipe: str, architecture: str, **overrides: Any) -> RCNNSettings:
    """The settings of ``recipe`` for ``architecture`` with ``overrides`` applied."""
    if recipe not in RECIPES:
        raise SegnestError(f"recipe must be one of {sorted(RECIPES)}, got '{recipe}'")
    unknown = sorted(set(overrides) - SETTING_NAMES)
    if unknown:
        raise TypeError(f"unknown detection settings {unknown}; valid: {sorted(SETTING_NAMES)}")
    base = RECIPES[recipe]
    if recipe == "authors" and ARCHITECTURES[architecture][1]:
        # The authors' cascade configs keep 2000 proposals per image in training.
        base = replace(base, rpn_post_nms_top_n_train=2000)
    settings = replace(base, **overrides)
    _check_choices(settings)
    return settings


def _check_choices(settings: RCNNSettings) -> None:
    """Settings with a fixed set of values, refused before anything is built."""
    choices = {"train_size_sampling": TRAIN_SIZE_SAMPLINGS, "backbone_norm": BACKBONE_NORMS}
    for name, allowed in choices.items():
        if getattr(settings, name) not in allowed:
            raise SegnestError(f"detection setting {name} must be one of {allowed}, got "
                               f"{getattr(settings, name)!r}")
    if settings.train_size_sampling == "range" and len(settings.train_min_size) != 2:
        raise SegnestError("train_size_sampling 'range' takes train_min_size (low, high), got "
                           f"{tuple(settings.train_min_size)}")


class RCNN(GeneralizedRCNN):
    """A two-stage detector: ``backbone`` -> ``rpn`` -> ``roi_heads``, with ``transform``
    resizing inputs and mapping the outputs back (torchvision's ``GeneralizedRCNN``).

    Training mode takes ``(images, targets)`` and returns the loss terms; eval mode takes
    a list of 0-1 float CHW images and returns per image ``boxes`` (x1, y1, x2, y2 in
    input pixels), ``labels`` (1..num_classes), ``scores`` and, for mask models, ``masks``
    (N x 1 x H x W probabilities; see ``RCNNTransform.paste_masks``).
    """

    def __init__(self, backbone: FPNBackbone, rpn: RPN, roi_heads: RCNNRoIHeads,
                 transform: RCNNTransform, num_classes: int, architecture: str,
                 settings: RCNNSettings) -> None:
        super().__init__(backbone, rpn, roi_heads, transform)
        self.num_classes = num_classes
        self.architecture = architecture
        self.settings = settings

    @property
    def has_masks(self) -> bool:
        return self.roi_heads.has_mask()


def _norm(enabled: bool):
    return nn.BatchNorm2d if enabled else None


def build_rcnn(architecture: str, backbone_name: str, num_classes: int, *,
               recipe: str = "authors", pretrained_backbone: str | PathLike | None = None,
               stage_width: int | None = None, **settings: Any) -> RCNN:
    """Build ``architecture`` (one of :data:`ARCHITECTURES`) on ``backbone_name`` (a
    ResNeSt variant or ``resnet50``) for ``num_classes`` object classes.

    ``pretrained_backbone`` is a local classification checkpoint (the official ResNeSt
    ImageNet weights, a torchvision ResNet-50 state dict, a ``segnest pretrain`` export)
    loaded into the trunk before it is frozen; ``stage_width`` shrinks a ResNeSt trunk
    for tests and CPU demos; every other keyword is a field of :class:`RCNNSettings`.
    """
    if architecture not in ARCHITECTURES:
        raise SegnestError(f"architecture must be one of {sorted(ARCHITECTURES)}, "
                         f"got '{architecture}'")
    if backbone_name not in DETECTION_BACKBONES:
        raise SegnestError(f"backbone must be one of {list(DETECTION_BACKBONES)}, "
                         f"got '{backbone_name}'")
    if num_classes < 1:
        raise SegnestError(f"num_classes counts object classes and must be >= 1, got {num_classes}")
    has_masks, is_cascade = ARCHITECTURES[architecture]
    config = recipe_settings(recipe, architecture, **settings)

    trunk = build_trunk(backbone_name, **({} if stage_width is None
                                          else {"stage_width": stage_width}))
    if pretrained_backbone is not None:
        load_pretrained(trunk, pretrained_backbone)
    freeze_trunk(trunk, config.frozen_stages, config.backbone_norm)
    backbone = FPNBackbone(trunk, config.fpn_channels, fpn_norm=config.fpn_norm)

    anchors = AnchorGenerator(ANCHOR_SIZES, ANCHOR_RATIOS)
    rpn = RPN(
        anchors, RPNHead(config.fpn_channels, anchors.num_anchors_per_location()[0],
                         conv_depth=config.rpn_convs),
        fg_iou_thresh=0.7, bg_iou_thresh=0.3, batch_size_per_image=256, positive_fraction=0.5,
        pre_nms_top_n=dict(training=config.rpn_pre_nms_top_n_train,
                           testing=config.rpn_pre_nms_top_n_test),
        post_nms_top_n=dict(training=config.rpn_post_nms_top_n_train,
                            testing=config.rpn_post_nms_top_n_test),
        nms_thresh=0.7, box_loss_beta=config.rpn_box_loss_beta,
    )

    def pooler(size: int) -> LevelRoIAlign:
        return LevelRoIAlign(ROI_LEVELS, size, config.roi_sampling_ratio,
                             config.roi_align_aligned)

    def box_head() -> nn.Module:
        return FastRCNNConvFCHead((config.fpn_channels, BOX_POOL_SIZE, BOX_POOL_SIZE),
                                  [config.head_channels] * HEAD_CONVS, [config.box_fc_channels],
                                  norm_layer=_norm(config.head_norm))

    mask_parts: dict[str, nn.Module] = {}
    if has_masks:
        mask_parts = dict(
            mask_roi_pool=pooler(MASK_POOL_SIZE),
            mask_head=MaskRCNNHeads(config.fpn_channels, [config.head_channels] * HEAD_CONVS, 1,
                                    norm_layer=_norm(config.head_norm)),
            mask_predictor=MaskRCNNPredictor(config.head_channels, config.head_channels,
                                             num_classes + 1),
        )
    inference = dict(score_thresh=0.05, nms_thresh=0.5,
                     detections_per_img=config.detections_per_image)
    if is_cascade:
        stages = len(config.cascade_ious)
        roi_heads: RCNNRoIHeads = CascadeRoIHeads(
            pooler(BOX_POOL_SIZE), nn.ModuleList(box_head() for _ in range(stages)),
            nn.ModuleList(ClassAgnosticBoxPredictor(config.box_fc_channels, num_classes + 1)
                          for _ in range(stages)),
            stage_ious=config.cascade_ious, stage_box_weights=config.cascade_box_weights,
            batch_size_per_image=config.roi_batch_size_per_image, positive_fraction=0.25,
            box_loss_beta=config.box_loss_beta, **inference, **mask_parts)
    else:
        roi_heads = RCNNRoIHeads(
            pooler(BOX_POOL_SIZE), box_head(),
            FastRCNNPredictor(config.box_fc_channels, num_classes + 1),
            fg_iou_thresh=0.5, bg_iou_thresh=0.5,
            batch_size_per_image=config.roi_batch_size_per_image, positive_fraction=0.25,
            bbox_reg_weights=None, **inference, box_loss_beta=config.box_loss_beta,
            **mask_parts)
    transform = RCNNTransform(tuple(config.train_min_size), config.train_size_sampling,
                              config.test_min_size, config.max_size, IMAGE_MEAN, IMAGE_STD)
    return RCNN(backbone, rpn, roi_heads, transform, num_classes, architecture, config)


class ClassAgnosticBoxPredictor(FastRCNNPredictor):
    """Class scores for background + classes, and one box regression (4 deltas) per RoI."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__(in_channels, num_classes)
        self.bbox_pred = nn.Linear(in_channels, 4)


for _architecture in ARCHITECTURES:
    register_head(_architecture, task="detection", backbones=DETECTION_BACKBONES)(
        functools.partial(build_rcnn, _architecture))
