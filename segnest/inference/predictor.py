"""The Python predictor: ``segnest.load_model(checkpoint)`` and ``segnest predict`` share it.

A :class:`Predictor` is rebuilt from a segnest training checkpoint alone: the architecture
and its widths, the classes and palette, the normalisation (mean, std, input channels)
and the inference settings the checkpoint records (:mod:`segnest.inference.settings`).
Called on an image it runs exactly what ``segnest predict`` runs -- the command is a loop
over files around this class -- so a label map from Python and a ``_mask.png`` from the
command are the same array.

Images are read as :func:`segnest.data.base.read_image` reads files: a path goes through
it, a Pillow image of any mode is converted the same way (grey and palette images to RGB,
transparency dropped, 16-bit grey kept at 16 bits), and an array must already be what it
returns: ``H x W x in_channels`` uint8, uint16 or float32 on a 0-1 scale. A float array
outside 0-1 (a 0-255 image converted with ``np.float32``) or holding NaN or infinities is
refused with one line rather than predicted as a much brighter image.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from segnest.data.base import check_unit_range, image_array, read_image
from segnest.data.palettes import generate_palette
from segnest.data.transforms import to_normalized_tensors
from segnest.errors import SegnestError
from segnest.inference.backends import is_exported_model, load_exported_model
from segnest.inference.config import InferenceFlags
from segnest.inference.settings import InferenceSettings
from segnest.inference.strategies import Model, infer, inference_model, segment
from segnest.inference.visualize import colorize, display_rgb, overlay
from segnest.models import model_from_checkpoint
from segnest.models.factory import checkpoint_task
from segnest.runtime.checkpoint import load_checkpoint
from segnest.runtime.distributed import resolve_device
from segnest.runtime.precision import resolve_precision
from segnest.runtime.record import CheckpointRecord
from segnest.schema import validate

ImageInput = str | os.PathLike | Image.Image | np.ndarray
# What a call returns per image: train ids (H x W uint8), class probabilities
# (C x H x W float32) or the probability of the predicted class (H x W float32).
OUTPUTS = ("labels", "probs", "confidence")
ARRAY_DTYPES = (np.dtype(np.uint8), np.dtype(np.uint16), np.dtype(np.float32))
# load_model's keyword arguments: the inference flags of segnest predict, by field name.
SETTING_NAMES = tuple(f.name for f in dataclasses.fields(InferenceFlags) if f.name != "device")
# load_model's keyword arguments for a classification checkpoint.
CLASSIFIER_SETTINGS = ("top_k", "fuse_bn", "compile", "precision")


class Predictor:
    """A segmentation model with its pre- and post-processing; see the module docstring.

    ``predictor(images, output="labels")`` takes one image (path, Pillow image or array)
    or a list of them and returns one result per image at that image's size. Labels and
    confidence are made band by band at the image's size, with memory bounded by the
    working resolution; ``output="probs"`` needs the full ``C x H x W`` array
    (:mod:`segnest.inference.strategies`). A list goes through the model ``batch_size``
    images at a time where their working sizes are equal (never padded; the results do
    not depend on it).
    """

    def __init__(self, model: Model, settings: InferenceSettings, *, classes: Sequence[str],
                 palette: np.ndarray, in_channels: int = 3,
                 device: torch.device = torch.device("cpu"), batch_size: int = 1,
                 name: str = "model") -> None:
        self.model = model
        self.name = name
        self.settings = settings
        self.batch_size = batch_size
        self.classes = tuple(classes)
        self.palette = np.asarray(palette, dtype=np.uint8)
        self.in_channels = in_channels
        self.device = device
        if len(self.palette) != len(self.classes):
            raise SegnestError(f"{len(self.classes)} classes but {len(self.palette)} palette "
                               "colours; give one colour per class")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __repr__(self) -> str:
        shown = ", ".join(self.classes[:8]) + (", ..." if self.num_classes > 8 else "")
        return (f"Predictor({self.name}, {self.num_classes} classes: {shown}; "
                f"segments at {self.settings.working_size()}; {self.settings.mode} mode, "
                f"batch {self.batch_size}, in_channels {self.in_channels}, {self.device})")

    @classmethod
    def load(cls, path: str | os.PathLike, flags: InferenceFlags) -> Predictor:
        """The predictor of a checkpoint written by ``segnest train``, or of an exported
        ONNX or OpenVINO logits model (:mod:`segnest.inference.backends`), with ``flags``
        (validated)."""
        if is_exported_model(path):
            model, record = load_exported_model(path, precision=flags.precision,
                                                device=flags.device, compile=flags.compile)
            return cls.from_checkpoint(record, flags, source=str(path), model=model)
        return cls.from_checkpoint(load_checkpoint(path), flags, source=str(path))

    @classmethod
    def from_checkpoint(cls, checkpoint: dict[str, Any], flags: InferenceFlags,
                        source: str = "checkpoint", model: Model | None = None) -> Predictor:
        """The predictor a loaded checkpoint dict describes, with ``flags`` (validated)
        overriding its inference settings; ``source`` names the file in errors. ``model``:
        a runnable exported model the dict describes, run on the CPU as it is (its flags
        were checked by :func:`~segnest.inference.backends.load_exported_model`)."""
        settings = InferenceSettings.from_flags(flags, checkpoint)
        if model is None:
            device = resolve_device(flags.device)
            model = inference_model(model_from_checkpoint(checkpoint, source=source).to(device),
                                    fuse=flags.fuse_bn, compile=flags.compile,
                                    precision=resolve_precision(flags.precision, device))
        else:
            device = torch.device("cpu")
        record = CheckpointRecord.read(checkpoint)
        num_classes = record.num_classes
        if not num_classes:
            raise SegnestError(f"checkpoint {source} does not record its number of "
                               "classes; use a checkpoint written by 'segnest train'")
        if num_classes > 256:
            raise SegnestError(f"checkpoint {source} has {num_classes} classes; "
                               "uint8 masks hold at most 256")
        classes = list(record.classes or ())[:num_classes]
        classes += [f"class {i}" for i in range(len(classes), num_classes)]
        palette = record.palette
        if palette is not None and len(palette) >= num_classes:
            palette = np.asarray(palette, dtype=np.uint8)[:num_classes]
        else:
            palette = generate_palette(num_classes)
        in_channels = record.in_channels
        return cls(model, settings, classes=classes, palette=palette,
                   in_channels=in_channels, device=device, batch_size=flags.batch_size,
                   name=str(record.model_name or "model"))

    def read(self, image: ImageInput) -> np.ndarray:
        """``image`` as the model's input array (H x W x ``in_channels``), checked."""
        if isinstance(image, (str, os.PathLike)):
            return read_image(Path(image), self.in_channels)
        if isinstance(image, Image.Image):
            array = image_array(image)
            if array.shape[2] != self.in_channels:
                raise SegnestError(
                    f"the model takes {self.in_channels} input channels but a Pillow image "
                    f"gives 3; pass an H x W x {self.in_channels} numpy array instead")
            return array
        if isinstance(image, np.ndarray):
            return self._checked_array(image)
        raise SegnestError(
            f"cannot predict a {type(image).__name__}; pass an image path, a PIL image, an "
            f"H x W x {self.in_channels} numpy array or a list of them")

    def _checked_array(self, array: np.ndarray) -> np.ndarray:
        if (array.ndim != 3 or array.shape[2] != self.in_channels or 0 in array.shape
                or array.dtype not in ARRAY_DTYPES):
            raise SegnestError(
                f"image array has shape {array.shape} and dtype {array.dtype}; the model takes "
                f"H x W x {self.in_channels} uint8 (or uint16, or float32 on a 0-1 scale)")
        check_unit_range(array, "image array")
        return array

    def __call__(self, images: ImageInput | list[ImageInput],
                 output: str = "labels") -> np.ndarray | list[np.ndarray]:
        """Labels (H x W uint8 train ids), ``output="probs"`` (C x H x W float32, summing
        to 1 over classes) or ``output="confidence"`` (H x W float32, the largest
        probability) for one image, or a list of them for a list of images."""
        if output not in OUTPUTS:
            raise SegnestError(f"output {output!r} is not one of {', '.join(OUTPUTS)}")
        single = not isinstance(images, list)
        arrays = ((i, self.read(image)) for i, image in enumerate([images] if single else images))
        if output == "probs":
            results = [self._probabilities(array) for _, array in arrays]
        else:
            confidence = output == "confidence"
            results = [best if confidence else labels
                       for _, labels, best in self.segment(arrays, confidence=confidence)]
        return results[0] if single else results

    def segment(self, images: Iterable[tuple[Any, np.ndarray]], confidence: bool = False
                ) -> Iterator[tuple[Any, np.ndarray, np.ndarray | None]]:
        """``(key, labels, confidence or None)`` for each ``(key, array)`` in order, the
        arrays as :meth:`read` returns them, ``batch_size`` at a time: what ``segnest
        predict`` writes (labels H x W uint8, confidence H x W float32)."""
        with torch.inference_mode():
            for key, labels, best in segment(self.model, images, self.num_classes,
                                             self.settings, batch_size=self.batch_size,
                                             confidence=confidence, device=self.device):
                yield key, labels.numpy(), None if best is None else best.numpy()

    def _probabilities(self, image: np.ndarray) -> np.ndarray:
        tensor, _ = to_normalized_tensors(image, np.zeros(image.shape[:2], np.uint8),
                                          self.settings.mean, self.settings.std)
        with torch.inference_mode():
            probs = infer(self.model, tensor.to(self.device).unsqueeze(0), self.num_classes,
                          self.settings)[0]
            return probs.cpu().numpy()

    def colorize(self, labels: np.ndarray) -> np.ndarray:
        """An H x W label map in the checkpoint's palette (H x W x 3 uint8)."""
        return colorize(labels, self.palette, ignore_index=-1)

    def overlay(self, image: ImageInput, labels: np.ndarray, alpha: float = 0.5) -> np.ndarray:
        """The coloured labels blended over ``image``, as ``segnest predict --overlay``
        draws them: an H x W x 3 uint8 RGB array (``alpha`` of the colour mask, the rest
        of the image; grey, 16-bit and multi-channel inputs are shown as RGB). Save it with
        ``PIL.Image.fromarray(array).save("overlay.png")``. ``labels`` must be this image's
        label map (``predictor(image)``), at the image's size."""
        display = display_rgb(self.read(image))
        if display.shape[:2] != np.shape(labels):
            raise SegnestError(f"image of size {display.shape[:2]} and labels of shape "
                               f"{np.shape(labels)} differ; overlay labels predicted for "
                               "this image")
        return overlay(display, self.colorize(labels), alpha)


def load_model(checkpoint: str | os.PathLike, device: str | torch.device | None = None,
               **settings: Any) -> Any:
    """A :class:`Predictor` for a segmentation checkpoint written by ``segnest train`` or a
    logits model written by ``segnest export``/``segnest quantize`` (ONNX, or OpenVINO
    ``.xml``, whose ``precision`` is then OpenVINO's inference precision hint); a
    :class:`~segnest.inference.detection.DetectionPredictor` for a detection checkpoint
    (its one setting: ``score_threshold``); a
    :class:`~segnest.inference.classification.ClassifierPredictor` for a classification
    checkpoint written by ``segnest pretrain`` (settings ``top_k``, ``fuse_bn``,
    ``compile``, ``precision``).

    ``device`` is as ``--device`` (default: CUDA when visible, else the CPU). Keyword
    arguments override the inference settings the checkpoint records and are named as
    ``segnest predict``'s flags, with Python values: ``scales`` (a sequence of numbers, e.g.
    ``[0.5, 1.0]``), ``multi_scale``,
    ``flip``, ``mode``, ``base_size``, ``window_size``, ``stride``, ``batch_size``, ``fuse_bn``,
    ``compile``, ``precision``.
    """
    loaded = None if is_exported_model(checkpoint) else load_checkpoint(checkpoint)
    if loaded is not None and checkpoint_task(loaded) == "classification":
        from segnest.inference.classification import ClassifierPredictor

        unknown = sorted(set(settings) - set(CLASSIFIER_SETTINGS))
        if unknown:
            raise SegnestError(f"load_model() of a classification checkpoint has no setting "
                               f"{unknown[0]!r}; it takes {', '.join(CLASSIFIER_SETTINGS)}")
        return ClassifierPredictor.from_checkpoint(
            loaded, str(checkpoint), None if device is None else str(device), **settings)
    if loaded is not None and checkpoint_task(loaded) == "detection":
        from segnest.inference.detection import DetectionPredictor

        unknown = sorted(set(settings) - {"score_threshold"})
        if unknown:
            raise SegnestError(f"load_model() of a detection checkpoint has no setting "
                               f"{unknown[0]!r}; it takes score_threshold")
        return DetectionPredictor.from_checkpoint(loaded, None if device is None else str(device),
                                                  source=str(checkpoint), **settings)
    unknown = sorted(set(settings) - set(SETTING_NAMES))
    if unknown:
        raise SegnestError(f"load_model() has no setting {unknown[0]!r}; the settings are "
                           f"{', '.join(SETTING_NAMES)}")
    if isinstance(settings.get("scales"), int | float):
        settings["scales"] = (settings["scales"],)
    flags = validate(InferenceFlags(**settings, device=None if device is None else str(device)))
    if loaded is None:
        return Predictor.load(checkpoint, flags)
    return Predictor.from_checkpoint(loaded, flags, source=str(checkpoint))
