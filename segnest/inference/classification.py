"""Predicting with a classification checkpoint (``segnest pretrain``): :class:`ClassifierPredictor`
is what ``segnest.load_model`` returns for one, what ``segnest predict`` runs on photos and
what ``segnest eval`` measures on an image folder, so the three see the same pixels.

An image is prepared as pretraining's validation prepared it (the checkpoint's ``crop_size``
and ``crop_pct``): the short side resized to ``crop_size / crop_pct``, the centre
``crop_size`` square cut out, normalised with ImageNet's mean and std. The result is the
``top_k`` classes by softmax probability, named with the class names the checkpoint carries.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from segnest.data.base import open_rgb_image
from segnest.data.classification import build_transforms
from segnest.errors import SegnestError
from segnest.inference.strategies import inference_model
from segnest.models.factory import model_from_checkpoint
from segnest.runtime.distributed import resolve_device
from segnest.runtime.precision import resolve_precision

DEFAULT_TOP_K = 5
ImageInput = str | os.PathLike | Image.Image | np.ndarray


@dataclass(frozen=True)
class TopClasses:
    """One image's ``top_k`` classes, most probable first: names, class indices and
    softmax probabilities."""

    names: list[str]
    indices: list[int]
    scores: list[float]

    def to_json(self) -> list[dict[str, Any]]:
        return [{"class": name, "index": index, "score": round(score, 6)}
                for name, index, score in zip(self.names, self.indices, self.scores,
                                              strict=True)]

    def __str__(self) -> str:
        return ", ".join(f"{name} {score:.3f}" for name, score in zip(self.names, self.scores,
                                                                     strict=True))


def preprocessing(checkpoint: dict[str, Any], source: str = "checkpoint"
                  ) -> tuple[Any, int, float]:
    """(transform, crop size, crop fraction) of pretraining's validation, as the run that
    wrote the checkpoint recorded them in its ``config``."""
    config = checkpoint.get("config") or {}
    if not config.get("crop_size") or not config.get("crop_pct"):
        raise SegnestError(f"{source} does not record the crop_size and crop_pct it was "
                           "trained with; use a checkpoint written by segnest pretrain")
    crop_size, crop_pct = int(config["crop_size"]), float(config["crop_pct"])
    _, transform = build_transforms(crop_size, crop_pct, "none", (1.0, 1.0))
    return transform, crop_size, crop_pct


class ClassifierPredictor:
    """A classifier with its preprocessing: ``predictor(image)`` gives the image's
    :class:`TopClasses` (a list of them for a list of images); see the module docstring."""

    def __init__(self, model: Any, classes: list[str], transform: Any, *,
                 device: torch.device = torch.device("cpu"), top_k: int = DEFAULT_TOP_K,
                 name: str = "model", crop: tuple[int, float] = (224, 0.875)) -> None:
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise SegnestError(f"top_k must be a positive int, got {top_k!r}")
        self.model = model
        self.classes = list(classes)
        self.transform = transform
        self.device = device
        self.top_k = min(top_k, len(self.classes))
        self.name = name
        self.crop = crop

    @classmethod
    def from_checkpoint(cls, checkpoint: dict[str, Any], source: str = "checkpoint",
                        device: str | None = None, top_k: int = DEFAULT_TOP_K,
                        fuse_bn: bool = True, compile: bool = False,
                        precision: str = "fp32") -> ClassifierPredictor:
        """The predictor of a loaded ``segnest pretrain`` checkpoint dict (``source`` names
        the file in errors); ``fuse_bn``, ``compile`` and ``precision`` as eval's flags."""
        resolved_device = resolve_device(device)
        model = model_from_checkpoint(checkpoint, source=source, task="classification")
        runner = inference_model(model.to(resolved_device), fuse=fuse_bn, compile=compile,
                                 precision=resolve_precision(precision, resolved_device))
        num_classes = int(model.fc.out_features)
        classes = [str(name) for name in checkpoint.get("classes") or ()]
        if classes and len(classes) != num_classes:
            raise SegnestError(f"{source} names {len(classes)} classes but its model has "
                               f"{num_classes} outputs; the checkpoint is inconsistent, use "
                               "another one")
        classes = classes or [f"class {i}" for i in range(num_classes)]
        transform, crop_size, crop_pct = preprocessing(checkpoint, source)
        return cls(runner, classes, transform, device=resolved_device, top_k=top_k,
                   name=str(checkpoint.get("model_name", "model")),
                   crop=(crop_size, crop_pct))

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __repr__(self) -> str:
        shown = ", ".join(self.classes[:8]) + (", ..." if self.num_classes > 8 else "")
        size, pct = self.crop
        return (f"ClassifierPredictor({self.name} classifier, {self.num_classes} classes: "
                f"{shown}; top-{self.top_k} of a {size} px centre crop (short side resized to "
                f"{int(round(size / pct))} px); {self.device})")

    def read(self, image: ImageInput) -> Image.Image:
        """``image`` as an RGB Pillow image: a path (any mode, read as pretraining reads
        files), a Pillow image, or an H x W x 3 uint8 array."""
        if isinstance(image, (str, os.PathLike)):
            return open_rgb_image(image)
        if isinstance(image, Image.Image):
            return image.convert("RGB")
        if isinstance(image, np.ndarray):
            if (image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8
                    or 0 in image.shape):
                raise SegnestError(f"image array has shape {image.shape} and dtype "
                                   f"{image.dtype}; the classifier takes H x W x 3 uint8 RGB")
            return Image.fromarray(image)
        raise SegnestError(f"cannot classify a {type(image).__name__}; pass an image path, a "
                           "PIL image, an H x W x 3 uint8 array or a list of them")

    @torch.inference_mode()
    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """Softmax class probabilities (B x classes, float32) of prepared images."""
        logits = self.model(images.to(self.device))
        return torch.softmax(logits.float(), dim=1).cpu()

    def top(self, probabilities: torch.Tensor) -> list[TopClasses]:
        """The ``top_k`` classes of each row of :meth:`probabilities`."""
        scores, indices = probabilities.topk(self.top_k, dim=1)
        return [TopClasses([self.classes[i] for i in row], row, values)
                for row, values in zip(indices.tolist(), scores.tolist(), strict=True)]

    def predict(self, image: ImageInput) -> TopClasses:
        """The ``top_k`` classes of one image."""
        batch = self.transform(self.read(image)).unsqueeze(0)
        return self.top(self.probabilities(batch))[0]

    def __call__(self, images: ImageInput | list[ImageInput]) -> TopClasses | list[TopClasses]:
        if isinstance(images, list):
            return [self.predict(image) for image in images]
        return self.predict(images)
