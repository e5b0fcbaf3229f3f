"""The confusion matrix as a person reads it: a row-normalised heatmap with class names, or,
for more classes than a picture can name, the most confused pairs as a table.

Rows are ground-truth classes and columns predicted classes (``mat[gt, pred]``, as in
:mod:`segnest.inference.metrics`); each row is divided by its ground-truth pixels, so a
cell says which share of a class's pixels went to each prediction and the diagonal is the
class's accuracy. A class absent from the ground truth has an empty (grey) row.

Drawn with PIL's built-in font, so that no plotting library is needed.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

MAX_DRAWN_CLASSES = 40
"""Above this many classes the names no longer fit: :func:`most_confused` instead."""

_EMPTY_ROW = (200, 200, 200)
_LOW, _HIGH = np.array([255, 255, 255], float), np.array([8, 48, 107], float)
_PAD = 4


def row_normalised(matrix: np.ndarray | Sequence[Sequence[int]]) -> np.ndarray:
    """Each row divided by its sum (float64); rows without ground truth are NaN."""
    counts = np.asarray(matrix, dtype=np.float64)
    totals = counts.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(totals > 0, counts / totals, np.nan)


def _cell_size(num_classes: int) -> int:
    return int(np.clip(480 // max(num_classes, 1), 10, 32))


def confusion_image(matrix: np.ndarray | Sequence[Sequence[int]],
                    class_names: Sequence[str]) -> np.ndarray:
    """The row-normalised matrix as a uint8 ``H x W x 3`` heatmap (white 0 -> dark blue 1)
    with ground-truth names down the left, predicted names up the top and, where a cell is
    large enough, its share in percent."""
    shares = row_normalised(matrix)
    n = len(class_names)
    if shares.shape != (n, n):
        raise ValueError(f"a {shares.shape} matrix for {n} class names")
    font = ImageFont.load_default()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_w = max(measure.textbbox((0, 0), name, font=font)[2] for name in class_names)
    text_h = measure.textbbox((0, 0), "Ag", font=font)[3]
    cell = max(_cell_size(n), text_h + 2)
    caption = "rows: ground truth, columns: prediction, share of each row's pixels"
    caption_w = measure.textbbox((0, 0), caption, font=font)[2]
    left = text_w + 2 * _PAD
    top = text_h + 2 * _PAD + text_w + 2 * _PAD  # caption line, then the rotated names
    width = max(left + n * cell + _PAD, caption_w + 2 * _PAD)
    height = top + n * cell + _PAD
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    draw.text((_PAD, _PAD), caption, fill=(0, 0, 0), font=font)

    for row in range(n):
        y = top + row * cell
        draw.text((left - _PAD - measure.textbbox((0, 0), class_names[row], font=font)[2],
                   y + (cell - text_h) // 2), class_names[row], fill=(0, 0, 0), font=font)
        for col in range(n):
            x = left + col * cell
            share = shares[row, col]
            colour = _EMPTY_ROW if np.isnan(share) else tuple(
                int(round(c)) for c in _LOW + (_HIGH - _LOW) * share)
            draw.rectangle((x, y, x + cell - 1, y + cell - 1), fill=colour)
            if cell >= 24 and not np.isnan(share) and share >= 0.005:
                label = f"{100 * share:.0f}"
                label_w = measure.textbbox((0, 0), label, font=font)[2]
                ink = (255, 255, 255) if share > 0.5 else (0, 0, 0)
                draw.text((x + (cell - label_w) // 2, y + (cell - text_h) // 2), label,
                          fill=ink, font=font)

    names = Image.new("RGB", (text_w + 2 * _PAD, n * cell), (255, 255, 255))
    names_draw = ImageDraw.Draw(names)
    for col, name in enumerate(class_names):  # drawn across, then turned to read upwards
        names_draw.text((_PAD, col * cell + (cell - text_h) // 2), name, fill=(0, 0, 0),
                        font=font)
    canvas.paste(names.transpose(Image.Transpose.ROTATE_90), (left, text_h + 2 * _PAD))
    return np.asarray(canvas, dtype=np.uint8)


def most_confused(matrix: np.ndarray | Sequence[Sequence[int]], class_names: Sequence[str],
                  top: int = 20) -> str:
    """The ``top`` off-diagonal (ground truth, prediction) pairs with the largest share of
    the ground-truth class's pixels, as a Markdown table."""
    counts = np.asarray(matrix, dtype=np.int64)
    shares = np.nan_to_num(row_normalised(counts), nan=0.0)
    np.fill_diagonal(shares, 0.0)
    order = np.argsort(-shares, axis=None, kind="stable")[:top]
    lines = ["| ground truth | predicted as | share of its pixels | pixels |",
             "|---|---|---:|---:|"]
    for flat in order:
        gt, pred = divmod(int(flat), counts.shape[1])
        if shares[gt, pred] <= 0:
            break
        lines.append(f"| {class_names[gt]} | {class_names[pred]} | "
                     f"{100 * shares[gt, pred]:.1f}% | {counts[gt, pred]} |")
    if len(lines) == 2:
        lines.append("| (no pixel confused) | | | |")
    return "\n".join(lines)
