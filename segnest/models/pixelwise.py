"""Per-pixel softmax and cross-entropy that follow the logits' memory layout.

On a CPU, segnest's DeepLabV3 hands back its full-size logits in channels_last (NHWC)
memory (see :mod:`segnest.models.deeplabv3`). PyTorch's softmax and cross-entropy over
dim 1 of such a tensor first copy it back to NCHW and then reduce over classes that lie
``H * W`` floats apart. Seen as rows of classes (``permute(0, 2, 3, 1)``), the same numbers
are contiguous, and the row kernels run over them directly, which is faster
(experiments/benchmarks/README.md). Values are those of ``F.cross_entropy`` /
``softmax(dim=1)`` up to float rounding; NCHW logits take the plain PyTorch path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from segnest.runtime.memory import available_bytes
from segnest.runtime.tuning import Choice, cache_key, cached_timings, time_paths


def class_rows(logits: torch.Tensor) -> torch.Tensor | None:
    """``logits (B, C, H, W)`` viewed as ``(B, H, W, C)`` when that view is contiguous
    (channels_last memory), else None."""
    if logits.dim() != 4:
        return None
    rows = logits.permute(0, 2, 3, 1)
    return rows if rows.is_contiguous() else None


def pixel_cross_entropy(logits: torch.Tensor, target: torch.Tensor,
                        ignore_index: int = -100,
                        weight: torch.Tensor | None = None) -> torch.Tensor:
    """``F.cross_entropy(logits, target, weight=weight, ignore_index=ignore_index)`` (mean
    over the pixels whose target is not ``ignore_index``, weighted by their class's weight),
    computed over class rows when the logits are channels_last."""
    rows = class_rows(logits)
    if rows is None:
        return F.cross_entropy(logits, target, weight=weight, ignore_index=ignore_index)
    expected = (logits.shape[0], *logits.shape[2:])
    if tuple(target.shape) != expected:
        raise ValueError(f"target of shape {tuple(target.shape)} does not match logits "
                         f"{tuple(logits.shape)}; expected {expected}")
    return F.cross_entropy(rows.reshape(-1, logits.shape[1]), target.reshape(-1),
                           weight=weight, ignore_index=ignore_index)


def channel_softmax(logits: torch.Tensor) -> torch.Tensor:
    """``logits.softmax(dim=1)`` in the logits' own memory layout."""
    rows = class_rows(logits)
    if rows is None:
        return logits.softmax(dim=1)
    return rows.softmax(dim=-1).permute(0, 3, 1, 2)


# Rows of the full-size logits that one chunk of :class:`_UpsampledCrossEntropy` holds:
# about this many bytes, so that a chunk stays in cache while it is reduced.
CHUNK_BYTES = 8 * 2**20


def fuses_upsampling(device: torch.device) -> bool:
    """Whether segmentation training on ``device`` hands low-resolution logits to
    :func:`upsampled_cross_entropy` instead of upsampling them first, where nothing was
    measured for the run (:func:`loss_upsampling` decides for a training run): on for
    CPUs, where it saved the full-size tensors' memory; GPUs keep the plain path."""
    return device.type == "cpu"


# The decision and the two ways of taking the loss at full size (its ``chosen``).
LOSS_UPSAMPLING = "segmentation loss upsampling"
BANDS, FULL_SIZE = "in bands", "full size"
# The full-size path keeps the upsampled logits, their log-softmax and their gradient
# (float32); it is not considered where those take more than this share of the memory
# available.
FULL_SIZE_MEMORY_SHARE = 0.25
# Below this many bytes of full-size logits both paths take about a millisecond: timing
# them would choose by noise (and two runs of one command could differ in float
# rounding), so the banded default stands.
MEASURED_FROM_BYTES = 16 * 2**20


def loss_upsampling(device: torch.device, batch: int, classes: int, size: tuple[int, int],
                    output_stride: int = 8, align_corners: bool = True) -> Choice:
    """How segmentation training on ``device`` takes its loss at full size, for a batch of
    ``batch`` crops of ``size`` with ``classes`` classes and logits at 1/``output_stride``:
    :data:`BANDS` (:func:`upsampled_cross_entropy` on the low-resolution logits) or
    :data:`FULL_SIZE` (the model upsamples its channels_last logits, then
    :func:`pixel_cross_entropy`). On a CPU measured (forward and backward of both on random
    logits of that shape, cached per CPU and software, :mod:`segnest.runtime.tuning`), unless
    the full-size tensors would not fit in memory or are too small for the paths to differ
    (:data:`MEASURED_FROM_BYTES`; banded then); GPUs upsample first (unmeasured)."""
    what = LOSS_UPSAMPLING
    if not fuses_upsampling(device):
        return Choice(what, FULL_SIZE, "rule: unmeasured on GPUs")
    height, width = size
    full_bytes = 3 * 4 * batch * classes * height * width
    available = available_bytes()
    if available is not None and full_bytes > FULL_SIZE_MEMORY_SHARE * available:
        return Choice(what, BANDS, f"memory: the full-size logits, log-softmax and gradient "
                      f"would take {full_bytes / 2**30:.1f} GB of the "
                      f"{available / 2**30:.1f} GB available")
    if full_bytes < 3 * MEASURED_FROM_BYTES:
        return Choice(what, BANDS, f"rule: {full_bytes / 3 / 2**20:.1f} MB of full-size "
                      "logits, too little for the paths to differ beyond timing noise")
    key = cache_key(what=what, batch=batch, classes=classes, size=[height, width],
                     output_stride=output_stride)
    timings, source = cached_timings(
        key, ["seconds"], lambda _: _time_loss_paths(batch, classes, size, output_stride,
                                                     align_corners))
    bands_s, full_s = timings["seconds"]
    chosen = BANDS if bands_s <= full_s else FULL_SIZE
    return Choice(what, chosen, f"forward + backward in bands {1e3 * bands_s:.1f} ms vs "
                  f"full size {1e3 * full_s:.1f} ms for {batch} x {classes} x {height} x "
                  f"{width}, {source}")


def _time_loss_paths(batch: int, classes: int, size: tuple[int, int], output_stride: int,
                     align_corners: bool) -> tuple[float, ...]:
    generator = torch.Generator().manual_seed(0)
    low_size = tuple(-(-side // output_stride) for side in size)
    logits = torch.randn(batch, classes, *low_size, generator=generator).contiguous(
        memory_format=torch.channels_last).requires_grad_(True)
    target = torch.randint(0, classes, (batch, *size), generator=generator)

    def bands() -> None:
        upsampled_cross_entropy(logits, target, align_corners=align_corners).backward()

    def full_size() -> None:
        upsampled = F.interpolate(logits, size=size, mode="bilinear",
                                  align_corners=align_corners)
        pixel_cross_entropy(upsampled, target).backward()
    return time_paths((bands, full_size))


def upsampled_cross_entropy(logits: torch.Tensor, target: torch.Tensor,
                            ignore_index: int = -100, align_corners: bool = True,
                            weight: torch.Tensor | None = None) -> torch.Tensor:
    """``F.cross_entropy(F.interpolate(logits, target.shape[-2:], mode="bilinear",
    align_corners=align_corners), target, weight=weight, ignore_index=ignore_index)``
    without the full-size logits.

    Segmentation heads predict at 1/8 of the input and the loss is taken at full size:
    for a 512x512, 150-class batch of 2 the upsampled logits, their log-softmax and their
    gradient are 315 MB each, allocated, filled and freed every step. This computes the
    same loss a band of rows at a time (the logits of a band are upsampled, reduced and
    dropped) and the gradient by redoing the band in the backward pass; only the
    row-upsampled logits (1/8 of the full size) and one log-sum-exp per pixel are kept.
    Class weights (``weight``, one per class) cost nothing more: a pixel's weight is looked
    up band by band. Same value and gradient up to float rounding (tests: 1e-5).
    """
    if logits.dim() != 4 or target.dim() != 3 or target.shape[0] != logits.shape[0]:
        raise ValueError(f"expected logits (B, C, h, w) and target (B, H, W), got "
                         f"{tuple(logits.shape)} and {tuple(target.shape)}")
    if tuple(target.shape[-2:]) == tuple(logits.shape[-2:]):
        return pixel_cross_entropy(logits, target, ignore_index, weight)
    if weight is not None:
        weight = weight.to(device=logits.device, dtype=torch.float32)
    return _UpsampledCrossEntropy.apply(logits.float(), target, ignore_index, align_corners,
                                        weight)


def _band_logits(row_logits: torch.Tensor, y0: int, y1: int, width: int,
                 align_corners: bool) -> torch.Tensor:
    """Full-size logits of rows ``y0:y1`` as ``(B, rows, W, C)``, from logits upsampled
    along the rows only (``row_logits``: ``(B, C, H, w)``, channels_last)."""
    band = row_logits[:, :, y0:y1].contiguous(memory_format=torch.channels_last)
    # Same number of rows in and out: the interpolation is the identity along them.
    return F.interpolate(band, size=(y1 - y0, width), mode="bilinear",
                         align_corners=align_corners).permute(0, 2, 3, 1)


class _UpsampledCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor,  # type: ignore[override]
                ignore_index: int, align_corners: bool,
                weight: torch.Tensor | None) -> torch.Tensor:
        batch, classes, _, low_width = logits.shape
        height, width = target.shape[-2:]
        valid = target != ignore_index
        safe = torch.where(valid, target, 0)
        if bool(((safe < 0) | (safe >= classes)).any()):
            raise ValueError(f"target holds class ids outside [0, {classes}) that are not "
                             f"the ignore index {ignore_index}")
        # Bilinear upsampling is separable: rows first, for all of it (1/8 of the size),
        # then the columns band by band.
        row_logits = F.interpolate(logits.contiguous(memory_format=torch.channels_last),
                                   size=(height, low_width), mode="bilinear",
                                   align_corners=align_corners)
        rows = max(1, CHUNK_BYTES // (batch * width * classes * logits.element_size()))
        lse = logits.new_empty(batch, height, width)
        total = torch.zeros((), dtype=torch.float64, device=logits.device)
        for y0 in range(0, height, rows):
            y1 = min(height, y0 + rows)
            z = _band_logits(row_logits, y0, y1, width, align_corners)
            band_lse = torch.logsumexp(z, dim=-1)
            lse[:, y0:y1] = band_lse
            picked = z.gather(-1, safe[:, y0:y1, :, None]).squeeze(-1)
            total += ((band_lse - picked) * _pixel_weights(valid, safe, weight, y0, y1)
                      ).sum(dtype=torch.float64)
        # F.cross_entropy's weighted mean: divided by the labelled pixels' summed weight.
        count = valid.sum() if weight is None else (weight[safe] * valid).sum(
            dtype=torch.float64)
        ctx.save_for_backward(row_logits, lse, safe, valid, count, weight)
        ctx.settings = (tuple(logits.shape), rows, align_corners)
        return (total / count).to(logits.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        row_logits, lse, safe, valid, count, class_weight = ctx.saved_tensors
        shape, rows, align_corners = ctx.settings
        batch, classes, _, low_width = shape
        height, width = lse.shape[-2:]
        scale = (grad / count).to(row_logits.dtype)
        grad_rows = torch.empty_like(row_logits)
        for y0 in range(0, height, rows):
            y1 = min(height, y0 + rows)
            # d loss / d z = w_y (softmax(z) - onehot(target)) / count on labelled pixels.
            weight = _pixel_weights(valid, safe, class_weight, y0, y1)[..., None] * scale
            z = _band_logits(row_logits, y0, y1, width, align_corners)
            g = z.sub_(lse[:, y0:y1, :, None]).exp_().mul_(weight)
            g.scatter_add_(-1, safe[:, y0:y1, :, None], -weight)
            grad_rows[:, :, y0:y1] = torch.ops.aten.upsample_bilinear2d_backward(
                g.permute(0, 3, 1, 2), [y1 - y0, width], [batch, classes, y1 - y0, low_width],
                align_corners, None, None)
        grad_logits = torch.ops.aten.upsample_bilinear2d_backward(
            grad_rows, [height, low_width], list(shape), align_corners, None, None)
        return grad_logits, None, None, None, None


def _pixel_weights(valid: torch.Tensor, safe: torch.Tensor, weight: torch.Tensor | None,
                   y0: int, y1: int) -> torch.Tensor:
    """The loss weight of each pixel of rows ``y0:y1``: 0 where ignored, else its class's
    weight (1 without class weights)."""
    if weight is None:
        return valid[:, y0:y1]
    return weight[safe[:, y0:y1]] * valid[:, y0:y1]
