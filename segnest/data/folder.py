"""A user's own dataset: images and train-id masks in plain folders.

Layout::

    root/classes.txt                      one class per line: "name" or "name R G B"
    root/images/<split>/<stem>.{jpg,jpeg,png,bmp,tif,tiff}
    root/masks/<split>/<stem>.png         train ids 0..N-1 per pixel, 255 = ignore
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from segnest.data.base import (
    IMAGE_SUFFIXES,
    SampleTransform,
    SegmentationDataset,
    missing_layout_error,
)
from segnest.data.palettes import generate_palette
from segnest.errors import SegnestError

LAYOUT = "root/classes.txt, root/images/<split>/<stem>.jpg and root/masks/<split>/<stem>.png"


def read_classes_file(path: Path) -> tuple[list[str], np.ndarray]:
    """Parse ``classes.txt``: one class name per line, optionally followed by its colour as
    three 0-255 integers. Blank lines and lines starting with ``#`` are skipped. Colours
    must be given for every class or for none (then a palette is generated)."""
    if not path.is_file():
        raise SegnestError(
            f"class list not found: {path}; create it with one class name per line, "
            "optionally followed by R G B (see datasets/README.md)"
        )
    names: list[str] = []
    colors: list[tuple[int, int, int] | None] = []
    for line_number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        tokens = text.split()
        color = None
        if len(tokens) >= 4 and all(token.isdigit() for token in tokens[-3:]):
            values = tuple(int(token) for token in tokens[-3:])
            if max(values) > 255:
                raise SegnestError(
                    f"{path} line {line_number}: colour {values} is out of range; "
                    "R G B must be 0..255"
                )
            color = values
            tokens = tokens[:-3]
        names.append(" ".join(tokens))
        colors.append(color)
    if not names:
        raise SegnestError(f"{path} lists no classes; write one class name per line")
    if len(names) > 255:
        raise SegnestError(
            f"{path} lists {len(names)} classes; at most 255 are supported (255 = ignore)"
        )
    given = [color is not None for color in colors]
    if all(given):
        return names, np.array(colors, dtype=np.uint8)
    if any(given):
        raise SegnestError(
            f"{path} gives R G B colours for some classes but not all; give a colour on "
            "every line or on none"
        )
    return names, generate_palette(len(names))


class FolderDataset(SegmentationDataset):
    """Images with same-stem PNG masks holding train ids directly."""

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "train",
        transform: SampleTransform | None = None,
    ) -> None:
        base = Path(root)
        if not base.is_dir():
            raise missing_layout_error(base, LAYOUT)
        classes, palette = read_classes_file(base / "classes.txt")
        image_dir = base / "images" / split
        mask_dir = base / "masks" / split
        for folder in (image_dir, mask_dir):
            if not folder.is_dir():
                raise missing_layout_error(folder, LAYOUT)
        samples = []
        seen: dict[str, Path] = {}
        for image_path in sorted(image_dir.iterdir()):
            if image_path.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            if image_path.stem in seen:
                raise SegnestError(
                    f"images {seen[image_path.stem]} and {image_path} share the stem "
                    f"'{image_path.stem}' and so one mask; rename one of them"
                )
            seen[image_path.stem] = image_path
            mask_path = mask_dir / f"{image_path.stem}.png"
            if not mask_path.is_file():
                raise SegnestError(
                    f"image {image_path} has no mask (expected {mask_path}); add the mask "
                    "or remove the image"
                )
            samples.append((image_path, mask_path))
        super().__init__(base, split, samples, classes, palette, transform)
