"""COCO-format detection and instance segmentation data.

The official layout is ``<root>/annotations/instances_{train,val}2017.json`` with the
images in ``<root>/{train,val}2017/``; any other set in COCO JSON is given as an
annotation file and an image folder (:func:`coco_source`).

Conventions (the same as torchvision's and detectron2's COCO readers):

* Category ids, whatever they are (COCO's run 1..90 with gaps, others start at 0), map to
  labels 1..K in the order of their sorted ids; label 0 is the background. Results are
  written back with the original ids (``category_ids``).
* Crowd regions (``iscrowd=1``) are left out of the training targets; the evaluation
  reads them from the annotation file, where COCOeval treats them as regions to ignore.
* Boxes are ``[x, y, width, height]`` in the file and ``x1, y1, x2, y2`` in targets,
  clipped to the image; boxes of zero size after clipping are left out of training.
* Images without (non-crowd) annotations are skipped in training and kept in evaluation.

:func:`check_coco` reads an annotation file once and names each problem once, with how
to fix it: errors stop training before any work, notes say what segnest does about the
rest.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from segnest.data.base import read_rgb_image
from segnest.errors import SegnestError

COCO_SPLITS = ("train", "val")
_EXAMPLES = 3


def require_pycocotools():
    """The ``pycocotools`` module, or one error saying how to install it."""
    try:
        import pycocotools.mask  # noqa: F401
        from pycocotools import coco, cocoeval  # noqa: F401
    except ImportError as error:
        raise SegnestError("COCO data and evaluation need pycocotools: pip install pycocotools"
                           ) from error
    import pycocotools
    return pycocotools


@dataclass(frozen=True)
class CocoSource:
    """An annotation file and the folder its ``file_name`` entries are relative to."""

    annotations: Path
    images: Path


def coco_source(root: str | os.PathLike | None = None, split: str = "train",
                annotations: str | os.PathLike | None = None,
                images: str | os.PathLike | None = None) -> CocoSource:
    """The official layout under ``root`` for ``split``, or explicit ``annotations`` and
    ``images`` paths (both needed) for one's own data."""
    if annotations is not None or images is not None:
        if annotations is None or images is None:
            raise SegnestError("own COCO-format data needs both the annotation file and the "
                               "image folder (--train-ann/--train-images, --val-ann/--val-images)")
        return CocoSource(Path(annotations), Path(images))
    if split not in COCO_SPLITS:
        raise SegnestError(f"COCO split must be one of {COCO_SPLITS}, got '{split}'")
    if root is None:
        raise SegnestError("COCO data needs --data-root (the folder holding annotations/ and "
                           f"{split}2017/) or an annotation file and image folder")
    root = Path(root)
    source = CocoSource(root / "annotations" / f"instances_{split}2017.json",
                        root / f"{split}2017")
    if not source.annotations.is_file():
        raise SegnestError(
            f"{source.annotations} not found: a COCO root holds annotations/instances_"
            f"{split}2017.json and {split}2017/ (see datasets/README.md); for other data "
            "give the annotation file and image folder")
    return source


def read_annotation_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise SegnestError(f"annotation file {path} not found; check the path")
    try:
        with open(path, encoding="utf-8") as file:
            data = json.load(file)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise SegnestError(f"{path} is not valid JSON ({error}); it must be a COCO "
                           "annotation file") from error
    missing = [key for key in ("images", "annotations", "categories")
               if not isinstance(data.get(key), list)]
    if missing:
        raise SegnestError(f"{path} has no {', '.join(missing)} list: it is not a COCO "
                           "instances file (keys images, annotations, categories)")
    return data


@dataclass
class CocoCheck:
    """What :func:`check_coco` found: ``errors`` stop training, ``notes`` are handled."""

    source: CocoSource
    errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def raise_errors(self) -> None:
        if self.errors:
            raise SegnestError(f"{self.source.annotations}: " + "; ".join(self.errors))


def _examples(items: list) -> str:
    shown = ", ".join(str(item) for item in items[:_EXAMPLES])
    return shown + (", ..." if len(items) > _EXAMPLES else "")


def _segmentation_kind(segmentation: Any) -> str | None:
    """'polygon', 'rle' or 'compressed rle'; None for anything else."""
    if isinstance(segmentation, list):
        polygons_ok = all(isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0
                          for p in segmentation)
        return "polygon" if segmentation and polygons_ok else None
    if isinstance(segmentation, dict) and isinstance(segmentation.get("size"), list):
        counts = segmentation.get("counts")
        if isinstance(counts, list):
            return "rle"
        if isinstance(counts, (str, bytes)):
            return "compressed rle"
    return None


def check_coco(source: CocoSource, masks: bool = False,
               data: dict[str, Any] | None = None) -> CocoCheck:
    """Check an annotation file against its image folder; ``masks`` when a mask model
    will train on it (then every non-crowd instance needs a valid segmentation)."""
    data = read_annotation_file(source.annotations) if data is None else data
    check = CocoCheck(source)
    errors, notes = check.errors, check.notes

    category_ids = [c.get("id") for c in data["categories"]]
    if not category_ids:
        errors.append("no categories; add the classes to 'categories' as {id, name}")
    duplicated = [i for i, n in Counter(category_ids).items() if n > 1]
    if duplicated:
        errors.append(f"category ids used twice: {_examples(duplicated)}; give each "
                      "category its own id")
    if category_ids and all(isinstance(i, int) for i in category_ids):
        low = min(category_ids)
        if low == 0:
            notes.append("category ids start at 0: they become labels 1..K (0 is the "
                         "background) and results are written with the original ids")
        elif sorted(category_ids) != list(range(low, low + len(category_ids))):
            notes.append("category ids are not contiguous: they become labels 1..K in id "
                         "order and results are written with the original ids")

    images = {}
    for image in data["images"]:
        images.setdefault(image.get("id"), image)
    if len(images) < len(data["images"]):
        errors.append("image ids used twice; give each image its own id")
    missing_files = sorted(str(image.get("file_name")) for image in images.values()
                           if not (source.images / str(image.get("file_name"))).is_file())
    if missing_files:
        errors.append(f"{len(missing_files)} image files not found under {source.images} "
                      f"({_examples(missing_files)}); check the image folder or remove those "
                      "images from the annotation file")

    known_categories = set(category_ids)
    unknown_category, unknown_image, bad_box, outside, empty_box = [], [], [], [], []
    bad_mask, wrong_mask_size, crowd, mask_kinds = [], [], 0, Counter()
    annotated = set()
    for annotation in data["annotations"]:
        identifier = annotation.get("id")
        if annotation.get("category_id") not in known_categories:
            unknown_category.append(identifier)
        image = images.get(annotation.get("image_id"))
        if image is None:
            unknown_image.append(identifier)
            continue
        if annotation.get("iscrowd", 0):
            crowd += 1
            continue
        box = annotation.get("bbox")
        if not (isinstance(box, list) and len(box) == 4
                and all(isinstance(v, (int, float)) for v in box)):
            bad_box.append(identifier)
            continue
        x, y, w, h = box
        width, height = image.get("width", 0), image.get("height", 0)
        if x < 0 or y < 0 or x + w > width or y + h > height:
            outside.append(identifier)
        if min(x + w, width) - max(x, 0) <= 0 or min(y + h, height) - max(y, 0) <= 0:
            empty_box.append(identifier)
            continue
        annotated.add(image.get("id"))
        kind = _segmentation_kind(annotation.get("segmentation"))
        if kind is None:
            bad_mask.append(identifier)
            continue
        mask_kinds[kind] += 1
        if kind != "polygon" and annotation["segmentation"]["size"] != [height, width]:
            wrong_mask_size.append(identifier)

    if unknown_category:
        errors.append(f"{len(unknown_category)} annotations name a category_id not in "
                      f"'categories' (annotation ids {_examples(unknown_category)}); add the "
                      "category or fix the ids")
    if unknown_image:
        errors.append(f"{len(unknown_image)} annotations name an image_id not in 'images' "
                      f"(annotation ids {_examples(unknown_image)}); add the image or remove "
                      "the annotations")
    if bad_box:
        errors.append(f"{len(bad_box)} annotations have no valid bbox [x, y, width, height] "
                      f"(annotation ids {_examples(bad_box)}); fix or remove them")
    if masks and bad_mask:
        errors.append(f"{len(bad_mask)} annotations have no valid segmentation (a polygon "
                      f"list of >= 3 points, or RLE with size and counts; annotation ids "
                      f"{_examples(bad_mask)}); a mask model needs one per instance: fix "
                      "them or train a box-only model (faster_rcnn, cascade_rcnn)")
    if wrong_mask_size:
        errors.append(f"{len(wrong_mask_size)} RLE masks have a size other than their "
                      f"image's [height, width] (annotation ids {_examples(wrong_mask_size)});"
                      " re-encode them at the image size")
    if outside:
        notes.append(f"{len(outside)} boxes extend outside their image (annotation ids "
                     f"{_examples(outside)}): clipped to the image")
    if empty_box:
        notes.append(f"{len(empty_box)} boxes have zero width or height inside the image "
                     f"(annotation ids {_examples(empty_box)}): left out of training")
    if crowd:
        notes.append(f"{crowd} crowd regions (iscrowd=1): left out of training, ignored "
                     "regions in evaluation")
    without = len(set(images) - annotated)
    if without:
        notes.append(f"{without} of {len(images)} images have no usable annotations: skipped "
                     "in training, kept in evaluation")
    if masks and mask_kinds:
        notes.append("masks given as " + ", ".join(f"{n} {kind}" for kind, n in
                                                   sorted(mask_kinds.items())))
    return check


class CocoDetection(Dataset):
    """A COCO-format set as ``(image, target)`` pairs for the R-CNN models.

    ``image`` is a float CHW tensor in [0, 1]; ``target`` holds ``boxes`` (x1, y1, x2, y2),
    ``labels`` (1..K), ``image_id`` and, with ``masks``, ``masks`` (N x H x W uint8).
    ``train`` drops the images without usable annotations and flips horizontally with
    probability ``flip`` (the torch generator decides; see ``SeededSamples``).
    """

    def __init__(self, source: CocoSource, train: bool = False, masks: bool = False,
                 flip: float = 0.5, check: bool = True) -> None:
        require_pycocotools()
        data = read_annotation_file(source.annotations)
        if check:
            check_coco(source, masks=masks, data=data).raise_errors()
        self.source = source
        self.masks = masks
        self.train = train
        self.flip = flip if train else 0.0
        categories = sorted(data["categories"], key=lambda c: c["id"])
        self.category_ids = [c["id"] for c in categories]
        self.classes = [str(c.get("name", c["id"])) for c in categories]
        self.num_classes = len(categories)
        self._label_of = {cid: label for label, cid in enumerate(self.category_ids, start=1)}
        self.images = sorted(data["images"], key=lambda image: image["id"])
        self._annotations: dict[Any, list[dict]] = {image["id"]: [] for image in self.images}
        for annotation in data["annotations"]:
            if not annotation.get("iscrowd", 0) and annotation["image_id"] in self._annotations:
                self._annotations[annotation["image_id"]].append(annotation)
        if train:
            self.images = [image for image in self.images
                           if len(self._boxes(image)[0]) > 0]
            if not self.images:
                raise SegnestError(f"{source.annotations}: no image has a usable annotation "
                                   "to train on")

    def __len__(self) -> int:
        return len(self.images)

    def name(self, index: int) -> str:
        return Path(self.images[index]["file_name"]).stem

    def _boxes(self, image: dict) -> tuple[np.ndarray, list[dict]]:
        """The image's usable boxes (xyxy, clipped) and their annotations."""
        width, height = image["width"], image["height"]
        boxes, kept = [], []
        for annotation in self._annotations[image["id"]]:
            x, y, w, h = annotation["bbox"]
            box = [max(x, 0), max(y, 0), min(x + w, width), min(y + h, height)]
            if box[2] > box[0] and box[3] > box[1]:
                boxes.append(box)
                kept.append(annotation)
        return np.asarray(boxes, np.float32).reshape(-1, 4), kept

    def decode_mask(self, annotation: dict, height: int, width: int) -> np.ndarray:
        from pycocotools import mask as mask_utils

        segmentation = annotation["segmentation"]
        if isinstance(segmentation, list):
            rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
        elif isinstance(segmentation["counts"], list):
            rle = mask_utils.frPyObjects(segmentation, height, width)
        else:
            rle = segmentation
        return mask_utils.decode(rle)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        image_info = self.images[index]
        path = self.source.images / image_info["file_name"]
        pixels = read_rgb_image(path)
        height, width = pixels.shape[:2]
        if (height, width) != (image_info["height"], image_info["width"]):
            raise SegnestError(
                f"{path} is {width}x{height} but {self.source.annotations} says "
                f"{image_info['width']}x{image_info['height']}; fix the annotation file")
        boxes, annotations = self._boxes(image_info)
        target = {
            "boxes": torch.from_numpy(boxes),
            "labels": torch.tensor([self._label_of[a["category_id"]] for a in annotations],
                                   dtype=torch.int64),
            "image_id": torch.tensor(image_info["id"]),
        }
        if self.masks:
            target["masks"] = torch.from_numpy(np.stack(
                [self.decode_mask(a, height, width) for a in annotations])
                if annotations else np.zeros((0, height, width), np.uint8))
        image = torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1).float() / 255
        if self.flip and torch.rand(()) < self.flip:
            image = image.flip(-1)
            boxes = target["boxes"]
            target["boxes"] = torch.stack([width - boxes[:, 2], boxes[:, 1],
                                           width - boxes[:, 0], boxes[:, 3]], dim=1)
            if self.masks:
                target["masks"] = target["masks"].flip(-1)
        return image, target


def collate_detection(batch: list) -> tuple[list, list]:
    """Images and targets as lists: detection images keep their own sizes."""
    images, targets = zip(*batch, strict=True)
    return list(images), list(targets)
