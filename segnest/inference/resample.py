"""Exact bilinear resampling a band of rows at a time, so that no full-resolution
``C x H x W`` tensor is ever needed to get labels at an image's own size.

``F.interpolate(x, size, mode="bilinear", align_corners=False)`` (no antialias) is
separable: output row ``y`` mixes the two source rows ``i0[y]`` and ``i1[y]`` with weight
``lam[y]`` on the second, and the same along the columns (:func:`bilinear_taps` computes
these taps in float32 with PyTorch's formula). Gathering the rows of one band and then its
columns gives that band of the interpolated tensor: equal to ``F.interpolate`` up to float
rounding (tests: 1e-6, up- and down-scaling, odd sizes). Used twice by inference:

- :func:`resize_image` takes an image file's array (``H x W x C``, uint8, uint16 or
  float32) to the working size and normalizes it without the full-resolution float copy
  (an 8000 x 8000 RGB photo is 768 MB as float32); normalization is per channel and affine
  and the interpolation weights sum to one, so normalizing the gathered rows equals
  normalizing first;
- :func:`upsample_band` brings a model's feature-resolution logits to rows of the working
  size (``align_corners=True``, as segnest's DeepLabV3 upsamples), and working-resolution
  probabilities (classes last) to rows ``y0:y1`` of the image's size.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from segnest.data.transforms import to_unit_range

Taps = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def bilinear_taps(in_size: int, out_size: int, align_corners: bool = False) -> Taps:
    """``(i0, i1, lam)`` of length ``out_size``: output index ``o`` is
    ``(1 - lam[o]) * x[i0[o]] + lam[o] * x[i1[o]]``, with PyTorch's source coordinates for
    ``align_corners``."""
    positions = torch.arange(out_size, dtype=torch.float32)
    if align_corners:
        scale = (in_size - 1) / (out_size - 1) if out_size > 1 else 0.0
        source = positions * torch.tensor(scale, dtype=torch.float32)
    else:
        scale = torch.tensor(in_size, dtype=torch.float32) / out_size
        source = ((positions + 0.5) * scale - 0.5).clamp_(min=0)
    i0 = source.long()  # source >= 0, so truncation is floor
    i0.clamp_(max=in_size - 1)
    i1 = (i0 + 1).clamp_(max=in_size - 1)
    return i0, i1, source - i0


def _lerp(a: torch.Tensor, b: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    # PyTorch's kernel computes h0lambda * a + h1lambda * b with h0lambda = 1 - h1lambda.
    return a.mul_(1 - lam).add_(b.mul_(lam))


def upsample_band(rows_of_classes: torch.Tensor, rows: Taps, cols: Taps, y0: int, y1: int
                  ) -> torch.Tensor:
    """Rows ``y0:y1`` of ``rows_of_classes (h, w, C)`` bilinearly resized to the size
    ``rows`` and ``cols`` were computed for, as a new ``(y1 - y0, W, C)`` tensor.

    Classes last: each gather copies whole contiguous class vectors, and the reductions
    over classes that follow run over contiguous memory (several times faster than over a
    ``(C, h, w)`` tensor, where a class vector is ``h * w`` floats apart).
    """
    i0, i1, lam = (t[y0:y1, None, None] for t in rows)
    band = _lerp(rows_of_classes.index_select(0, i0.flatten()),
                 rows_of_classes.index_select(0, i1.flatten()), lam)
    j0, j1, mu = cols
    return _lerp(band.index_select(1, j0), band.index_select(1, j1), mu[:, None])


def resize_image(image: np.ndarray, size: tuple[int, int], mean: Sequence[float],
                 std: Sequence[float]) -> torch.Tensor:
    """``image (H, W, C)`` as ``to_normalized_tensors`` normalizes it, bilinearly resized
    to ``size`` (h, w): a float32 ``(C, h, w)`` tensor, built from the two source rows of
    each output row (the full-resolution float image is never made)."""
    height, width = image.shape[:2]
    mean_ = np.asarray(mean, np.float32)
    std_ = np.asarray(std, np.float32)

    def rows(index: torch.Tensor | None = None) -> torch.Tensor:
        normalized = (to_unit_range(image if index is None else image[index.numpy()])
                      - mean_) / std_
        return torch.from_numpy(normalized).permute(2, 0, 1)  # (C, h, W)

    if tuple(size) == (height, width):
        return rows().contiguous()
    i0, i1, lam = bilinear_taps(height, size[0])
    scaled = _lerp(rows(i0), rows(i1), lam[:, None])
    j0, j1, mu = bilinear_taps(width, size[1])
    return _lerp(scaled.index_select(2, j0), scaled.index_select(2, j1), mu).contiguous()
