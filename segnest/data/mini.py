"""The bundled procedural datasets that ``segnest demo`` trains on.

Nothing is downloaded: on first use the images are drawn from a fixed seed (the same bytes
every time) into a cache folder. The visual vocabulary has eight classes. Four "stuff"
classes fill the background and differ only by texture — stripes, checkerboard, speckle
noise, smooth gradient — each painted with two random colours, so colour alone says
nothing about the class. Four "object" classes differ only by shape — circle, square,
triangle, cross — with random colours, sizes, positions, rotations and overlaps. Every
image gets sensor noise. Labels are exact (the renderer knows them); only a one-pixel line
along class boundaries is left unlabelled, where JPEG blurs the colours.

Generation is atomic: everything is written into a temporary folder beside the target and
renamed into place with a version marker, so an interrupted or concurrent call never leaves
a half-written dataset behind.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from segnest.data.ade20k import ADE20K
from segnest.data.base import SampleTransform
from segnest.errors import SegnestError
from segnest.runtime.files import default_cache_dir

MINI_CLASSES = (
    "stripes", "checker", "noise", "gradient", "circle", "square", "triangle", "cross",
)
MINI_PALETTE = np.array([
    (230, 159, 0), (86, 180, 233), (0, 158, 115), (240, 228, 66),
    (0, 114, 178), (213, 94, 0), (204, 121, 167), (120, 40, 140),
], dtype=np.uint8)

# The detection set's categories: the object shapes, with COCO-style ids from 1.
DETECTION_CLASSES = MINI_CLASSES[4:]
SEGMENTATION_VERSION = "mini-seg-v1"
DETECTION_VERSION = "mini-det-v1"
CLASSIFICATION_VERSION = "mini-cls-v1"
MARKER_NAME = "VERSION"
NUM_TRAIN, NUM_VAL = 300, 60
CLS_TRAIN_PER_CLASS, CLS_VAL_PER_CLASS = 100, 20
CLS_SIZE = 64
DET_NUM_TRAIN, DET_NUM_VAL = 240, 48
# Instances with fewer visible pixels (mostly hidden by later ones) are not annotated.
_MIN_INSTANCE_PIXELS = 40

_SEED = 20200419
_SPLIT_IDS = {"train": 0, "val": 1}
_NUM_STUFF = 4
_SENSOR_NOISE_STD = 4.0
_MIN_COLOR_DISTANCE = 110.0


def _color_pair(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Two random colours far enough apart that the texture between them stays visible."""
    first = rng.integers(0, 256, 3).astype(np.float32)
    second = rng.integers(0, 256, 3).astype(np.float32)
    while np.linalg.norm(first - second) < _MIN_COLOR_DISTANCE:
        second = rng.integers(0, 256, 3).astype(np.float32)
    return first, second


def _stuff_texture(kind: int, rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray
                   ) -> np.ndarray:
    """An HxWx3 float image of stuff class ``kind`` (0 stripes, 1 checker, 2 noise,
    3 gradient) covering the whole grid."""
    first, second = _color_pair(rng)
    angle = rng.uniform(0, np.pi)
    along = xx * np.cos(angle) + yy * np.sin(angle)
    if kind == 0:
        period = rng.uniform(6, 12)
        mix = (np.sin(2 * np.pi * along / period + rng.uniform(0, 2 * np.pi)) > 0)
    elif kind == 1:
        cell = int(rng.integers(4, 9))
        offset_x, offset_y = (int(offset) for offset in rng.integers(0, cell, 2))
        mix = ((xx + offset_x) // cell + (yy + offset_y) // cell) % 2
    elif kind == 2:
        block = int(rng.integers(1, 3))
        grid = rng.random((yy.shape[0] // block + 1, xx.shape[1] // block + 1))
        mix = grid[yy // block, xx // block]
    else:
        mix = (along - along.min()) / max(float(np.ptp(along)), 1.0)
    mix = mix.astype(np.float32)[..., None]
    return first * (1 - mix) + second * mix


def _shape_mask(kind: int, yy: np.ndarray, xx: np.ndarray, center: tuple[float, float],
                radius: float, angle: float) -> np.ndarray:
    """Pixels inside object shape ``kind`` (0 circle, 1 square, 2 triangle, 3 cross)."""
    dy, dx = yy - center[0], xx - center[1]
    u = (dx * np.cos(angle) + dy * np.sin(angle)) / radius
    v = (-dx * np.sin(angle) + dy * np.cos(angle)) / radius
    if kind == 0:
        return u * u + v * v <= 1.0
    if kind == 1:
        return np.maximum(np.abs(u), np.abs(v)) <= 0.8
    if kind == 2:
        # Equilateral triangle with circumradius 1: inside all three edges at distance 1/2.
        edge_normals = (0.0, 2 * np.pi / 3, 4 * np.pi / 3)
        return np.logical_and.reduce([u * np.cos(a) + v * np.sin(a) <= 0.5 for a in edge_normals])
    arm = 0.3
    return ((np.abs(u) <= 1) & (np.abs(v) <= arm)) | ((np.abs(v) <= 1) & (np.abs(u) <= arm))


def _paint_objects(rng: np.random.Generator, image: np.ndarray, labels: np.ndarray,
                   yy: np.ndarray, xx: np.ndarray, count: int, radius_range: tuple[float, float],
                   center_range: tuple[float, float], kinds: list[int] | None = None
                   ) -> list[tuple[int, np.ndarray]]:
    """Draw ``count`` shaded objects in place; later ones occlude earlier ones. Returns each
    object's shape (0-3) and the pixels it covers before occlusion."""
    height, width = labels.shape
    drawn = []
    for number in range(count):
        kind = kinds[number] if kinds is not None else int(rng.integers(0, 4))
        radius = rng.uniform(*radius_range) * min(height, width)
        center = (rng.uniform(*center_range) * height, rng.uniform(*center_range) * width)
        inside = _shape_mask(kind, yy, xx, center, radius, rng.uniform(0, 2 * np.pi))
        color = rng.integers(0, 256, 3).astype(np.float32)
        # A mild linear shading keeps objects from being perfectly flat.
        shade_angle = rng.uniform(0, 2 * np.pi)
        shading = ((xx - center[1]) * np.cos(shade_angle) + (yy - center[0]) * np.sin(shade_angle))
        shading = (shading / radius * rng.uniform(0, 20)).astype(np.float32)[..., None]
        image[inside] = (color + shading)[inside]
        labels[inside] = _NUM_STUFF + kind + 1
        drawn.append((kind, inside))
    return drawn


def _stuff_layout(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, regions: int,
                  image: np.ndarray, labels: np.ndarray) -> None:
    """Split the canvas into weighted Voronoi regions, each a random stuff texture."""
    height, width = labels.shape
    centers = rng.uniform(0, 1, (regions, 2)) * (height, width)
    weights = rng.uniform(0.7, 1.3, regions)
    distance = np.stack([
        np.hypot(yy - cy, xx - cx) * weight
        for (cy, cx), weight in zip(centers, weights, strict=True)
    ])
    owner = distance.argmin(axis=0)
    for region in range(regions):
        kind = int(rng.integers(0, _NUM_STUFF))
        inside = owner == region
        image[inside] = _stuff_texture(kind, rng, yy, xx)[inside]
        labels[inside] = kind + 1


def _finish(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    noisy = image + rng.normal(0, _SENSOR_NOISE_STD, image.shape)
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)


def render_scene(rng: np.random.Generator, height: int, width: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    """One segmentation sample: RGB uint8 image and ADE20K-style annotation (0 = ignore,
    class c stored as c + 1)."""
    yy, xx = np.mgrid[0:height, 0:width]
    image = np.zeros((height, width, 3), np.float32)
    labels = np.zeros((height, width), np.uint8)
    _stuff_layout(rng, yy, xx, int(rng.integers(2, 5)), image, labels)
    _paint_objects(rng, image, labels, yy, xx, int(rng.integers(1, 5)), (0.12, 0.3), (0.1, 0.9))
    # Leave a one-pixel line along every class boundary unlabelled.
    annotation = labels.copy()
    annotation[:, :-1][labels[:, :-1] != labels[:, 1:]] = 0
    annotation[:-1, :][labels[:-1, :] != labels[1:, :]] = 0
    return _finish(rng, image), annotation


def render_class_sample(rng: np.random.Generator, class_index: int, size: int = CLS_SIZE
                        ) -> np.ndarray:
    """One classification image dominated by ``class_index``: a full-frame texture for a
    stuff class, or one large shape over a textured background for an object class."""
    yy, xx = np.mgrid[0:size, 0:size]
    if class_index < _NUM_STUFF:
        return _finish(rng, _stuff_texture(class_index, rng, yy, xx))
    image = np.zeros((size, size, 3), np.float32)
    labels = np.zeros((size, size), np.uint8)
    _stuff_layout(rng, yy, xx, int(rng.integers(1, 3)), image, labels)
    _paint_objects(rng, image, labels, yy, xx, 1, (0.3, 0.42), (0.4, 0.6),
                   [class_index - _NUM_STUFF])
    return _finish(rng, image)


def render_instances(rng: np.random.Generator, height: int, width: int
                     ) -> tuple[np.ndarray, list[tuple[int, np.ndarray]]]:
    """One detection sample: RGB uint8 image and its instances as (shape 0-3, visible
    mask), the visible mask being what later objects leave uncovered."""
    yy, xx = np.mgrid[0:height, 0:width]
    image = np.zeros((height, width, 3), np.float32)
    labels = np.zeros((height, width), np.uint8)
    _stuff_layout(rng, yy, xx, int(rng.integers(2, 5)), image, labels)
    drawn = _paint_objects(rng, image, labels, yy, xx, int(rng.integers(1, 6)), (0.1, 0.25),
                           (0.1, 0.9))
    instances = []
    covered = np.zeros((height, width), bool)
    for kind, inside in reversed(drawn):
        visible = inside & ~covered
        covered |= inside
        if visible.sum() >= _MIN_INSTANCE_PIXELS:
            instances.append((kind, visible))
    return _finish(rng, image), instances[::-1]


def _coco_instances(instances: list[tuple[int, np.ndarray]], image_id: int,
                    first_id: int) -> list[dict]:
    from pycocotools import mask as mask_utils

    annotations = []
    for number, (kind, visible) in enumerate(instances):
        rle = mask_utils.encode(np.asfortranarray(visible.astype(np.uint8)))
        x, y, w, h = (float(v) for v in mask_utils.toBbox(rle))
        annotations.append({
            "id": first_id + number, "image_id": image_id, "category_id": kind + 1,
            "bbox": [x, y, w, h], "area": float(mask_utils.area(rle)), "iscrowd": 0,
            "segmentation": {"size": list(visible.shape), "counts": rle["counts"].decode()},
        })
    return annotations


def _write_detection(destination: Path) -> None:
    categories = [{"id": i + 1, "name": name} for i, name in enumerate(DETECTION_CLASSES)]
    (destination / "annotations").mkdir()
    for split, count in (("train", DET_NUM_TRAIN), ("val", DET_NUM_VAL)):
        image_dir = destination / f"{split}2017"
        image_dir.mkdir()
        images, annotations = [], []
        for index in range(count):
            rng = np.random.default_rng([_SEED, 4 + _SPLIT_IDS[split], index])
            height, width = (int(side) for side in rng.integers(96, 129, 2))
            image, instances = render_instances(rng, height, width)
            file_name = f"mini_{split}_{index:05d}.png"
            Image.fromarray(image).save(image_dir / file_name)
            images.append({"id": index + 1, "file_name": file_name, "height": height,
                           "width": width})
            annotations += _coco_instances(instances, index + 1, len(annotations) + 1)
        coco = {"images": images, "annotations": annotations, "categories": categories}
        (destination / "annotations" / f"instances_{split}2017.json").write_text(
            json.dumps(coco), encoding="utf-8")


def _write_segmentation(destination: Path) -> None:
    base = destination / "ADEChallengeData2016"
    for split, count in (("train", NUM_TRAIN), ("val", NUM_VAL)):
        folder = "training" if split == "train" else "validation"
        image_dir = base / "images" / folder
        annotation_dir = base / "annotations" / folder
        image_dir.mkdir(parents=True)
        annotation_dir.mkdir(parents=True)
        for index in range(count):
            rng = np.random.default_rng([_SEED, _SPLIT_IDS[split], index])
            height, width = (int(side) for side in rng.integers(80, 129, 2))
            image, annotation = render_scene(rng, height, width)
            stem = f"mini_{split}_{index:05d}"
            Image.fromarray(image).save(image_dir / f"{stem}.jpg", quality=95)
            Image.fromarray(annotation).save(annotation_dir / f"{stem}.png")


def _write_classification(destination: Path) -> None:
    for split, count in (("train", CLS_TRAIN_PER_CLASS), ("val", CLS_VAL_PER_CLASS)):
        for class_index, class_name in enumerate(MINI_CLASSES):
            class_dir = destination / split / class_name
            class_dir.mkdir(parents=True)
            for index in range(count):
                rng = np.random.default_rng([_SEED, 2 + _SPLIT_IDS[split], class_index, index])
                image = render_class_sample(rng, class_index)
                Image.fromarray(image).save(class_dir / f"{class_name}_{index:04d}.png")


def _ensure_generated(cache_dir: str | os.PathLike | None, version: str,
                      write: Callable[[Path], None]) -> Path:
    """Return ``cache/version``, generating it first if its marker is missing."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = cache / version
    marker = target / MARKER_NAME
    if marker.is_file():
        return target
    if target.exists():
        raise SegnestError(
            f"{target} exists but is not a complete {version} dataset (no {MARKER_NAME} "
            "file); delete that folder and run again to regenerate it"
        )
    cache.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{version}-", dir=cache))
    try:
        write(staging)
        (staging / MARKER_NAME).write_text(f"{version}\n", encoding="utf-8")
        try:
            os.rename(staging, target)
        except OSError:
            # Another process renamed its copy into place first; theirs is identical.
            if not marker.is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def ensure_mini_segmentation(cache_dir: str | os.PathLike | None = None) -> Path:
    """Generate the mini segmentation dataset once; return the folder that holds its
    ``ADEChallengeData2016`` (300 train / 60 val images, 80-128 px sides)."""
    return _ensure_generated(cache_dir, SEGMENTATION_VERSION, _write_segmentation)


def ensure_mini_classification(cache_dir: str | os.PathLike | None = None) -> Path:
    """Generate the mini classification dataset once; return the folder holding
    ``{train,val}/<class>/*.png`` (64x64, 100 train / 20 val per class)."""
    return _ensure_generated(cache_dir, CLASSIFICATION_VERSION, _write_classification)


def ensure_mini_detection(cache_dir: str | os.PathLike | None = None) -> Path:
    """Generate the mini detection/instance set once; return its root, in the official
    COCO layout (``annotations/instances_{train,val}2017.json``, ``{train,val}2017/``;
    240 train / 48 val PNG images of 96-128 px with 1-5 shapes each, RLE masks)."""
    return _ensure_generated(cache_dir, DETECTION_VERSION, _write_detection)


def build_mini_dataset(cache_dir: str | os.PathLike | None = None, split: str = "train",
                       transform: SampleTransform | None = None) -> ADE20K:
    """The mini segmentation dataset as an ``ADE20K`` with the mini classes and palette."""
    root = ensure_mini_segmentation(cache_dir)
    return ADE20K(root, split, transform, classes=MINI_CLASSES, palette=MINI_PALETTE)
