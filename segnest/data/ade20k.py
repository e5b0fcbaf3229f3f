"""ADE20K (MIT Scene Parsing benchmark, ``ADEChallengeData2016``): 150 classes.

Annotation value 0 ("other") is ignored; values 1..150 are classes 0..149.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from segnest.data.base import (
    IGNORE_INDEX,
    IMAGE_SUFFIXES,
    SampleTransform,
    SegmentationDataset,
    default_data_root,
    missing_layout_error,
)
from segnest.data.palettes import ADE20K_PALETTE, generate_palette
from segnest.errors import SegnestError

ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass",
    "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain",
    "chair", "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug",
    "field", "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub",
    "railing", "cushion", "base", "box", "column", "signboard", "chest of drawers", "counter",
    "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand", "path", "stairs",
    "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge",
    "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench",
    "countertop", "stove", "palm", "kitchen island", "computer", "swivel chair", "boat", "bar",
    "arcade machine", "hovel", "bus", "towel", "light", "truck", "tower", "chandelier",
    "awning", "streetlight", "booth", "television receiver", "airplane", "dirt track",
    "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet",
    "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer",
    "plaything", "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag",
    "minibike", "cradle", "oven", "ball", "food", "step", "tank", "trade name", "microwave",
    "pot", "animal", "bicycle", "lake", "dishwasher", "screen", "blanket", "sculpture", "hood",
    "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen", "plate",
    "monitor", "bulletin board", "shower", "radiator", "glass", "clock", "flag",
)

SPLIT_FOLDERS = {"train": "training", "val": "validation"}
LAYOUT = "ADEChallengeData2016/{images,annotations}/{training,validation}/<name>.{jpg,png}"


def _resolve_root(root: Path) -> Path:
    """Accept both the folder holding ``ADEChallengeData2016`` and that folder itself."""
    nested = root / "ADEChallengeData2016"
    return nested if nested.is_dir() else root


class ADE20K(SegmentationDataset):
    """ADE20K in its official layout; ``classes``/``palette`` override the 150 defaults for
    datasets in the same layout with other classes (the bundled mini dataset)."""

    def __init__(
        self,
        root: str | os.PathLike | None = None,
        split: str = "train",
        transform: SampleTransform | None = None,
        classes: Sequence[str] | None = None,
        palette: np.ndarray | None = None,
    ) -> None:
        if split not in SPLIT_FOLDERS:
            raise SegnestError(
                f"ADE20K has no split '{split}'; use one of: {', '.join(SPLIT_FOLDERS)}"
            )
        given = Path(root) if root is not None else default_data_root("ade20k")
        if not given.is_dir():
            raise missing_layout_error(given, LAYOUT)
        base = _resolve_root(given)
        image_dir = base / "images" / SPLIT_FOLDERS[split]
        annotation_dir = base / "annotations" / SPLIT_FOLDERS[split]
        for folder in (image_dir, annotation_dir):
            if not folder.is_dir():
                raise missing_layout_error(folder, LAYOUT)
        samples = []
        for image_path in sorted(image_dir.iterdir()):
            if image_path.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            annotation_path = annotation_dir / f"{image_path.stem}.png"
            if not annotation_path.is_file():
                raise SegnestError(
                    f"image {image_path} has no annotation (expected {annotation_path}); "
                    "add the annotation or remove the image"
                )
            samples.append((image_path, annotation_path))
        if classes is None:
            classes = ADE20K_CLASSES
            palette = ADE20K_PALETTE if palette is None else palette
        elif palette is None:
            palette = generate_palette(len(classes))
        super().__init__(base, split, samples, classes, palette, transform)

    def _to_train_ids(self, raw: np.ndarray, mask_path: Path) -> np.ndarray:
        train_ids = raw - 1
        train_ids[raw == 0] = IGNORE_INDEX
        return train_ids

    @staticmethod
    def to_label_file(train_ids: np.ndarray) -> np.ndarray:
        """Train ids (ignore = 255) -> annotation values as the benchmark stores them:
        class c becomes c + 1 and ignore becomes 0."""
        train_ids = np.asarray(train_ids)
        valid = train_ids != IGNORE_INDEX
        if ((train_ids[valid] < 0) | (train_ids[valid] > 254)).any():
            raise ValueError("train ids must be in 0..254 or 255 (ignore)")
        labels = np.zeros(train_ids.shape, dtype=np.uint8)
        labels[valid] = train_ids[valid] + 1
        return labels
