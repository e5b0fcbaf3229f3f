"""Classification folders and transforms for backbone pretraining."""

import numpy as np
import pytest
import torch
from PIL import Image

from segnest.data.classification import build_classification_dataset, build_transforms
from segnest.errors import SegnestError


def _make_tree(root, corrupt=False):
    for name in ("cat", "dog"):
        folder = root / "train" / name
        folder.mkdir(parents=True)
        pixels = np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)
        Image.fromarray(pixels).convert("L").save(folder / "a.jpg")
    if corrupt:
        (root / "train" / "dog" / "a.jpg").write_bytes(b"not a jpeg")


def test_folder_tree_loads_as_rgb_with_transforms(tmp_path):
    _make_tree(tmp_path)
    _, eval_transform = build_transforms(32, 0.875, "none", (0.08, 1.0))
    dataset = build_classification_dataset(tmp_path, "train", eval_transform)
    image, label = dataset[1]
    assert dataset.classes == ["cat", "dog"] and label == 1
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32


def test_eval_transform_resizes_the_short_side_to_crop_over_crop_pct_then_centre_crops():
    _, eval_transform = build_transforms(32, 0.5, "none", (0.08, 1.0))
    # A 64 x 128 image: short side 64 = 32 / 0.5 already, so the centre 32 x 32 crop is
    # columns 48..80 of the original, whose left half is black and right half white.
    pixels = np.zeros((64, 128, 3), np.uint8)
    pixels[:, 64:] = 255
    image = eval_transform(Image.fromarray(pixels))
    assert image.shape == (3, 32, 32)
    assert (image[:, :, :16] < 0).all() and (image[:, :, 16:] > 0).all()


@pytest.mark.parametrize("policy", ["autoaugment", "randaugment", "none"])
def test_train_transform_gives_a_square_crop(tmp_path, policy):
    _make_tree(tmp_path)
    train_transform, _ = build_transforms(24, 0.875, policy, (0.5, 1.0))
    dataset = build_classification_dataset(tmp_path, "train", train_transform)
    assert dataset[0][0].shape == (3, 24, 24)


def test_unknown_auto_augment_names_the_flag():
    with pytest.raises(SegnestError, match="--auto-augment"):
        build_transforms(32, 0.875, "trivial", (0.08, 1.0))


def test_missing_split_folder_names_path_and_layout(tmp_path):
    with pytest.raises(SegnestError, match=r"val.*train/<class>"):
        build_classification_dataset(tmp_path, "val")


def test_split_without_images_is_an_error(tmp_path):
    (tmp_path / "train" / "cat").mkdir(parents=True)
    with pytest.raises(SegnestError, match="no images"):
        build_classification_dataset(tmp_path, "train")


def test_corrupt_image_names_the_file(tmp_path):
    _make_tree(tmp_path, corrupt=True)
    dataset = build_classification_dataset(tmp_path, "train")
    with pytest.raises(SegnestError, match=r"dog.a\.jpg"):
        dataset[1]
