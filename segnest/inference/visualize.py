"""Coloured masks, overlays, captioned image | ground truth | prediction | errors panels
for TensorBoard, and class legends.

Ignored pixels are drawn black (0, 0, 0) in coloured masks; overlays treat black as
"no label" and keep the image there. No class is drawn black by default: the official
Cityscapes and ADE20K palettes contain no pure black, and generated palettes never do
(:func:`segnest.data.palettes.generate_palette`); a ``classes.txt`` that asks for black is
warned about when the dataset loads.

Panels read at a glance: each view has a caption above it, views smaller than
``min_height`` are enlarged by an integer factor with nearest neighbour (masks keep exactly
their palette colours), the errors view paints wrong pixels red over a dimmed grey copy of
the image, and a legend under the panel names the classes it shows. Text uses Pillow's
built-in font, so no font file is needed.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from segnest.data.transforms import IGNORE_INDEX, MEAN, STD, to_unit_range
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


def confidence_image(confidence: np.ndarray | torch.Tensor) -> np.ndarray:
    """The 8-bit PNG of ``--save-confidence``: round(255 x confidence), where confidence is
    the largest class probability averaged over the views (0-1)."""
    return np.rint(np.clip(_to_numpy(confidence), 0, 1) * 255).astype(np.uint8)


def overlay(image_uint8: np.ndarray, color_mask: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blends a coloured mask over an image; black (unlabelled) mask pixels keep the image."""
    if image_uint8.shape != color_mask.shape:
        raise ValueError(f"image {image_uint8.shape} and mask {color_mask.shape} differ")
    blended = image_uint8.astype(np.float32) * (1.0 - alpha) + color_mask.astype(np.float32) * alpha
    blended = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
    unlabelled = ~color_mask.any(axis=-1)
    blended[unlabelled] = image_uint8[unlabelled]
    return blended


# Colours of what is not a class. Ignore is black everywhere, as in `colorize`; the errors
# view never uses black otherwise (its dimmed image stays within DIMMED_RANGE).
IGNORE_COLOR = (0, 0, 0)
ERROR_COLOR = (255, 0, 0)
# Ignore pixels in the errors view: black crossed by grey diagonal lines every
# HATCH_SPACING pixels, so that "not scored" cannot be mistaken for "correct".
HATCH_COLOR = (150, 150, 150)
HATCH_SPACING = 6
DIMMED_RANGE = (40, 150)
TEXT_COLOR = (20, 20, 20)
BACKGROUND_COLOR = (255, 255, 255)
SWATCH_OUTLINE = (160, 160, 160)
CAPTIONS = ("image", "ground truth", "prediction", "errors")
LEGEND_NAME = "legend.png"
IGNORE_LABEL = "ignore (not scored)"
# A legend column holds at most this many entries when no width is imposed.
LEGEND_ROWS = 20
MAX_NAME_CHARS = 28
MIN_FONT_SIZE = 8


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's built-in font at ``size`` px; Pillow < 10.1 has only a fixed ~11 px one."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:
        return ImageFont.load_default()


def _text_width(font: Any, text: str) -> int:
    return int(math.ceil(font.getbbox(_drawable(font, text))[2]))


def _drawable(font: Any, text: str) -> str:
    """``text`` as the font can draw it: Pillow's old bitmap font knows Latin-1 only."""
    if isinstance(font, ImageFont.FreeTypeFont):
        return text
    return text.encode("latin-1", "replace").decode("latin-1")


def _short(name: str) -> str:
    return name if len(name) <= MAX_NAME_CHARS else name[: MAX_NAME_CHARS - 3] + "..."


def _upscale(array: np.ndarray, factor: int) -> np.ndarray:
    """Nearest-neighbour enlargement by an integer factor: every value is kept as is."""
    if factor == 1:
        return array
    return np.repeat(np.repeat(array, factor, axis=0), factor, axis=1)


def _error_view(image: np.ndarray, target: np.ndarray, pred: np.ndarray,
                ignore_index: int) -> np.ndarray:
    """Wrong pixels ERROR_COLOR, correct ones a dimmed grey copy of the image, ignore
    pixels hatched black (see HATCH_COLOR)."""
    low, high = DIMMED_RANGE
    grey = image.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    grey = np.rint(low + grey * ((high - low) / 255.0)).astype(np.uint8)
    view = np.repeat(grey[..., None], 3, axis=2)
    ignored = target == ignore_index
    view[(pred != target) & ~ignored] = ERROR_COLOR
    rows, cols = np.indices(target.shape)
    hatch = (rows + cols) % HATCH_SPACING == 0
    view[ignored] = IGNORE_COLOR
    view[ignored & hatch] = HATCH_COLOR
    return view


def _caption_font(size: int, view_width: int) -> Any:
    """The font at ``size`` px or smaller, so that every caption fits in the view."""
    while True:
        font = _font(size)
        widest = max(_text_width(font, caption) for caption in CAPTIONS)
        if widest + 4 <= view_width or size <= MIN_FONT_SIZE:
            return font
        size -= 1


def make_panel(
    image: np.ndarray,
    target: np.ndarray | torch.Tensor,
    pred: np.ndarray | torch.Tensor,
    palette: np.ndarray,
    ignore_index: int = IGNORE_INDEX,
    class_names: Sequence[str] | None = None,
    min_height: int = 256,
    *,
    legend: bool = True,
    gap: int = 4,
) -> np.ndarray:
    """``image | ground truth | prediction | errors``, captioned, as one uint8 ``H x W x 3``.

    Each view is ``factor * h x factor * w`` for an ``h x w`` input, where ``factor`` is the
    smallest integer making ``factor * h >= min_height`` (1 when ``h`` already is), applied
    with nearest neighbour. The views stand on a white background, ``gap`` pixels apart,
    under a caption strip naming them; text is a sixteenth of the view's height or a 32nd
    of the panel's width, whichever is larger (at least 12 px; captions shrink to fit
    narrow views), so that it stays legible in a TensorBoard card. Ground truth and prediction use
    ``palette`` with ignore black; the errors view shows pixels where prediction != ground
    truth in red over a dimmed grey copy of the image, and ignore pixels hatched (black
    with grey diagonal lines). With ``class_names`` and ``legend``, a legend of the classes
    present in the ground truth or the prediction (and of ignore, when the ground truth has
    some) runs under the views, as wide as the panel.
    """
    image = np.asarray(image, dtype=np.uint8)
    target = _to_numpy(target).astype(np.int64, copy=False)
    pred = _to_numpy(pred).astype(np.int64, copy=False)
    gt_color = colorize(target, palette, ignore_index)
    pred_color = colorize(pred, palette, ignore_index)
    if not (image.shape == gt_color.shape == pred_color.shape):
        raise ValueError(
            f"image {image.shape}, gt {gt_color.shape[:2]} and pred "
            f"{pred_color.shape[:2]} must have the same height and width"
        )
    height, width = target.shape
    factor = max(1, math.ceil(min_height / height)) if height else 1
    views = [_upscale(view, factor) for view in
             (image, gt_color, pred_color, _error_view(image, target, pred, ignore_index))]
    view_h, view_w = height * factor, width * factor
    panel_w = len(views) * view_w + (len(views) - 1) * gap
    # TensorBoard shows an image at its card's width (~350 px): text a 32nd of the panel's
    # width stays about 10 px tall there.
    text_size = max(12, round(view_h / 16), round(panel_w / 32))
    font = _caption_font(text_size, view_w)
    font_size = int(getattr(font, "size", 11))
    caption_h = round(font_size * 1.5)
    canvas = Image.new("RGB", (panel_w, caption_h + view_h), BACKGROUND_COLOR)
    draw = ImageDraw.Draw(canvas)
    for position, (caption, view) in enumerate(zip(CAPTIONS, views, strict=True)):
        left = position * (view_w + gap)
        canvas.paste(Image.fromarray(np.ascontiguousarray(view)), (left, caption_h))
        text_w = _text_width(font, caption)
        draw.text((left + max(0, (view_w - text_w) // 2), round(font_size * 0.2)),
                  _drawable(font, caption), fill=TEXT_COLOR, font=font)
    panel = np.asarray(canvas)
    if class_names is None or not legend:
        return panel
    labelled = np.union1d(np.unique(target), np.unique(pred))
    present = [int(c) for c in labelled if c != ignore_index]
    strip = legend_image(class_names, palette, present=present,
                         ignore_entry=bool((target == ignore_index).any()),
                         width=panel_w, font_size=text_size)
    return np.concatenate([panel, strip], axis=0)


def legend_image(
    class_names: Sequence[str],
    palette: np.ndarray,
    present: Sequence[int] | np.ndarray | None = None,
    max_entries: int = 40,
    *,
    ignore_entry: bool = True,
    width: int | None = None,
    font_size: int = 14,
) -> np.ndarray:
    """A swatch and a name per class on white, as uint8 ``H x W x 3``.

    Lists the classes ``present`` (class ids, in id order) or all of them, at most
    ``max_entries`` followed by a "+N more" line, then, with ``ignore_entry``, a black
    swatch named "ignore (not scored)". Entries run down columns of at most 20 rows; given a
    ``width`` the image is that wide and holds as many columns as fit. Each swatch is a
    ``font_size`` square of the class colour with a grey outline; names longer than 28
    characters are cut.
    """
    palette = np.asarray(palette, dtype=np.uint8)
    ids = range(len(palette)) if present is None else sorted({int(c) for c in present})
    ids = list(ids)
    for class_id in ids:
        if not 0 <= class_id < len(palette):
            raise ValueError(f"class id {class_id} has no colour; the palette has "
                             f"{len(palette)} colours")
    entries: list[tuple[str, tuple[int, ...] | None]] = []
    for class_id in ids[:max_entries]:
        name = class_names[class_id] if class_id < len(class_names) else f"class {class_id}"
        entries.append((_short(str(name)), tuple(int(v) for v in palette[class_id])))
    if len(ids) > max_entries:
        entries.append((f"+{len(ids) - max_entries} more", None))
    if ignore_entry:
        entries.append((IGNORE_LABEL, IGNORE_COLOR))
    font = _font(font_size)
    size = int(getattr(font, "size", font_size))
    pad = max(2, size // 3)
    row_h = size + pad
    name_w = max((_text_width(font, name) for name, _ in entries), default=0)
    column_w = size + pad + name_w + 3 * pad
    if width is None:
        columns = max(1, math.ceil(len(entries) / LEGEND_ROWS))
        width = columns * column_w + pad
    else:
        columns = max(1, (width - pad) // column_w)
    rows = max(1, math.ceil(len(entries) / columns))
    canvas = Image.new("RGB", (width, rows * row_h + pad), BACKGROUND_COLOR)
    draw = ImageDraw.Draw(canvas)
    for index, (name, color) in enumerate(entries):
        left = pad + (index // rows) * column_w
        top = pad + (index % rows) * row_h
        if color is not None:
            draw.rectangle((left, top, left + size - 1, top + size - 1), fill=color,
                           outline=SWATCH_OUTLINE)
        draw.text((left + size + pad, top), _drawable(font, name), fill=TEXT_COLOR,
                  font=font)
    return np.asarray(canvas)


def save_legend(folder: str | os.PathLike[str], class_names: Sequence[str],
                palette: np.ndarray) -> Path:
    """Writes ``folder/legend.png``, atomically: every class's colour and name, for the
    coloured masks beside it (predictions, which hold no ignore). Returns its path."""
    path = Path(folder) / LEGEND_NAME
    save_png(path, legend_image(class_names, palette, max_entries=len(palette),
                                ignore_entry=False))
    return path


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


def display_rgb(image: np.ndarray) -> np.ndarray:
    """An input image of any dtype and channel count as HxWx3 uint8 for panels and overlays:
    its first three channels (a single channel repeated) on an 8-bit scale."""
    if image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3:
        return image
    channels = image[..., :3] if image.shape[2] >= 3 else np.repeat(image[..., :1], 3, axis=2)
    return np.clip(np.rint(to_unit_range(channels) * 255.0), 0, 255).astype(np.uint8)


def text_card(lines: Sequence[str], size: int = 28, width: int = 640) -> np.ndarray:
    """``lines`` drawn black on white, ``size`` px tall, as a uint8 ``H x W x 3`` card: big
    enough to stay legible when TensorBoard shrinks an image to its card width."""
    font = _font(size)
    lines = [_drawable(font, line) for line in lines]
    width = max([width] + [_text_width(font, line) + size for line in lines])
    card = Image.new("RGB", (width, round(size * (1.4 * len(lines) + 0.6))), "white")
    draw = ImageDraw.Draw(card)
    for index, line in enumerate(lines):
        draw.text((size // 2, round(size * (0.3 + 1.4 * index))), line, fill="black", font=font)
    return np.asarray(card)


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
