"""Inference strategies: whole image, sliding window, multi-scale with horizontal flip.

Views (scales, flips, windows) are combined by averaging softmax probabilities, as the
reference evaluation does. A model is any callable returning logits ``(B, C, h, w)`` or a
dict with the logits under ``'out'``; logits at another resolution are resized bilinearly.
The functions run under the caller's grad mode: wrap calls in ``torch.inference_mode()``.

Two paths give the same numbers:

- :func:`segment` (eval, predict, the Python predictor's labels and confidence): every
  view is computed at its working resolution (long side = ``base_size`` x scale), and the
  labels and the confidence (the largest averaged probability) at the image's own size are
  made a band of rows at a time (:mod:`segnest.inference.resample`): each scale's
  probabilities are upsampled to just those rows, summed and divided by the number of
  views. For segnest's DeepLabV3 in whole mode (:func:`defers_upsampling`) each view is
  kept as the model's feature-resolution logits (1/64 of the working pixels) and its
  working-resolution probabilities are made, too, only for the rows a band needs, so the
  memory held does not grow with the number of scales and flips: it is bounded by one
  forward pass at the largest scale plus one band, not by ``C x H x W`` (a 4000 x 4000
  photo and 150 classes: 9.6 GB per full-size copy); other models and slide mode hold
  each scale's working-resolution probabilities.
  experiments/benchmarks/inference_memory.py measures it. Sliding-window sums live on the
  CPU.
- :func:`multi_scale_inference` / :func:`infer` return the probabilities themselves at the
  input size, for a caller that asks for them (``Predictor(output="probs")``).

Batches (``batch_size``, ``--batch-size``) never pad: every Split-Attention block and the
ASPP image-pooling branch average over the whole feature map, so padding an image changes
every pixel's prediction, not just the border (with the demo's ResNeSt-14, 8% of the labels
changed; see the comment above ``LOOKAHEAD_BATCHES``). In whole mode, images whose working
sizes are equal share forward passes (bucketed within a look-ahead of
``LOOKAHEAD_BATCHES`` batches); in slide mode, the windows (all window-sized) of the
images of a look-ahead go through the model ``batch_size`` at a time. Results equal
batch 1 up to float rounding (tests: labels equal, probabilities within 1e-5).
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from segnest.errors import SegnestError
from segnest.inference.config import INFERENCE_MODES
from segnest.inference.resample import bilinear_taps, resize_image, upsample_band
from segnest.inference.settings import InferenceSettings
from segnest.models.fuse import fuse_bn
from segnest.models.pixelwise import channel_softmax
from segnest.runtime.compiling import compile_model
from segnest.runtime.memory import available_bytes
from segnest.runtime.precision import Autocast
from segnest.runtime.tuning import cast_weights_once, decide_for

Model = Callable[[torch.Tensor], Any]


def inference_model(model: nn.Module, *, fuse: bool = True, compile: bool = False,
                    precision: torch.dtype | None = None) -> Model:
    """``model`` as eval and predict run it, in eval mode; the same outputs up to float
    rounding (tests hold both paths to 1e-4).

    ``fuse`` folds every batch norm into the convolution before it (a copy; ``model`` is
    left as it is). ``compile`` compiles the result with frozen weights, one graph per
    input size (:mod:`segnest.runtime.compiling`), valid only for a model that is not
    trained afterwards, which is why training's validation never goes through here. Each
    new input size compiles once more (tens of seconds on a CPU), so it pays off on long
    runs over images of few sizes. ``precision`` (an autocast dtype from
    :func:`segnest.runtime.precision.resolve_precision`; None: float32) runs the model in
    channels_last under autocast, the layout oneDNN's bf16 convolutions want, with the
    choices :func:`segnest.runtime.tuning.hardware_decisions` makes for this device (which
    ASPP dilations stay float32) and the weights cast to ``precision`` once; the logits
    stay float32.
    """
    prepared = fuse_bn(model) if fuse else model.eval()
    if compile or precision is not None:
        # Both change the layout of the weights: never that of the caller's model.
        prepared = copy.deepcopy(prepared) if prepared is model else prepared
    if precision is not None:
        device = next(prepared.parameters()).device
        decide_for(prepared, device, precision)
        prepared = prepared.to(memory_format=torch.channels_last)
        prepared = Autocast(cast_weights_once(prepared, precision), precision)
    if compile:
        prepared = compile_model(prepared, frozen=True)
    if defers_upsampling(model) and prepared is not model:
        # The wrappers pass ``upsample=False`` through: segment() keeps the logits at
        # feature resolution between scales.
        prepared.ALIGN_CORNERS = model.ALIGN_CORNERS
    return prepared


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


def _check_classes(logits: torch.Tensor, num_classes: int) -> None:
    if logits.shape[1] != num_classes:
        raise SegnestError(
            f"model predicts {logits.shape[1]} classes but the dataset has {num_classes}; "
            "use a checkpoint trained for this dataset or set num_classes to match"
        )


def _probabilities(model: Model, x: torch.Tensor, num_classes: int) -> torch.Tensor:
    logits = predict_logits(model, x)
    _check_classes(logits, num_classes)
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


def _window_geometry(crop_size: int | Sequence[int], stride: int | Sequence[int]
                     ) -> tuple[tuple[int, int], tuple[int, int]]:
    crop, steps = _pair(crop_size, "crop_size"), _pair(stride, "stride")
    if steps[0] > crop[0] or steps[1] > crop[1]:
        raise SegnestError(
            f"sliding-window stride {steps} is larger than the crop {crop} and would skip "
            "pixels; use a stride of at most the crop size")
    return crop, steps


def _slide_many(model: Model, images: Sequence[torch.Tensor], num_classes: int,
                crop: tuple[int, int], stride: tuple[int, int], windows_per_pass: int,
                device: torch.device) -> list[torch.Tensor]:
    """:func:`slide_inference` of several ``(B_i, 3, h_i, w_i)`` batches at once: their
    windows go through the model ``windows_per_pass`` at a time, in the order (image,
    window top, window left, batch entry); the sums and counts are kept on the CPU."""
    padded, sums, counts, windows = [], [], [], []
    for i, image in enumerate(images):
        batch, _, height, width = image.shape
        padded_h, padded_w = max(height, crop[0]), max(width, crop[1])
        if (padded_h, padded_w) != (height, width):
            image = F.pad(image, (0, padded_w - width, 0, padded_h - height))
        padded.append(image)
        sums.append(torch.zeros(batch, num_classes, padded_h, padded_w))
        counts.append(torch.zeros(1, 1, padded_h, padded_w))
        windows += [(i, b, top, left)
                    for top in _window_starts(padded_h, crop[0], stride[0])
                    for left in _window_starts(padded_w, crop[1], stride[1])
                    for b in range(batch)]
    for first in range(0, len(windows), windows_per_pass):
        chunk = windows[first: first + windows_per_pass]
        x = torch.stack([padded[i][b, :, top: top + crop[0], left: left + crop[1]]
                         for i, b, top, left in chunk])
        probs = _probabilities(model, x.to(device), num_classes).cpu()
        for (i, b, top, left), window_probs in zip(chunk, probs, strict=True):
            sums[i][b, :, top: top + crop[0], left: left + crop[1]] += window_probs
            if b == 0:
                counts[i][:, :, top: top + crop[0], left: left + crop[1]] += 1
    results = []
    for image, prob_sum, count in zip(images, sums, counts, strict=True):
        prob_sum /= count
        results.append(prob_sum[:, :, : image.shape[-2], : image.shape[-1]])
    return results


def slide_inference(
    model: Model,
    image: torch.Tensor,
    num_classes: int,
    crop_size: int | Sequence[int],
    stride: int | Sequence[int],
    batch_size: int = 1,
) -> torch.Tensor:
    """Softmax probabilities averaged over overlapping ``crop_size`` windows, on the CPU.

    An image smaller than the crop in a dimension is padded with zeros (the mean colour
    in normalized space) at the bottom/right up to the crop; the padded part is cut away
    before averaging, so it never reaches the result. Each forward pass takes the windows
    at ``batch_size`` positions (of every image of the batch); the window-sized inputs
    need no padding, so the result does not depend on ``batch_size``.
    """
    crop, steps = _window_geometry(crop_size, stride)
    return _slide_many(model, [image], num_classes, crop, steps,
                       batch_size * image.shape[0], image.device)[0]


def _scaled_size(height: int, width: int, scale: float, base_size: int | None) -> tuple[int, int]:
    """Size at one scale: long side = base_size × scale, or the input size × scale."""
    if base_size is None:
        return max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5))
    long_side = base_size * scale
    ratio = long_side / max(height, width)
    return max(1, int(height * ratio + 0.5)), max(1, int(width * ratio + 0.5))


def _slide_geometry(crop_size: int | Sequence[int] | None,
                    stride: int | Sequence[int] | None
                    ) -> tuple[tuple[int, int], tuple[int, int]]:
    """Crop and stride of slide mode; the stride defaults to 2/3 of the crop, as in the
    reference evaluation."""
    if crop_size is None:
        raise SegnestError("sliding-window inference needs a crop size; set crop_size")
    if stride is None:
        crop_h, crop_w = _pair(crop_size, "crop_size")
        stride = (max(1, crop_h * 2 // 3), max(1, crop_w * 2 // 3))
    return _window_geometry(crop_size, stride)


def check_working_size(size: tuple[int, int], channels: int, num_classes: int) -> None:
    """Refuse a working resolution whose input and class maps alone (float32, one view)
    exceed the memory available, before they are allocated: ``--scales 1000`` or
    ``--base-size 100000`` would otherwise die in the allocator with a traceback. A lower
    bound (the model's own activations come on top), so it never refuses a size that
    would fit."""
    needed = size[0] * size[1] * 4 * (channels + num_classes)
    available = available_bytes()
    if available is not None and needed > available:
        raise SegnestError(
            f"the working resolution {size[0]} x {size[1]} (long side = --base-size x scale) "
            f"needs at least {_amount(needed)} for its input and {num_classes} class maps "
            f"but {_amount(available)} are available; lower --base-size or --scales")


def _amount(size: int) -> str:
    return f"{size / 2**30:.1f} GiB" if size >= 2**30 else f"{size / 2**20:.1f} MiB"


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
        crop_size, stride = _slide_geometry(crop_size, stride)

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
        check_working_size(size, image.shape[1], num_classes)
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


# ------------------------------------------------------------------- labels, band by band

# Images whose views are bucketed together (whole mode) or whose windows are pooled
# (slide mode): a look-ahead of this many batches. Their working-resolution probabilities
# are held until the look-ahead is done, which bounds memory; with batch size 1 each image
# is done on its own, as there is nothing to share a forward pass with.
LOOKAHEAD_BATCHES = 4
# Bytes of one band of full-resolution probabilities (C x rows x W float32).
BAND_BYTES = 16 * 2**20
# Why batches are not padded: a padded batch is not the batch-1 result. Measured with the
# DeepLabV3-ResNeSt-14 that `segnest demo` trains (8 classes) on generated scenes, pairs of
# images of different sizes (96x128 + 128x80, 160x120 + 112x160, 128x128 + 96x160) each
# zero-padded to the pair's common size in one batch: 89.4%, 89.6% and 97.3% of the labels
# (92.2% overall, inside each image's own area) equal the batch-1 labels
# (experiments/benchmarks/padding_agreement.py; a ResNeSt-14 with random weights predicts
# nearly one class everywhere and hides this: 100%).

ImageLike = np.ndarray | torch.Tensor


def image_size(image: ImageLike) -> tuple[int, int]:
    """(H, W) of an image file's array (H x W x C) or a normalized tensor (C x H x W)."""
    return tuple(image.shape[:2]) if isinstance(image, np.ndarray) else tuple(image.shape[-2:])


def _channels(image: ImageLike) -> int:
    return int(image.shape[2] if isinstance(image, np.ndarray) else image.shape[0])


def _working_image(image: ImageLike, size: tuple[int, int],
                   settings: InferenceSettings) -> torch.Tensor:
    """The normalized ``(C, h, w)`` model input of ``image`` at ``size`` (on the CPU)."""
    if isinstance(image, np.ndarray):
        return resize_image(image, size, settings.mean, settings.std)
    if tuple(image.shape[-2:]) == size:
        return image
    return _resize(image[None], size)[0]


class HeldProbabilities:
    """One image's probabilities at one scale's working size, held as they are."""

    def __init__(self, probs: torch.Tensor) -> None:
        # Classes last (see upsample_band); a no-op for the channels_last probabilities
        # segnest's models give on a CPU.
        self.probs = probs.permute(1, 2, 0).contiguous()
        self.size = tuple(self.probs.shape[:2])

    def rows(self, y0: int, y1: int) -> torch.Tensor:
        """Rows ``y0:y1`` as ``(rows, w, C)`` (a view)."""
        return self.probs[y0:y1]


class DeferredProbabilities:
    """One image's probabilities at one scale's working size, kept as the model's
    feature-resolution logits (input / output stride per side: 1/64 of the pixels) and
    made a band of rows at a time: the logits upsampled as the model upsamples them
    (bilinear, its ``ALIGN_CORNERS``), softmax, and the mirror view's probabilities
    added. What is held between scales is then a few MB per view, whatever the number of
    scales."""

    def __init__(self, logits: Sequence[torch.Tensor], size: tuple[int, int],
                 align_corners: bool) -> None:
        self.logits = [view.permute(1, 2, 0).contiguous() for view in logits]
        self.size = size
        low = self.logits[0].shape[:2]
        self.taps = (bilinear_taps(low[0], size[0], align_corners),
                     bilinear_taps(low[1], size[1], align_corners))

    def rows(self, y0: int, y1: int) -> torch.Tensor:
        """Rows ``y0:y1`` as a new ``(rows, w, C)`` tensor."""
        total: torch.Tensor | None = None
        for logits in self.logits:
            probs = upsample_band(logits, *self.taps, y0, y1).softmax(dim=-1)
            total = probs if total is None else total.add_(probs)
        return total


WorkingProbabilities = HeldProbabilities | DeferredProbabilities


def defers_upsampling(model: Model) -> bool:
    """Whether ``model(x, upsample=False)`` returns its logits at feature resolution and
    ``model.ALIGN_CORNERS`` says how it upsamples them (segnest's DeepLabV3 and the
    wrappers :func:`inference_model` puts around it)."""
    return isinstance(getattr(model, "ALIGN_CORNERS", None), bool)


def _whole_views(model: Model, x: torch.Tensor, num_classes: int, flip: bool
                 ) -> list[WorkingProbabilities]:
    """Each image of the batch ``x``: its probabilities, plus those of its mirror image."""
    batch = x.shape[0]
    if defers_upsampling(model):
        # The mirror images go through the model on their own: the activations of the
        # largest scale, not the probabilities, bound the memory here, and a CPU runs a
        # batch of two no faster than two batches of one.
        def low_resolution(images: torch.Tensor) -> torch.Tensor:
            out = model(images, upsample=False)
            logits = (out["out"] if isinstance(out, dict) else out).float().cpu()
            _check_classes(logits, num_classes)
            return logits

        views = [low_resolution(x)] + ([low_resolution(x.flip(-1)).flip(-1)] if flip else [])
        size = tuple(x.shape[-2:])
        return [DeferredProbabilities([view[i] for view in views], size, model.ALIGN_CORNERS)
                for i in range(batch)]
    inputs = torch.cat([x, x.flip(-1)], dim=0) if flip else x
    probs = whole_inference(model, inputs, num_classes).cpu()
    if flip:
        # Summing before resizing back is exact (resizing is linear) and halves the work.
        probs = probs[:batch] + probs[batch:].flip(-1)
    return [HeldProbabilities(p) for p in probs]


def _scale_probabilities(model: Model, inputs: list[torch.Tensor], num_classes: int,
                         settings: InferenceSettings, batch_size: int,
                         device: torch.device) -> list[WorkingProbabilities]:
    """Each input's probabilities at its working size (CPU), flipped view added."""
    results: list[WorkingProbabilities | None] = [None] * len(inputs)
    if settings.mode == "whole":
        buckets: dict[tuple[int, ...], list[int]] = {}
        for i, x in enumerate(inputs):
            buckets.setdefault(tuple(x.shape), []).append(i)
        for members in buckets.values():
            for first in range(0, len(members), batch_size):
                chosen = members[first: first + batch_size]
                x = torch.stack([inputs[i] for i in chosen]).to(device)
                for i, p in zip(chosen, _whole_views(model, x, num_classes, settings.flip),
                                strict=True):
                    results[i] = p
        return results
    crop, stride = _slide_geometry(settings.window_size, settings.stride)
    views = [torch.stack([x, x.flip(-1)]) if settings.flip else x[None] for x in inputs]
    per_view = 2 if settings.flip else 1
    for i, probs in enumerate(_slide_many(model, views, num_classes, crop, stride,
                                          batch_size * per_view, device)):
        results[i] = HeldProbabilities(probs[0] + probs[1].flip(-1) if settings.flip
                                       else probs[0])
    return results


def combine_bands(per_scale: Sequence[WorkingProbabilities], size: tuple[int, int],
                  views: int, confidence: bool = False
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Labels (H x W; uint8 up to 256 classes, else int64) and, with ``confidence``, the
    largest probability (H x W float32) of the mean over ``views`` of the scales'
    working-size probabilities upsampled to ``size``, made a band of rows at a time: each
    scale gives just the working rows the band's rows mix."""
    height, width = size
    classes = per_scale[0].rows(0, 1).shape[-1]
    labels = torch.empty(size, dtype=torch.uint8 if classes <= 256 else torch.int64)
    best = torch.empty(size) if confidence else None
    taps = [(bilinear_taps(p.size[0], height), bilinear_taps(p.size[1], width))
            for p in per_scale]
    rows = max(1, BAND_BYTES // (classes * width * 4))
    for y0 in range(0, height, rows):
        y1 = min(height, y0 + rows)
        total: torch.Tensor | None = None
        for probs, (row_taps, col_taps) in zip(per_scale, taps, strict=True):
            if probs.size == size:
                band = probs.rows(y0, y1)
                if total is None and isinstance(probs, HeldProbabilities):
                    band = band.clone()  # a view: the sum must not write into it
            else:
                i0, i1, lam = (t[y0:y1] for t in row_taps)
                first, last = int(i0.min()), int(i1.max()) + 1
                working = probs.rows(first, last)
                band = upsample_band(working, (i0 - first, i1 - first, lam), col_taps,
                                     0, y1 - y0)
            total = band if total is None else total.add_(band)
        if views > 1:
            total /= views
        if best is None:
            labels[y0:y1] = total.argmax(dim=-1)
        else:
            best[y0:y1], labels[y0:y1] = total.max(dim=-1)
    return labels, best


def segment(model: Model, images: Iterable[tuple[Any, ImageLike]], num_classes: int,
            settings: InferenceSettings, *, batch_size: int = 1, confidence: bool = False,
            device: torch.device | str = "cpu",
            ) -> Iterator[tuple[Any, torch.Tensor, torch.Tensor | None]]:
    """``(key, labels, confidence or None)`` for each ``(key, image)``, in order, at the
    image's size (see the module docstring; :func:`combine_bands` for the outputs).

    An image is an image file's array (H x W x C, uint8, uint16 or float32 on a 0-1 scale),
    normalized here with ``settings.mean``/``std`` and resized without a full-resolution
    float copy, or an already normalized ``(C, H, W)`` tensor. The model runs on
    ``device``; everything else stays on the CPU. ``batch_size`` images (whole mode; with
    their mirror images when flipping) or windows (slide mode) go through the model at a
    time; the results do not depend on it.
    """
    if batch_size < 1:
        raise SegnestError(f"batch size must be at least 1, got {batch_size}")
    device = torch.device(device)
    lookahead = 1 if batch_size == 1 else LOOKAHEAD_BATCHES * batch_size
    pending = iter(images)
    while chunk := list(itertools.islice(pending, lookahead)):
        sizes = [image_size(image) for _, image in chunk]
        per_image: list[list[torch.Tensor]] = [[] for _ in chunk]
        for scale in settings.scales:
            working = [_scaled_size(*size, scale, settings.base_size) for size in sizes]
            for (_, image), size in zip(chunk, working, strict=True):
                check_working_size(size, _channels(image), num_classes)
            inputs = [_working_image(image, size, settings)
                      for (_, image), size in zip(chunk, working, strict=True)]
            probs = _scale_probabilities(model, inputs, num_classes, settings, batch_size,
                                         device)
            del inputs
            for scales, p in zip(per_image, probs, strict=True):
                scales.append(p)
        for position, ((key, _), size) in enumerate(zip(chunk, sizes, strict=True)):
            labels, best = combine_bands(per_image[position], size, settings.views, confidence)
            per_image[position] = []  # free this image's probabilities before the next
            yield key, labels, best
