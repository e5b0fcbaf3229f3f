"""Cityscapes (fine annotations): 19 evaluated classes.

Raw ``*_gtFine_labelIds.png`` masks are mapped to train ids through a 256-entry lookup
table; a ``*_gtFine_labelTrainIds.png`` next to it (made by cityscapesScripts'
``createTrainIdLabelImgs``) is used as is. Predictions go back to label ids for the
benchmark server with ``Cityscapes.to_label_file``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from segnest.data.base import (
    IGNORE_INDEX,
    SampleTransform,
    SegmentationDataset,
    default_data_root,
    missing_layout_error,
)
from segnest.data.palettes import CITYSCAPES_PALETTE
from segnest.errors import SegnestError

CITYSCAPES_CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
    "motorcycle", "bicycle",
)

# Label id of each train id 0..18.
TRAIN_TO_LABEL = np.array(
    [7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33], dtype=np.uint8
)
# Train id of each label id; every id that is not evaluated is ignored.
LABEL_TO_TRAIN = np.full(256, IGNORE_INDEX, dtype=np.uint8)
LABEL_TO_TRAIN[TRAIN_TO_LABEL] = np.arange(len(TRAIN_TO_LABEL), dtype=np.uint8)

SPLITS = ("train", "val", "test")
LAYOUT = (
    "leftImg8bit/{train,val,test}/<city>/<name>_leftImg8bit.png and "
    "gtFine/{train,val,test}/<city>/<name>_gtFine_labelIds.png"
)
_IMAGE_SUFFIX = "_leftImg8bit.png"
_TRAIN_ID_SUFFIX = "_gtFine_labelTrainIds.png"
_LABEL_ID_SUFFIX = "_gtFine_labelIds.png"


class Cityscapes(SegmentationDataset):
    """Cityscapes fine annotations; the test split may come without masks (all ignore)."""

    def __init__(
        self,
        root: str | os.PathLike | None = None,
        split: str = "train",
        transform: SampleTransform | None = None,
    ) -> None:
        if split not in SPLITS:
            raise SegnestError(
                f"Cityscapes has no split '{split}'; use one of: {', '.join(SPLITS)}"
            )
        base = Path(root) if root is not None else default_data_root("cityscapes")
        image_dir = base / "leftImg8bit" / split
        mask_dir = base / "gtFine" / split
        for folder in (base, image_dir):
            if not folder.is_dir():
                raise missing_layout_error(folder, LAYOUT)
        if split != "test" and not mask_dir.is_dir():
            raise missing_layout_error(mask_dir, LAYOUT)
        samples: list[tuple[Path, Path | None]] = []
        for image_path in sorted(image_dir.glob(f"*/*{_IMAGE_SUFFIX}")):
            city = image_path.parent.name
            prefix = image_path.name[: -len(_IMAGE_SUFFIX)]
            train_id_path = mask_dir / city / f"{prefix}{_TRAIN_ID_SUFFIX}"
            label_id_path = mask_dir / city / f"{prefix}{_LABEL_ID_SUFFIX}"
            if train_id_path.is_file():
                samples.append((image_path, train_id_path))
            elif label_id_path.is_file():
                samples.append((image_path, label_id_path))
            elif split == "test":
                samples.append((image_path, None))
            else:
                raise SegnestError(
                    f"image {image_path} has no mask (expected {label_id_path}); "
                    "unpack gtFine_trainvaltest.zip into the same root"
                )
        super().__init__(base, split, samples, CITYSCAPES_CLASSES, CITYSCAPES_PALETTE, transform)

    def name(self, index: int) -> str:
        image_path = self.samples[index][0]
        return f"{image_path.parent.name}/{image_path.name[: -len(_IMAGE_SUFFIX)]}"

    def _to_train_ids(self, raw: np.ndarray, mask_path: Path) -> np.ndarray:
        if mask_path.name.endswith(_TRAIN_ID_SUFFIX):
            return raw
        if raw.min(initial=0) < 0 or raw.max(initial=0) > 255:
            raise SegnestError(
                f"mask {mask_path} holds values outside 0..255, which are not Cityscapes "
                "label ids; use the official gtFine *_labelIds.png files"
            )
        return LABEL_TO_TRAIN[raw].astype(np.int64)

    @staticmethod
    def to_label_file(train_ids: np.ndarray) -> np.ndarray:
        """Train ids (ignore = 255) -> Cityscapes label ids as uint8; ignore becomes 0
        ("unlabeled"), as the benchmark server expects."""
        train_ids = np.asarray(train_ids)
        valid = train_ids != IGNORE_INDEX
        if ((train_ids[valid] < 0) | (train_ids[valid] >= len(TRAIN_TO_LABEL))).any():
            raise ValueError(f"train ids must be in 0..{len(TRAIN_TO_LABEL) - 1} or 255")
        labels = np.zeros(train_ids.shape, dtype=np.uint8)
        labels[valid] = TRAIN_TO_LABEL[train_ids[valid]]
        return labels
