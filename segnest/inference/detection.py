"""Predicting with a detection checkpoint: :class:`DetectionPredictor` (what
``segnest.load_model`` returns for one, and what ``segnest predict`` runs) gives each image's
boxes, labels, class names, scores and, for mask models, masks as COCO RLE (decoded one at
a time with :meth:`Detections.mask`, so many detections on a large photo stay small), and
draws them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

from segnest.data.base import read_rgb_image
from segnest.inference.coco import encode_masks, low_resolution_masks
from segnest.models.factory import model_from_checkpoint
from segnest.runtime.distributed import resolve_device
from segnest.runtime.record import CheckpointRecord

DEFAULT_SCORE_THRESHOLD = 0.5


@dataclass
class Detections:
    """One image's detections, highest score first. ``boxes`` are x1, y1, x2, y2 in
    pixels of the image; ``labels`` 1..K index ``class_names`` from 1."""

    boxes: np.ndarray
    labels: np.ndarray
    class_names: list[str]
    scores: np.ndarray
    masks: list[dict[str, Any]] | None
    height: int
    width: int

    def __len__(self) -> int:
        return len(self.scores)

    def mask(self, index: int) -> np.ndarray:
        """Detection ``index``'s mask as a boolean H x W array."""
        from pycocotools import mask as mask_utils

        if self.masks is None:
            raise ValueError("this model predicts boxes only (no masks)")
        return mask_utils.decode(self.masks[index]).astype(bool)

    def to_json(self) -> dict[str, Any]:
        """The detections as plain JSON values (masks as COCO compressed RLE)."""
        items = []
        for index in range(len(self)):
            item = {"box": [round(float(v), 2) for v in self.boxes[index]],
                    "label": int(self.labels[index]), "class": self.class_names[index],
                    "score": round(float(self.scores[index]), 5)}
            if self.masks is not None:
                item["mask"] = self.masks[index]
            items.append(item)
        return {"height": self.height, "width": self.width, "detections": items}


class DetectionPredictor:
    """A detection model ready to predict (eval mode, on ``device``); detections scoring
    below ``score_threshold`` are left out."""

    def __init__(self, model: torch.nn.Module, classes: list[str],
                 device: torch.device | str = "cpu",
                 score_threshold: float = DEFAULT_SCORE_THRESHOLD) -> None:
        self.model = model.to(device).eval()
        self.classes = list(classes)
        self.device = torch.device(device)
        self.score_threshold = score_threshold

    @classmethod
    def from_checkpoint(cls, checkpoint: dict[str, Any], device: str | None = None,
                        source: str = "checkpoint",
                        score_threshold: float = DEFAULT_SCORE_THRESHOLD) -> DetectionPredictor:
        model = model_from_checkpoint(checkpoint, source=source, task="detection")
        classes = (CheckpointRecord.read(checkpoint).classes
                   or [str(i) for i in range(1, model.num_classes + 1)])
        return cls(model, classes, resolve_device(device), score_threshold)

    @property
    def has_masks(self) -> bool:
        return bool(self.model.has_masks)

    def read(self, image: str | os.PathLike | np.ndarray) -> np.ndarray:
        return image if isinstance(image, np.ndarray) else read_rgb_image(image)

    @torch.no_grad()
    def predict(self, image: np.ndarray) -> Detections:
        height, width = image.shape[:2]
        tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float() / 255
        with low_resolution_masks(self.model):
            output = self.model([tensor.to(self.device)])[0]
        keep = output["scores"] >= self.score_threshold
        boxes = output["boxes"][keep].float().cpu()
        masks = (encode_masks(output["mask_probs"][keep].float().cpu(), boxes, height, width)
                 if "mask_probs" in output else None)
        labels = output["labels"][keep].cpu().numpy()
        return Detections(boxes.numpy(), labels, [self.classes[i - 1] for i in labels],
                          output["scores"][keep].float().cpu().numpy(), masks, height, width)

    def __call__(self, images: Any) -> Detections | list[Detections]:
        """Detections of one image (a path or an RGB uint8 array) or of a list of them."""
        if isinstance(images, list):
            return [self.predict(self.read(image)) for image in images]
        return self.predict(self.read(images))

    def draw(self, image: np.ndarray, detections: Detections, alpha: float = 0.45
             ) -> np.ndarray:
        """The image with masks filled, boxes drawn and each labelled 'class score'."""
        canvas = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
        colours = [_colour(int(label)) for label in detections.labels]
        if detections.masks is not None and len(detections):
            masks = torch.from_numpy(np.stack([detections.mask(i)
                                               for i in range(len(detections))]))
            canvas = draw_segmentation_masks(canvas, masks, alpha=alpha, colors=colours)
        if len(detections):
            captions = [f"{name} {score:.2f}" for name, score in
                        zip(detections.class_names, detections.scores, strict=True)]
            canvas = draw_bounding_boxes(canvas, torch.from_numpy(detections.boxes),
                                         labels=captions, colors=colours, width=2)
        return canvas.permute(1, 2, 0).numpy()


def draw_ground_truth(image: np.ndarray, boxes: np.ndarray, labels: np.ndarray,
                      classes: list[str], masks: np.ndarray | None = None,
                      alpha: float = 0.45) -> np.ndarray:
    """The image with its annotated instances drawn as :meth:`DetectionPredictor.draw`
    draws detections (the same colour per class), each labelled with its class name."""
    names = [classes[int(label) - 1] for label in labels]
    detections = Detections(np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(labels),
                            names, np.ones(len(names), np.float32), None, *image.shape[:2])
    canvas = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
    colours = [_colour(int(label)) for label in labels]
    if masks is not None and len(names):
        canvas = draw_segmentation_masks(canvas, torch.from_numpy(np.asarray(masks, bool)),
                                         alpha=alpha, colors=colours)
    if len(names):
        canvas = draw_bounding_boxes(canvas, torch.from_numpy(detections.boxes), labels=names,
                                     colors=colours, width=2)
    return canvas.permute(1, 2, 0).numpy()


def _colour(label: int) -> tuple[int, int, int]:
    """A distinct, stable colour per label."""
    rng = np.random.default_rng(label * 7919)
    return tuple(int(v) for v in rng.integers(40, 256, 3))
