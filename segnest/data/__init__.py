"""Datasets and transforms: ``build_dataset(name, root, split, transform)`` is the entry
point; see datasets/README.md for the folder layouts."""

from __future__ import annotations

import os

from segnest.data.ade20k import ADE20K, ADE20K_CLASSES
from segnest.data.base import (
    SampleTransform,
    SegmentationDataset,
    default_data_root,
    read_rgb_image,
)
from segnest.data.cityscapes import CITYSCAPES_CLASSES, LABEL_TO_TRAIN, TRAIN_TO_LABEL, Cityscapes
from segnest.data.folder import FolderDataset
from segnest.data.mini import (
    MINI_CLASSES,
    MINI_PALETTE,
    build_mini_dataset,
    ensure_mini_classification,
    ensure_mini_segmentation,
)
from segnest.data.palettes import ADE20K_PALETTE, CITYSCAPES_PALETTE, generate_palette
from segnest.data.transforms import (
    MEAN,
    STD,
    SegEvalTransform,
    SegTrainTransform,
    seed_worker,
)
from segnest.errors import SegnestError

DATASET_NAMES = ("ade20k", "cityscapes", "folder", "mini")


def build_dataset(
    name: str,
    root: str | os.PathLike | None = None,
    split: str = "train",
    transform: SampleTransform | None = None,
) -> SegmentationDataset:
    """The dataset ``name`` over ``root`` (None: the default root; for ``mini`` the root is
    the cache folder it is generated into)."""
    if name == "ade20k":
        return ADE20K(root, split, transform)
    if name == "cityscapes":
        return Cityscapes(root, split, transform)
    if name == "folder":
        if root is None:
            raise SegnestError(
                "the folder dataset needs a root; pass --data-root pointing at a folder with "
                "classes.txt, images/<split>/ and masks/<split>/ (see datasets/README.md)"
            )
        return FolderDataset(root, split, transform)
    if name == "mini":
        return build_mini_dataset(root, split, transform)
    raise SegnestError(f"unknown dataset '{name}'; choose one of: {', '.join(DATASET_NAMES)}")


__all__ = [
    "ADE20K", "ADE20K_CLASSES", "ADE20K_PALETTE", "CITYSCAPES_CLASSES", "CITYSCAPES_PALETTE",
    "Cityscapes", "DATASET_NAMES", "FolderDataset", "LABEL_TO_TRAIN", "MEAN", "MINI_CLASSES",
    "MINI_PALETTE", "STD", "SegEvalTransform", "SegTrainTransform", "SegmentationDataset",
    "TRAIN_TO_LABEL", "build_dataset", "default_data_root", "ensure_mini_classification",
    "ensure_mini_segmentation", "generate_palette", "read_rgb_image", "seed_worker",
]
