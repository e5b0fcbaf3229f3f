"""A user's own dataset: images and train-id masks in plain folders.

Layout::

    root/classes.txt                      one class per line: "name" or "name R G B"
    root/images/<split>/<stem>.{jpg,jpeg,png,bmp,tif,tiff}   8- or 16-bit; or .npy (HxWxN)
    root/masks/<split>/<stem>.png         train ids 0..N-1 per pixel, 255 = ignore

A ``label_map`` (``--label-map 255:1``) rewrites raw mask values to train ids for masks
stored in another convention; values not in it pass through. When ``classes.txt`` gives
colours, RGB(A) masks are read as colours: each pixel gets the class of its colour, and a
colour that no class has becomes ignore (the label census counts those pixels).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from segnest.data.base import (
    ARRAY_SUFFIX,
    IGNORE_INDEX,
    IMAGE_SUFFIXES,
    SampleTransform,
    SegmentationDataset,
    label_values,
    missing_layout_error,
    open_image,
)
from segnest.data.palettes import generate_palette
from segnest.errors import SegnestError

LAYOUT = "root/classes.txt, root/images/<split>/<stem>.jpg and root/masks/<split>/<stem>.png"


# Raw mask values a label map may rewrite: what an 8- or 16-bit PNG can hold.
MAX_RAW_VALUE = 65535
LABEL_MAP_FORMAT = ("raw:train_id pairs separated by commas, e.g. 255:1,128:2 (in a recipe "
                    "YAML quote it, '255:1', or write a mapping {255: 1})")


def read_classes_file(path: Path) -> tuple[list[str], np.ndarray | None]:
    """Parse ``classes.txt``: one class name per line, optionally followed by its colour as
    three 0-255 integers. Blank lines and lines starting with ``#`` are skipped. Colours
    must be given for every class or for none; returns the names and the colours (None
    when none are given)."""
    if not path.is_file():
        raise SegnestError(
            f"class list not found: {path}; create it with one class name per line, "
            "optionally followed by R G B (see datasets/README.md)"
        )
    names: list[str] = []
    colors: list[tuple[int, int, int] | None] = []
    try:
        text_lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise SegnestError(
            f"{path} is not UTF-8 text (byte {err.start}: {err.reason}); save it as UTF-8 "
            "(e.g. iconv -f latin1 -t utf-8, or 'Save as UTF-8' in an editor)"
        ) from err
    for line_number, line in enumerate(text_lines, 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        tokens = text.split()
        color = None
        if len(tokens) >= 4 and all(_is_number(token) for token in tokens[-3:]):
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
    return names, None


def _is_number(text: str) -> bool:
    """ASCII digits only: str.isdigit() also accepts '²' and other digits int() refuses."""
    return text.isascii() and text.isdigit()


def parse_label_map(spec: str | Mapping | None, num_classes: int) -> dict[int, int]:
    """``"255:1,128:2"`` or ``{255: 1, 128: 2}`` -> {raw value: train id}, checked: raw
    values 0..65535, train ids 0..num_classes-1 or 255 (ignore)."""
    if spec is None or spec == "":
        return {}
    if isinstance(spec, Mapping):
        pairs = [(str(raw), str(train_id)) for raw, train_id in spec.items()]
    else:
        pairs = [tuple(item.split(":", 1)) if ":" in item else (item, "")
                 for item in str(spec).replace(" ", "").split(",") if item]
    mapping: dict[int, int] = {}
    for raw_text, id_text in pairs:
        if not (_is_number(raw_text) and _is_number(id_text)):
            raise SegnestError(f"--label-map {spec!r}: cannot read '{raw_text}:{id_text}'; "
                               f"write {LABEL_MAP_FORMAT}")
        raw, train_id = int(raw_text), int(id_text)
        if raw > MAX_RAW_VALUE:
            raise SegnestError(f"--label-map {spec!r}: raw value {raw} is not a mask value; "
                               f"raw values are 0..{MAX_RAW_VALUE}")
        if train_id >= num_classes and train_id != IGNORE_INDEX:
            raise SegnestError(
                f"--label-map {spec!r}: {raw}:{train_id} maps to no class; classes.txt lists "
                f"{num_classes} classes, so train ids are 0..{num_classes - 1} or "
                f"{IGNORE_INDEX} (ignore)")
        if raw in mapping:
            raise SegnestError(f"--label-map {spec!r}: raw value {raw} is mapped twice; "
                               "keep one pair per value")
        mapping[raw] = train_id
    return mapping


def _warn_black_classes(path: Path, classes: list[str], colours: np.ndarray) -> None:
    """Black is honoured but named: masks are drawn with ignore black, so a black class
    looks unlabelled in previews and overlays. Python shows a given warning once."""
    black = [name for name, colour in zip(classes, colours, strict=True) if not colour.any()]
    if black:
        warnings.warn(
            f"{path} gives {', '.join(repr(name) for name in black)} the colour 0 0 0, which "
            "is how ignored pixels are drawn; it will look unlabelled in coloured masks and "
            "overlays; choose another colour unless your colour masks use black for it",
            stacklevel=2,
        )


def colour_codes(rgb: np.ndarray) -> np.ndarray:
    """HxWx3 (or Nx3) uint8 colours -> one int64 code per colour, 0xRRGGBB."""
    rgb = np.asarray(rgb, dtype=np.int64)
    return (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]


class FolderDataset(SegmentationDataset):
    """Images with same-stem PNG masks holding train ids (after ``label_map``), or colours
    when ``classes.txt`` gives them."""

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "train",
        transform: SampleTransform | None = None,
        label_map: str | Mapping | None = None,
        in_channels: int = 3,
    ) -> None:
        base = Path(root)
        if not base.is_dir():
            raise missing_layout_error(base, LAYOUT, own_data=True)
        classes_path = base / "classes.txt"
        classes, colours = read_classes_file(classes_path)
        self.classes_path = classes_path
        self.label_map = parse_label_map(label_map, len(classes))
        # Colour masks are looked up in the colours classes.txt gives, never in a
        # generated palette: that one only draws predictions.
        self.mask_colours = colours
        if colours is not None:
            _warn_black_classes(classes_path, classes, colours)
        palette = colours if colours is not None else generate_palette(len(classes))
        image_dir = base / "images" / split
        mask_dir = base / "masks" / split
        for folder in (image_dir, mask_dir):
            if not folder.is_dir():
                raise missing_layout_error(folder, LAYOUT, own_data=True)
        samples = []
        seen: dict[str, Path] = {}
        for image_path in sorted(image_dir.iterdir()):
            if image_path.suffix.lower() not in (*IMAGE_SUFFIXES, ARRAY_SUFFIX):
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
        self.in_channels = in_channels

    def label_mapping_id(self) -> str:
        colours = None if self.mask_colours is None else self.mask_colours.tolist()
        return (f"{super().label_mapping_id()}/label_map={sorted(self.label_map.items())}"
                f"/colours={colours}")

    def _read_raw_mask(self, mask_path: Path) -> np.ndarray:
        image = open_image(mask_path)
        if image.mode not in ("RGB", "RGBA") or self.mask_colours is None:
            return label_values(image, mask_path, hint=(
                f"; to read colour masks, give every class its R G B colour in "
                f"{self.classes_path} (e.g. 'road 128 64 128')"))
        return np.asarray(image.convert("RGB"), dtype=np.uint8)

    def _to_train_ids(self, raw: np.ndarray, mask_path: Path) -> np.ndarray:
        if raw.ndim == 3:
            return self._colours_to_train_ids(raw, mask_path)
        if not self.label_map:
            return raw
        train_ids = raw.copy()
        for value, train_id in self.label_map.items():
            train_ids[raw == value] = train_id
        return train_ids

    def _colours_to_train_ids(self, rgb: np.ndarray, mask_path: Path) -> np.ndarray:
        palette = colour_codes(self.mask_colours)
        if len(np.unique(palette)) < len(palette):
            raise SegnestError(
                f"colour mask {mask_path} cannot be read: {self.classes_path} gives two "
                "classes the same colour; give every class its own R G B colour")
        order = np.argsort(palette)
        ordered = palette[order]
        codes = colour_codes(rgb)
        slot = np.clip(np.searchsorted(ordered, codes), 0, len(ordered) - 1)
        return np.where(ordered[slot] == codes, order[slot], IGNORE_INDEX).astype(np.int64)
