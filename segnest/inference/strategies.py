"""Inference strategies: whole image, sliding window, multi-scale with horizontal flip.

Every function takes a model and a normalized float batch ``(B, 3, H, W)`` and returns
softmax probabilities ``(B, C, H, W)`` at the input resolution. A model is any callable
returning logits ``(B, C, h, w)`` or a dict with the logits under ``'out'``; logits at
another resolution are resized bilinearly. The functions run under the caller's grad mode:
wrap calls in ``torch.inference_mode()``.

Views (scales, flips, windows) are combined by averaging softmax probabilities, as the
reference evaluation does.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from segnest.config import INFERENCE_MODES
from segnest.errors import SegnestError
from segnest.inference.settings import InferenceSettings
from segnest.models.fuse import fuse_bn
from segnest.models.pixelwise import channel_softmax
from segnest.runtime.compiling import compile_model
from segnest.runtime.precision import Autocast

Model = Callable[[torch.Tensor], Any]


def inference_model(model: nn.Module, *, fuse: bool = True, compile: bool = False,
                    precision: torch.dtype | None = None) -> Model:
    """``model`` as eval and predict run it, in eval mode; the same outputs up to float
    rounding (tests hold both paths to 1e-4).

    ``fuse`` folds every batch norm into the convolution before it (a copy; ``model`` is
    left as it is). ``compile`` compiles the result with frozen weights
    (:mod:`segnest.runtime.compiling`), valid only for a model that is not trained
    afterwards, which is why training's validation never goes through here. Each new
    input size compiles once more (tens of seconds on a CPU), so it pays off
    on long runs over images of few sizes. ``precision`` (an autocast dtype from
    :func:`segnest.runtime.precision.resolve_precision`; None: float32) runs the model in
    channels_last under autocast, the layout oneDNN's bf16 convolutions want; the logits
    stay float32.
    """
    prepared = fuse_bn(model) if fuse else model.eval()
    if compile or precision is not None:
        # Both change the layout of the weights: never that of the caller's model.
        prepared = copy.deepcopy(prepared) if prepared is model else prepared
    if precision is not None:
        prepared = Autocast(prepared.to(memory_format=torch.channels_last), precision)
    if not compile:
        return prepared
    return compile_model(prepared, frozen=True)


def _pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or any(int(v) < 1 for v in pair):
        raise SegnestError(f"{name} must be a positive int or (height, width), got {value!r}")
    return int(pair[0]), int(pair[1])


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def predict_logits(model: Model, x: torch.Tensor) -> torch.Tensor:
    """Runs the model and returns its main logits at the spatial size of ``x``."""
    out = model(x)
    if isinstance(out, dict):
        out = out["out"]
    if not isinstance(out, torch.Tensor) or out.dim() != 4:
        raise TypeError("model must return logits (B, C, h, w) or a dict with key 'out'")
    out = out.float()  # a model run in bf16/fp16: softmax and metrics stay float32
    if out.shape[-2:] != x.shape[-2:]:
        out = _resize(out, tuple(x.shape[-2:]))
    return out


def _probabilities(model: Model, x: torch.Tensor, num_classes: int) -> torch.Tensor:
    logits = predict_logits(model, x)
    if logits.shape[1] != num_classes:
        raise SegnestError(
            f"model predicts {logits.shape[1]} classes but the dataset has {num_classes}; "
            "use a checkpoint trained for this dataset or set num_classes to match"
        )
    return channel_softmax(logits)


def whole_inference(model: Model, image: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Softmax probabilities from one forward pass over the whole image."""
    return _probabilities(model, image, num_classes)


def _window_starts(length: int, crop: int, stride: int) -> list[int]:
    """Window starts covering ``[0, length)``; the last window ends exactly at ``length``."""
    if length <= crop:
        return [0]
    starts = list(range(0, length - crop, stride))
    starts.append(length - crop)
    return starts


def slide_inference(
    model: Model,
    image: torch.Tensor,
    num_classes: int,
    crop_size: int | Sequence[int],
    stride: int | Sequence[int],
) -> torch.Tensor:
    """Softmax probabilities averaged over overlapping ``crop_size`` windows.

    An image smaller than the crop in a dimension is padded with zeros (the mean colour
    in normalized space) at the bottom/right up to the crop; the padded part is cut away
    before averaging, so it never reaches the result.
    """
    crop_h, crop_w = _pair(crop_size, "crop_size")
    stride_h, stride_w = _pair(stride, "stride")
    if stride_h > crop_h or stride_w > crop_w:
        raise SegnestError(
            f"sliding-window stride {(stride_h, stride_w)} is larger than the crop "
            f"{(crop_h, crop_w)} and would skip pixels; use a stride of at most the crop size"
        )
    batch, _, height, width = image.shape
    padded_h, padded_w = max(height, crop_h), max(width, crop_w)
    if (padded_h, padded_w) != (height, width):
        image = F.pad(image, (0, padded_w - width, 0, padded_h - height))

    prob_sum = image.new_zeros(batch, num_classes, padded_h, padded_w)
    counts = image.new_zeros(1, 1, padded_h, padded_w)
    for top in _window_starts(padded_h, crop_h, stride_h):
        for left in _window_starts(padded_w, crop_w, stride_w):
            window = image[:, :, top : top + crop_h, left : left + crop_w]
            prob_sum[:, :, top : top + crop_h, left : left + crop_w] += _probabilities(
                model, window, num_classes
            )
            counts[:, :, top : top + crop_h, left : left + crop_w] += 1
    prob_sum /= counts
    return prob_sum[:, :, :height, :width]


def _scaled_size(height: int, width: int, scale: float, base_size: int | None) -> tuple[int, int]:
    """Size at one scale: long side = base_size × scale, or the input size × scale."""
    if base_size is None:
        return max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5))
    long_side = base_size * scale
    ratio = long_side / max(height, width)
    return max(1, int(height * ratio + 0.5)), max(1, int(width * ratio + 0.5))


def multi_scale_inference(
    model: Model,
    image: torch.Tensor,
    num_classes: int,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    mode: str = "whole",
    base_size: int | None = None,
    crop_size: int | Sequence[int] | None = None,
    stride: int | Sequence[int] | None = None,
) -> torch.Tensor:
    """Softmax probabilities at the input size, averaged over scales (× horizontal flip).

    One scale is held in memory at a time. With ``flip`` the mirrored image rides in the
    same forward call as the plain one (concatenated along the batch). ``stride`` defaults
    to 2/3 of the crop in slide mode, as in the reference evaluation.
    """
    if mode not in INFERENCE_MODES:
        raise SegnestError(f"unknown inference mode {mode!r}; use one of {INFERENCE_MODES}")
    if not scales:
        raise SegnestError("no inference scales given; pass at least one scale, e.g. 1.0")
    if mode == "slide":
        if crop_size is None:
            raise SegnestError("sliding-window inference needs a crop size; set crop_size")
        if stride is None:
            crop_h, crop_w = _pair(crop_size, "crop_size")
            stride = (max(1, crop_h * 2 // 3), max(1, crop_w * 2 // 3))

    def run(x: torch.Tensor) -> torch.Tensor:
        if mode == "whole":
            return whole_inference(model, x, num_classes)
        return slide_inference(model, x, num_classes, crop_size, stride)

    batch, _, height, width = image.shape
    total: torch.Tensor | None = None
    for scale in scales:
        if scale <= 0:
            raise SegnestError(f"inference scales must be positive, got {scale}")
        size = _scaled_size(height, width, scale, base_size)
        scaled = image if size == (height, width) else _resize(image, size)
        if flip:
            probs = run(torch.cat([scaled, scaled.flip(-1)], dim=0))
            # Summing before resizing back is exact (resizing is linear) and halves the work.
            probs = probs[:batch].add_(probs[batch:].flip(-1))
        else:
            probs = run(scaled)
        if size != (height, width):
            probs = _resize(probs, (height, width))
        if total is None:
            total = probs
        else:
            total += probs
    views = len(scales) * (2 if flip else 1)
    if views > 1:
        total /= views
    return total


def infer(model: Model, image: torch.Tensor, num_classes: int,
          settings: InferenceSettings) -> torch.Tensor:
    """Softmax probabilities ``(B, C, H, W)`` for ``image`` under ``settings``."""
    return multi_scale_inference(
        model,
        image,
        num_classes,
        scales=settings.scales,
        flip=settings.flip,
        mode=settings.mode,
        base_size=settings.base_size,
        crop_size=settings.window_size,
        stride=settings.stride,
    )
