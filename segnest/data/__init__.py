"""Datasets and transforms: ``build_dataset(name, root, split, transform, label_map)`` is the
entry point; see datasets/README.md for the folder layouts."""

from __future__ import annotations

import os
from collections.abc import Mapping

from segnest.data.ade20k import ADE20K, ADE20K_CLASSES
from segnest.data.base import (
    SampleTransform,
    SegmentationDataset,
    default_data_root,
    read_rgb_image,
    recorded_data_root,
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
    label_map: str | Mapping | None = None,
    in_channels: int = 3,
) -> SegmentationDataset:
    """The dataset ``name`` over ``root`` (None: the default root; for ``mini`` the root is
    the cache folder it is generated into). ``label_map`` (raw mask value -> train id)
    applies to folder datasets only: the others map their published label ids themselves;
    so does ``in_channels`` other than 3 (the published sets are RGB)."""
    if in_channels != 3 and name != "folder":
        raise SegnestError(f"--in-channels {in_channels} applies to folder datasets only; "
                           f"{name} images are RGB")
    if label_map and name in DATASET_NAMES and name != "folder":
        raise SegnestError(
            f"--label-map applies to folder datasets only; {name} maps its own label ids, "
            "remove --label-map (or the label_map recipe key)"
        )
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
        return FolderDataset(root, split, transform, label_map, in_channels)
    if name == "mini":
        return build_mini_dataset(root, split, transform)
    raise SegnestError(f"unknown dataset '{name}'; choose one of: {', '.join(DATASET_NAMES)}")


__all__ = [
    "ADE20K", "ADE20K_CLASSES", "ADE20K_PALETTE", "CITYSCAPES_CLASSES", "CITYSCAPES_PALETTE",
    "Cityscapes", "DATASET_NAMES", "FolderDataset", "LABEL_TO_TRAIN", "MEAN", "MINI_CLASSES",
    "MINI_PALETTE", "STD", "SegEvalTransform", "SegTrainTransform", "SegmentationDataset",
    "TRAIN_TO_LABEL", "build_dataset", "default_data_root", "ensure_mini_classification",
    "recorded_data_root",
    "ensure_mini_segmentation", "generate_palette", "read_rgb_image", "seed_worker",
]
