"""Coloured masks, overlays and image | ground truth | prediction panels for TensorBoard.

Ignored pixels are drawn black (0, 0, 0) in coloured masks; overlays treat black as
"no label" and keep the image there. The official Cityscapes and ADE20K palettes contain
no pure black, so no class is hidden by this.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from segnest.data.transforms import IGNORE_INDEX, MEAN, STD
from segnest.runtime.files import atomic_open


def _to_numpy(array: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(array, torch.Tensor):
        return array.detach().cpu().numpy()
    return np.asarray(array)


def colorize(
    mask: np.ndarray | torch.Tensor, palette: np.ndarray, ignore_index: int = IGNORE_INDEX
) -> np.ndarray:
    """Maps an ``H x W`` class-id mask to ``H x W x 3`` uint8 colours; ignore → black."""
    mask = _to_numpy(mask)
    palette = np.asarray(palette, dtype=np.uint8)
    if mask.ndim != 2:
        raise ValueError(f"mask must be H x W, got shape {mask.shape}")
    mask = mask.astype(np.int64, copy=False)
    labelled = mask != ignore_index
    ids = mask[labelled]
    if ids.size and (ids.min() < 0 or ids.max() >= len(palette)):
        raise ValueError(
            f"mask has class ids in [{ids.min()}, {ids.max()}] but the palette has "
            f"{len(palette)} colours"
        )
    out = np.zeros((*mask.shape, 3), dtype=np.uint8)
    out[labelled] = palette[ids]
    return out


def overlay(image_uint8: np.ndarray, color_mask: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blends a coloured mask over an image; black (unlabelled) mask pixels keep the image."""
    if image_uint8.shape != color_mask.shape:
        raise ValueError(f"image {image_uint8.shape} and mask {color_mask.shape} differ")
    blended = image_uint8.astype(np.float32) * (1.0 - alpha) + color_mask.astype(np.float32) * alpha
    blended = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
    unlabelled = ~color_mask.any(axis=-1)
    blended[unlabelled] = image_uint8[unlabelled]
    return blended


def make_panel(
    image_uint8: np.ndarray,
    gt: np.ndarray | torch.Tensor,
    pred: np.ndarray | torch.Tensor,
    palette: np.ndarray,
    ignore_index: int = IGNORE_INDEX,
    gap: int = 4,
) -> np.ndarray:
    """Side by side ``image | ground truth | prediction`` separated by white gaps.

    Returns uint8 ``H x (3W + 2 gap) x 3``.
    """
    gt_color = colorize(gt, palette, ignore_index)
    pred_color = colorize(pred, palette, ignore_index)
    if not (image_uint8.shape == gt_color.shape == pred_color.shape):
        raise ValueError(
            f"image {image_uint8.shape}, gt {gt_color.shape[:2]} and pred "
            f"{pred_color.shape[:2]} must have the same height and width"
        )
    height = image_uint8.shape[0]
    white = np.full((height, gap, 3), 255, dtype=np.uint8)
    return np.concatenate([image_uint8, white, gt_color, white, pred_color], axis=1)


def denormalize(
    tensor: torch.Tensor,
    mean: Sequence[float] = MEAN,
    std: Sequence[float] = STD,
) -> np.ndarray:
    """Undoes ``(x - mean) / std`` on a ``C x H x W`` image; returns uint8 ``H x W x C``."""
    image = tensor.detach().float().cpu()
    mean_t = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
    image = (image * std_t + mean_t).mul_(255.0).round_().clamp_(0, 255)
    return image.to(torch.uint8).permute(1, 2, 0).numpy()


def log_panels(writer: Any, tag: str, panels: Sequence[np.ndarray], step: int) -> None:
    """Writes each panel as image ``{tag}/{i}`` to a TensorBoard ``SummaryWriter``."""
    for index, panel in enumerate(panels):
        writer.add_image(f"{tag}/{index}", panel, step, dataformats="HWC")


def save_png(path: str | os.PathLike[str], array: np.ndarray) -> None:
    """Saves a uint8 ``H x W`` (grayscale) or ``H x W x 3`` (RGB) array, or a uint16
    ``H x W`` label map, as PNG, atomically."""
    array = np.asarray(array)
    grey = array.ndim == 2 and array.dtype in (np.uint8, np.uint16)
    rgb = array.ndim == 3 and array.shape[2] == 3 and array.dtype == np.uint8
    if not (grey or rgb):
        raise ValueError(
            f"save_png needs uint8 H x W x 3 or uint8/uint16 H x W, got {array.dtype} "
            f"{array.shape}"
        )
    with atomic_open(path) as handle:
        Image.fromarray(np.ascontiguousarray(array)).save(handle, format="PNG")


def save_jpeg(path: str | os.PathLike[str], array: np.ndarray, quality: int = 90) -> None:
    """Saves a uint8 ``H x W x 3`` array as JPEG, atomically."""
    with atomic_open(path) as handle:
        Image.fromarray(np.ascontiguousarray(array)).save(handle, format="JPEG", quality=quality)
