"""The bundled procedural datasets: deterministic, complete, loadable, atomic."""

import hashlib

import numpy as np
import pytest

from segnest.data import ADE20K, build_dataset
from segnest.data.classification import build_classification_dataset
from segnest.data.mini import (
    MARKER_NAME,
    MINI_CLASSES,
    SEGMENTATION_VERSION,
    ensure_mini_classification,
    ensure_mini_segmentation,
)
from segnest.errors import SegnestError


def _tree_digest(folder):
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def mini_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    ensure_mini_segmentation(cache)
    return cache


def test_generation_is_byte_identical_across_runs(mini_cache, tmp_path):
    again = ensure_mini_segmentation(tmp_path)
    assert _tree_digest(again) == _tree_digest(mini_cache / SEGMENTATION_VERSION)


def test_mini_dataset_is_an_ade20k_with_all_classes_present(mini_cache):
    train = build_dataset("mini", mini_cache, "train")
    val = build_dataset("mini", mini_cache, "val")
    assert isinstance(train, ADE20K) and (len(train), len(val)) == (300, 60)
    assert train.classes == list(MINI_CLASSES) and train.palette.shape == (len(MINI_CLASSES), 3)
    counts = np.zeros(256, np.int64)
    sizes = set()
    for index in range(len(val)):
        image, mask = val.load(index)
        sizes.add(image.shape[:2])
        counts += np.bincount(mask.ravel(), minlength=256)
    assert (counts[: len(MINI_CLASSES)] > 0).all()
    assert counts[255] > 0 and counts[len(MINI_CLASSES):255].sum() == 0
    assert len(sizes) > 10 and all(80 <= side <= 128 for size in sizes for side in size)


def test_second_call_reuses_the_cache_without_rewriting(mini_cache):
    marker = mini_cache / SEGMENTATION_VERSION / MARKER_NAME
    before = marker.stat().st_mtime_ns
    assert ensure_mini_segmentation(mini_cache) == mini_cache / SEGMENTATION_VERSION
    assert marker.stat().st_mtime_ns == before
    assert not [p for p in mini_cache.iterdir() if p.name.startswith(".")]


def test_incomplete_cache_folder_is_reported_not_trusted(tmp_path):
    (tmp_path / SEGMENTATION_VERSION).mkdir()
    with pytest.raises(SegnestError, match="delete that folder"):
        ensure_mini_segmentation(tmp_path)


def test_mini_classification_has_every_class_in_both_splits(tmp_path):
    root = ensure_mini_classification(tmp_path)
    train = build_classification_dataset(root, "train")
    val = build_classification_dataset(root, "val")
    assert sorted(train.classes) == sorted(MINI_CLASSES)
    assert (len(train), len(val)) == (100 * len(MINI_CLASSES), 20 * len(MINI_CLASSES))
    image, _ = val[0]
    assert image.size == (64, 64) and image.mode == "RGB"
