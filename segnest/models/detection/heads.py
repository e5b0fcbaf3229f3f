"""The R-CNN parts on top of torchvision's: a RoIAlign pooler with detectron2's aligned
mode, an RPN and RoI heads whose box loss is a setting, a resizing transform with
range-sampled training sizes, and the Cascade R-CNN RoI heads torchvision lacks.

Each difference from torchvision is a constructor argument whose torchvision value gives
torchvision's behaviour exactly (tests/test_detection_models.py compares the outputs):

* ``LevelRoIAlign(aligned=False, sampling_ratio=2)`` is ``MultiScaleRoIAlign``;
  detectron2's ROIAlignV2 is ``aligned=True, sampling_ratio=0`` (half-pixel offset,
  adaptive sampling).
* ``box_loss_beta=1/9`` is torchvision's smooth L1; ``0.0`` is the L1 loss detectron2
  uses for the RPN and the box head (``SMOOTH_L1_BETA: 0.0``).
* ``RCNNTransform(train_size_sampling="choice")`` draws the training short side from a
  list as torchvision does; ``"range"`` draws it uniformly from ``[min, max]`` as
  detectron2's ``MIN_SIZE_TRAIN_SAMPLING: range`` (the authors' 640-800).

The cascade follows detectron2's ``CascadeROIHeads`` (the code behind the authors'
numbers): stage 0 samples 512 RoIs per image from the proposals plus the ground truth;
stage k > 0 takes the previous stage's boxes (detached, clipped, empty ones dropped in
training) and labels all of them at its own IoU without sampling; every stage has its own
box head and a class-agnostic regressor with its own box-coder weights; the pooled
features' gradient is scaled by 1/stages; at test time the class scores are averaged over
the stages and the boxes come from the last stage. The mask head (one, as in detectron2)
is trained on stage 0's foreground RoIs and runs on the final detections.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.roi_heads import (
    RoIHeads,
    maskrcnn_inference,
    maskrcnn_loss,
)
from torchvision.models.detection.rpn import RegionProposalNetwork
from torchvision.models.detection.transform import (
    GeneralizedRCNNTransform,
    _resize_image_and_masks,
    resize_boxes,
)
from torchvision.ops import boxes as box_ops
from torchvision.ops import roi_align

TRAIN_SIZE_SAMPLINGS = ("choice", "range")
# torchvision's smooth-L1 transition point for both the RPN and the box head.
TORCHVISION_BOX_LOSS_BETA = 1 / 9


def box_regression_loss(deltas: Tensor, targets: Tensor, beta: float) -> Tensor:
    """Summed smooth L1 with transition ``beta``; ``beta=0`` is the plain L1 loss."""
    if beta == 0:
        return F.l1_loss(deltas, targets, reduction="sum")
    return F.smooth_l1_loss(deltas, targets, beta=beta, reduction="sum")


def per_image(values: Tensor, counts: list[int]) -> list[Tensor] | tuple[Tensor, ...]:
    """``values`` split into consecutive parts of ``counts`` rows, one per image. One image
    keeps all rows unsplit: a traced (ONNX) graph would otherwise fix the row count of the
    example image."""
    return [values] if len(counts) == 1 else values.split(counts)


class LevelRoIAlign(nn.Module):
    """RoIAlign over FPN levels, each box pooled from the level its size maps to
    (FPN paper eq. 1: ``floor(4 + log2(sqrt(area) / 224))``, clamped to the levels).

    The level scales are read from the feature and image sizes on every call (torchvision
    fixes them at the first call)."""

    def __init__(self, featmap_names: tuple[str, ...], output_size: int, sampling_ratio: int,
                 aligned: bool, canonical_scale: int = 224, canonical_level: int = 4) -> None:
        super().__init__()
        self.featmap_names = tuple(featmap_names)
        self.output_size = (output_size, output_size)
        self.sampling_ratio = sampling_ratio
        self.aligned = aligned
        self.canonical_scale = canonical_scale
        self.canonical_level = canonical_level

    def forward(self, features: dict[str, Tensor], boxes: list[Tensor],
                image_shapes: list[tuple[int, int]]) -> Tensor:
        maps = [features[name] for name in self.featmap_names]
        tallest = max(shape[0] for shape in image_shapes)
        scales = [2.0 ** round(math.log2(level.shape[-2] / tallest)) for level in maps]
        first_level = -math.log2(scales[0])
        last_level = -math.log2(scales[-1])
        rois = torch.cat([torch.cat([torch.full_like(b[:, :1], index), b], dim=1)
                          for index, b in enumerate(boxes)])
        sides = torch.sqrt(box_ops.box_area(rois[:, 1:]))
        levels = torch.floor(self.canonical_level
                             + torch.log2(sides / self.canonical_scale) + 1e-6)
        levels = (levels.clamp(first_level, last_level) - first_level).to(torch.int64)
        result = maps[0].new_zeros((rois.shape[0], maps[0].shape[1], *self.output_size))
        for index, (level_map, scale) in enumerate(zip(maps, scales, strict=True)):
            chosen = torch.where(levels == index)[0]
            pooled = roi_align(level_map, rois[chosen], self.output_size, spatial_scale=scale,
                               sampling_ratio=self.sampling_ratio, aligned=self.aligned)
            result[chosen] = pooled.to(result.dtype)
        return result


class RPN(RegionProposalNetwork):
    """torchvision's RPN with the box regression loss's smooth-L1 ``beta`` a setting."""

    def __init__(self, *args, box_loss_beta: float = TORCHVISION_BOX_LOSS_BETA, **kwargs):
        super().__init__(*args, **kwargs)
        self.box_loss_beta = box_loss_beta

    def compute_loss(self, objectness: Tensor, pred_bbox_deltas: Tensor, labels: list[Tensor],
                     regression_targets: list[Tensor]) -> tuple[Tensor, Tensor]:
        positive, negative = self.fg_bg_sampler(labels)
        positive = torch.where(torch.cat(positive))[0]
        negative = torch.where(torch.cat(negative))[0]
        sampled = torch.cat([positive, negative])
        targets = torch.cat(regression_targets)
        box_loss = box_regression_loss(pred_bbox_deltas[positive], targets[positive],
                                       self.box_loss_beta) / sampled.numel()
        objectness_loss = F.binary_cross_entropy_with_logits(
            objectness.flatten()[sampled], torch.cat(labels)[sampled])
        return objectness_loss, box_loss


class RCNNTransform(GeneralizedRCNNTransform):
    """Normalise, resize (short side to a drawn training size or the test size, long side
    at most ``max_size``) and batch; after inference, map boxes back to the input size.

    ``paste_masks=False`` leaves each mask as the head's low-resolution probabilities
    (``mask_probs``, N x 1 x M x M) so that a caller can paste and encode one mask at a
    time instead of holding N full-size masks (see ``segnest.inference.coco``).
    """

    def __init__(self, train_min_size: tuple[int, ...], train_size_sampling: str,
                 test_min_size: int, max_size: int, image_mean: list[float],
                 image_std: list[float], paste_masks: bool = True) -> None:
        if train_size_sampling not in TRAIN_SIZE_SAMPLINGS:
            raise ValueError(f"train_size_sampling must be one of {TRAIN_SIZE_SAMPLINGS}, "
                             f"got '{train_size_sampling}'")
        if train_size_sampling == "range" and len(train_min_size) != 2:
            raise ValueError("train_size_sampling='range' takes train_min_size=(low, high), "
                             f"got {train_min_size}")
        super().__init__(tuple(train_min_size), max_size, image_mean, image_std)
        self.train_size_sampling = train_size_sampling
        self.test_min_size = test_min_size
        self.paste_masks = paste_masks

    def draw_train_size(self) -> int:
        if self.train_size_sampling == "range":
            low, high = self.min_size
            return int(torch.randint(low, high + 1, ()).item())
        return self.torch_choice(list(self.min_size))

    def resize(self, image: Tensor, target: dict[str, Tensor] | None = None
               ) -> tuple[Tensor, dict[str, Tensor] | None]:
        height, width = image.shape[-2:]
        size = self.draw_train_size() if self.training else self.test_min_size
        image, target = _resize_image_and_masks(image, size, self.max_size, target)
        if target is not None:
            target["boxes"] = resize_boxes(target["boxes"], (height, width), image.shape[-2:])
        return image, target

    def postprocess(self, result: list[dict[str, Tensor]], image_shapes: list[tuple[int, int]],
                    original_image_sizes: list[tuple[int, int]]) -> list[dict[str, Tensor]]:
        if self.paste_masks or self.training:
            return super().postprocess(result, image_shapes, original_image_sizes)
        for prediction, size, original in zip(result, image_shapes, original_image_sizes,
                                              strict=True):
            prediction["boxes"] = resize_boxes(prediction["boxes"], size, original)
            if "masks" in prediction:
                prediction["mask_probs"] = prediction.pop("masks")
        return result


def fast_rcnn_losses(class_logits: Tensor, box_regression: Tensor, labels: list[Tensor],
                     regression_targets: list[Tensor], beta: float) -> dict[str, Tensor]:
    """Cross-entropy over the sampled RoIs and box regression on the foreground ones,
    normalised by the number of RoIs (torchvision's and detectron2's convention). A
    class-agnostic regressor (4 outputs) regresses every foreground RoI with its one box."""
    labels_all = torch.cat(labels)
    targets = torch.cat(regression_targets)
    foreground = torch.where(labels_all > 0)[0]
    deltas = box_regression.reshape(box_regression.shape[0], -1, 4)
    chosen_class = labels_all[foreground] if deltas.shape[1] > 1 else torch.zeros_like(
        labels_all[foreground])
    box_loss = box_regression_loss(deltas[foreground, chosen_class], targets[foreground], beta)
    return {"loss_classifier": F.cross_entropy(class_logits, labels_all),
            "loss_box_reg": box_loss / labels_all.numel()}


class RCNNRoIHeads(RoIHeads):
    """torchvision's box (and mask) RoI heads, with the box loss's ``beta`` a setting and
    the detections chosen from decoded boxes and probabilities, so that the cascade can
    feed its averaged scores through the same selection."""

    def __init__(self, *args, box_loss_beta: float = TORCHVISION_BOX_LOSS_BETA, **kwargs):
        super().__init__(*args, **kwargs)
        self.box_loss_beta = box_loss_beta

    def forward(self, features: dict[str, Tensor], proposals: list[Tensor],
                image_shapes: list[tuple[int, int]],
                targets: list[dict[str, Tensor]] | None = None
                ) -> tuple[list[dict[str, Tensor]], dict[str, Tensor]]:
        if self.training:
            proposals, matched_idxs, labels, losses = self.box_training(
                features, proposals, image_shapes, targets)
            result: list[dict[str, Tensor]] = []
        else:
            matched_idxs, labels, losses = None, None, {}
            result = self.box_inference(features, proposals, image_shapes)
        if self.has_mask():
            losses.update(self.forward_masks(features, proposals, matched_idxs, labels,
                                             image_shapes, targets, result))
        return result, losses

    def box_training(self, features, proposals, image_shapes, targets):
        """Sample RoIs and return them with their matches, labels and the box losses."""
        proposals, matched_idxs, labels, regression_targets = self.select_training_samples(
            proposals, targets)
        features_per_roi = self.box_head(self.box_roi_pool(features, proposals, image_shapes))
        class_logits, box_regression = self.box_predictor(features_per_roi)
        losses = fast_rcnn_losses(class_logits, box_regression, labels, regression_targets,
                                  self.box_loss_beta)
        return proposals, matched_idxs, labels, losses

    def box_inference(self, features, proposals, image_shapes) -> list[dict[str, Tensor]]:
        features_per_roi = self.box_head(self.box_roi_pool(features, proposals, image_shapes))
        class_logits, box_regression = self.box_predictor(features_per_roi)
        boxes = self.box_coder.decode(box_regression, proposals)
        return self.select_detections(boxes, F.softmax(class_logits, -1),
                                      [len(p) for p in proposals], image_shapes)

    def select_detections(self, boxes: Tensor, scores: Tensor, boxes_per_image: list[int],
                          image_shapes: list[tuple[int, int]]) -> list[dict[str, Tensor]]:
        """Per image: clip, one candidate per (RoI, foreground class), drop scores at or
        below ``score_thresh`` and tiny boxes, class-wise NMS, keep the top
        ``detections_per_img`` (torchvision's ``postprocess_detections``)."""
        num_classes = scores.shape[-1]
        result = []
        for image_boxes, image_scores, shape in zip(per_image(boxes, boxes_per_image),
                                                    per_image(scores, boxes_per_image),
                                                    image_shapes, strict=True):
            image_boxes = box_ops.clip_boxes_to_image(image_boxes, shape)
            labels = torch.arange(num_classes, device=scores.device).view(1, -1)
            labels = labels.expand_as(image_scores)
            image_boxes = image_boxes[:, 1:].reshape(-1, 4)
            image_scores = image_scores[:, 1:].reshape(-1)
            labels = labels[:, 1:].reshape(-1)
            keep = torch.where(image_scores > self.score_thresh)[0]
            image_boxes, image_scores, labels = image_boxes[keep], image_scores[keep], labels[keep]
            keep = box_ops.remove_small_boxes(image_boxes, min_size=1e-2)
            image_boxes, image_scores, labels = image_boxes[keep], image_scores[keep], labels[keep]
            keep = box_ops.batched_nms(image_boxes, image_scores, labels, self.nms_thresh)
            keep = keep[: self.detections_per_img]
            result.append({"boxes": image_boxes[keep], "labels": labels[keep],
                           "scores": image_scores[keep]})
        return result

    def forward_masks(self, features, proposals, matched_idxs, labels, image_shapes, targets,
                      result) -> dict[str, Tensor]:
        """Training: the mask loss on the foreground RoIs. Inference: each detection's mask
        probabilities for its class, added to ``result`` as ``masks``."""
        if self.training:
            foreground = [torch.where(image_labels > 0)[0] for image_labels in labels]
            mask_rois = [p[keep] for p, keep in zip(proposals, foreground, strict=True)]
            positive_matches = [m[keep] for m, keep in zip(matched_idxs, foreground, strict=True)]
        else:
            mask_rois = [detections["boxes"] for detections in result]
        mask_logits = self.mask_predictor(
            self.mask_head(self.mask_roi_pool(features, mask_rois, image_shapes)))
        if self.training:
            return {"loss_mask": maskrcnn_loss(
                mask_logits, mask_rois, [t["masks"] for t in targets],
                [t["labels"] for t in targets], positive_matches)}
        probabilities = maskrcnn_inference(mask_logits, [d["labels"] for d in result])
        for detections, probability in zip(result, probabilities, strict=True):
            detections["masks"] = probability
        return {}


class _ScaleGradient(torch.autograd.Function):
    """Identity forward; gradient times ``scale`` backward (detectron2's cascade scales
    the pooled features' gradient by 1/stages, since every stage backpropagates into
    the shared backbone)."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad * ctx.scale, None


class CascadeRoIHeads(RCNNRoIHeads):
    """Cascade R-CNN box heads (see the module docstring); ``box_head`` and
    ``box_predictor`` are ModuleLists with one entry per stage, and each stage's predictor
    regresses one class-agnostic box."""

    def __init__(self, box_roi_pool: nn.Module, box_head: nn.ModuleList,
                 box_predictor: nn.ModuleList, stage_ious: tuple[float, ...],
                 stage_box_weights: tuple[tuple[float, float, float, float], ...],
                 batch_size_per_image: int, positive_fraction: float, score_thresh: float,
                 nms_thresh: float, detections_per_img: int, box_loss_beta: float,
                 mask_roi_pool: nn.Module | None = None, mask_head: nn.Module | None = None,
                 mask_predictor: nn.Module | None = None) -> None:
        if not len(box_head) == len(box_predictor) == len(stage_ious) == len(stage_box_weights):
            raise ValueError("a cascade needs one box head, predictor, IoU and box-coder "
                             f"weights per stage; got {len(box_head)}, {len(box_predictor)}, "
                             f"{len(stage_ious)}, {len(stage_box_weights)}")
        super().__init__(
            box_roi_pool, box_head, box_predictor, stage_ious[0], stage_ious[0],
            batch_size_per_image, positive_fraction, stage_box_weights[0], score_thresh,
            nms_thresh, detections_per_img, mask_roi_pool=mask_roi_pool, mask_head=mask_head,
            mask_predictor=mask_predictor, box_loss_beta=box_loss_beta)
        self.stage_ious = tuple(stage_ious)
        self.stage_box_weights = tuple(tuple(w) for w in stage_box_weights)
        self.stage_matchers = [det_utils.Matcher(iou, iou, allow_low_quality_matches=False)
                               for iou in self.stage_ious]
        self.stage_coders = [det_utils.BoxCoder(w) for w in self.stage_box_weights]

    @property
    def num_stages(self) -> int:
        return len(self.stage_ious)

    def run_stage(self, stage: int, features, rois, image_shapes) -> tuple[Tensor, Tensor]:
        pooled = self.box_roi_pool(features, rois, image_shapes)
        if self.training:
            pooled = _ScaleGradient.apply(pooled, 1.0 / self.num_stages)
        return self.box_predictor[stage](self.box_head[stage](pooled))

    def next_rois(self, stage: int, box_regression: Tensor, rois: list[Tensor],
                  image_shapes: list[tuple[int, int]]) -> list[Tensor]:
        """The boxes stage ``stage`` regresses its RoIs to, as the next stage's RoIs."""
        boxes = self.stage_coders[stage].decode(box_regression.detach(), rois)[:, 0]
        next_rois = []
        for image_boxes, shape in zip(per_image(boxes, [len(r) for r in rois]), image_shapes,
                                      strict=True):
            image_boxes = box_ops.clip_boxes_to_image(image_boxes, shape)
            if self.training:
                widths = image_boxes[:, 2] - image_boxes[:, 0]
                heights = image_boxes[:, 3] - image_boxes[:, 1]
                image_boxes = image_boxes[(widths > 0) & (heights > 0)]
            next_rois.append(image_boxes)
        return next_rois

    def label_rois(self, stage: int, rois: list[Tensor], targets: list[dict[str, Tensor]]
                   ) -> tuple[list[Tensor], list[Tensor]]:
        """Every RoI's class (0 = background below the stage's IoU) and its regression
        target under the stage's box-coder weights."""
        labels, matched_boxes = [], []
        for image_rois, target in zip(rois, targets, strict=True):
            gt_boxes = target["boxes"].to(image_rois.dtype)
            if gt_boxes.numel() == 0:
                labels.append(torch.zeros(len(image_rois), dtype=torch.int64,
                                          device=image_rois.device))
                matched_boxes.append(torch.zeros_like(image_rois))
                continue
            matches = self.stage_matchers[stage](box_ops.box_iou(gt_boxes, image_rois))
            image_labels = target["labels"][matches.clamp(min=0)].to(torch.int64)
            image_labels[matches < 0] = 0
            labels.append(image_labels)
            matched_boxes.append(gt_boxes[matches.clamp(min=0)])
        return labels, list(self.stage_coders[stage].encode(matched_boxes, rois))

    def box_training(self, features, proposals, image_shapes, targets):
        proposals, matched_idxs, labels, regression_targets = self.select_training_samples(
            proposals, targets)
        losses: dict[str, Tensor] = {}
        rois, stage_labels = proposals, labels
        for stage in range(self.num_stages):
            class_logits, box_regression = self.run_stage(stage, features, rois, image_shapes)
            stage_losses = fast_rcnn_losses(class_logits, box_regression, stage_labels,
                                            regression_targets, self.box_loss_beta)
            losses.update({f"{name}_stage{stage}": value for name, value in stage_losses.items()})
            if stage + 1 < self.num_stages:
                rois = self.next_rois(stage, box_regression, rois, image_shapes)
                stage_labels, regression_targets = self.label_rois(stage + 1, rois, targets)
        return proposals, matched_idxs, labels, losses

    def box_inference(self, features, proposals, image_shapes) -> list[dict[str, Tensor]]:
        rois = proposals
        stage_scores = []
        for stage in range(self.num_stages):
            class_logits, box_regression = self.run_stage(stage, features, rois, image_shapes)
            stage_scores.append(F.softmax(class_logits, -1))
            if stage + 1 < self.num_stages:
                rois = self.next_rois(stage, box_regression, rois, image_shapes)
        scores = torch.stack(stage_scores).mean(dim=0)
        boxes = self.stage_coders[-1].decode(box_regression, rois)
        return self.select_detections(boxes.expand(-1, scores.shape[1], -1), scores,
                                      [len(r) for r in rois], image_shapes)
