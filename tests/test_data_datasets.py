"""Dataset adapters: layouts, label mapping, image modes and the errors for bad input."""

import numpy as np
import pytest
import torch
from PIL import Image

from segnest.data import (
    ADE20K,
    DATASET_NAMES,
    LABEL_TO_TRAIN,
    TRAIN_TO_LABEL,
    Cityscapes,
    FolderDataset,
    build_dataset,
)
from segnest.data.transforms import MEAN, STD
from segnest.errors import SegnestError


def _save(path, array, **kwargs):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **kwargs)


def _rgb(height=32, width=48, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _make_ade(root, annotations):
    """ADEChallengeData2016 with one validation image per annotation array."""
    base = root / "ADEChallengeData2016"
    for index, annotation in enumerate(annotations):
        stem = f"ADE_val_{index + 1:08d}"
        height, width = annotation.shape
        _save(base / "images" / "validation" / f"{stem}.jpg", _rgb(height, width, index))
        _save(base / "annotations" / "validation" / f"{stem}.png", annotation.astype(np.uint8))
    (base / "images" / "training").mkdir(parents=True, exist_ok=True)
    (base / "annotations" / "training").mkdir(parents=True, exist_ok=True)
    return base


def test_ade20k_maps_zero_to_ignore_and_shifts_classes(tmp_path):
    annotation = np.array([[0, 1, 2], [150, 75, 0]], dtype=np.uint8).repeat(16, 0).repeat(16, 1)
    _make_ade(tmp_path, [annotation])
    dataset = ADE20K(tmp_path, "val")
    image, mask = dataset.load(0)
    assert dataset.num_classes == 150 and dataset.palette.shape == (150, 3)
    assert dataset.classes[:3] == ["wall", "building", "sky"]
    assert image.dtype == np.uint8 and image.shape == (32, 48, 3)
    expected = np.array([[255, 0, 1], [149, 74, 255]]).repeat(16, 0).repeat(16, 1)
    np.testing.assert_array_equal(mask, expected)
    assert dataset.name(0) == "ADE_val_00000001"


def test_ade20k_accepts_the_challenge_folder_itself_as_root(tmp_path):
    base = _make_ade(tmp_path, [np.ones((8, 8))])
    assert len(ADE20K(base, "val")) == 1


def test_ade20k_to_label_file_inverts_the_mapping():
    train_ids = np.array([[0, 149, 255], [7, 255, 1]])
    np.testing.assert_array_equal(
        ADE20K.to_label_file(train_ids), np.array([[1, 150, 0], [8, 0, 2]], dtype=np.uint8)
    )


def test_getitem_without_transform_normalizes_with_imagenet_statistics(tmp_path):
    _make_ade(tmp_path, [np.ones((8, 8))])
    sample = ADE20K(tmp_path, "val")[0]
    image, _ = ADE20K(tmp_path, "val").load(0)
    assert sample["image"].dtype == torch.float32 and sample["image"].shape == (3, 8, 8)
    assert sample["mask"].dtype == torch.int64 and sample["mask"].shape == (8, 8)
    expected_red = (image[0, 0, 0] / 255.0 - MEAN[0]) / STD[0]
    assert sample["image"][0, 0, 0].item() == pytest.approx(expected_red, abs=1e-5)
    assert sample["name"] == "ADE_val_00000001" and sample["index"] == 0


def _make_cityscapes(root, label_ids, train_ids=None, city="frankfurt"):
    prefix = f"{city}_000000_000294"
    height, width = label_ids.shape
    _save(root / "leftImg8bit" / "val" / city / f"{prefix}_leftImg8bit.png", _rgb(height, width))
    gt = root / "gtFine" / "val" / city
    _save(gt / f"{prefix}_gtFine_labelIds.png", label_ids.astype(np.uint8))
    if train_ids is not None:
        _save(gt / f"{prefix}_gtFine_labelTrainIds.png", train_ids.astype(np.uint8))


def test_cityscapes_maps_label_ids_to_train_ids(tmp_path):
    label_ids = np.array([[7, 26, 0], [33, 4, 24]]).repeat(8, 0).repeat(8, 1)
    _make_cityscapes(tmp_path, label_ids)
    dataset = Cityscapes(tmp_path, "val")
    _, mask = dataset.load(0)
    np.testing.assert_array_equal(
        mask, np.array([[0, 13, 255], [18, 255, 11]]).repeat(8, 0).repeat(8, 1)
    )
    assert dataset.name(0) == "frankfurt/frankfurt_000000_000294"
    assert dataset.num_classes == 19 and tuple(dataset.palette[0]) == (128, 64, 128)


def test_cityscapes_prefers_label_train_ids_when_present(tmp_path):
    train_ids = np.array([[5, 255], [18, 2]], dtype=np.uint8).repeat(8, 0).repeat(8, 1)
    _make_cityscapes(tmp_path, np.full((16, 16), 7), train_ids=train_ids)
    _, mask = Cityscapes(tmp_path, "val").load(0)
    np.testing.assert_array_equal(mask, train_ids)


def test_cityscapes_lookup_tables_invert_each_other_for_all_19_classes():
    all_ids = np.arange(19)
    np.testing.assert_array_equal(LABEL_TO_TRAIN[TRAIN_TO_LABEL], all_ids)
    np.testing.assert_array_equal(LABEL_TO_TRAIN[Cityscapes.to_label_file(all_ids)], all_ids)
    assert Cityscapes.to_label_file(np.array([255]))[0] == 0
    assert (LABEL_TO_TRAIN != 255).sum() == 19


def test_cityscapes_test_split_without_masks_loads_all_ignore(tmp_path):
    _save(tmp_path / "leftImg8bit" / "test" / "berlin" / "berlin_000000_000019_leftImg8bit.png",
          _rgb(16, 16))
    _, mask = Cityscapes(tmp_path, "test").load(0)
    assert (mask == 255).all()


def _make_folder(root, classes_text, masks):
    (root / "classes.txt").parent.mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text(classes_text)
    for index, mask in enumerate(masks):
        _save(root / "images" / "train" / f"img{index}.png", _rgb(*mask.shape, seed=index))
        _save(root / "masks" / "train" / f"img{index}.png", mask.astype(np.uint8))


def test_folder_dataset_reads_classes_palette_and_train_ids(tmp_path):
    mask = np.array([[0, 1], [2, 255]]).repeat(8, 0).repeat(8, 1)
    _make_folder(tmp_path, "background 90 90 90\ntraffic light 250 170 30\n\ncar 0 0 142\n",
                 [mask])
    dataset = build_dataset("folder", tmp_path, "train")
    assert isinstance(dataset, FolderDataset)
    assert dataset.classes == ["background", "traffic light", "car"]
    np.testing.assert_array_equal(dataset.palette, [[90, 90, 90], [250, 170, 30], [0, 0, 142]])
    np.testing.assert_array_equal(dataset.load(0)[1], mask)


def test_folder_dataset_honours_a_black_class_but_warns_that_ignore_is_drawn_black(tmp_path):
    _make_folder(tmp_path, "background 0 0 0\nroad 128 64 128\n", [np.zeros((8, 8))])
    with pytest.warns(UserWarning, match="'background'.*0 0 0.*ignored pixels"):
        dataset = FolderDataset(tmp_path)
    np.testing.assert_array_equal(dataset.palette[0], [0, 0, 0])


def test_folder_dataset_generates_a_palette_when_none_given(tmp_path):
    _make_folder(tmp_path, "a\nb\nc\n", [np.zeros((8, 8))])
    palette = FolderDataset(tmp_path).palette
    assert palette.shape == (3, 3) and len({tuple(color) for color in palette}) == 3


def test_folder_dataset_without_classes_file_is_an_error(tmp_path):
    _make_folder(tmp_path, "a\n", [np.zeros((8, 8))])
    (tmp_path / "classes.txt").unlink()
    with pytest.raises(SegnestError, match="classes.txt"):
        FolderDataset(tmp_path)


def test_folder_dataset_needs_a_root():
    with pytest.raises(SegnestError, match="--data-root"):
        build_dataset("folder", None)


def test_unknown_dataset_name_lists_the_valid_ones():
    with pytest.raises(SegnestError) as error:
        build_dataset("pascal")
    assert all(name in str(error.value) for name in DATASET_NAMES)


def test_out_of_range_mask_values_name_the_file_and_values(tmp_path):
    _make_folder(tmp_path, "a\nb\n", [np.array([[0, 1], [7, 9]]).repeat(4, 0).repeat(4, 1)])
    dataset = FolderDataset(tmp_path)
    with pytest.raises(SegnestError, match=r"img0\.png.*7, 9"):
        dataset.load(0)


def test_size_mismatch_names_both_files_and_sizes(tmp_path):
    _make_folder(tmp_path, "a\n", [np.zeros((8, 8))])
    _save(tmp_path / "masks" / "train" / "img0.png", np.zeros((8, 6), np.uint8))
    with pytest.raises(SegnestError, match=r"images.*img0\.png is 8x8.*masks.*img0\.png is 6x8"):
        FolderDataset(tmp_path).load(0)


def test_truncated_jpeg_is_reported_by_name(tmp_path):
    base = _make_ade(tmp_path, [np.ones((32, 32))])
    image_path = base / "images" / "validation" / "ADE_val_00000001.jpg"
    image_path.write_bytes(image_path.read_bytes()[:200])
    dataset = ADE20K(tmp_path, "val")
    with pytest.raises(SegnestError, match="ADE_val_00000001.jpg"):
        dataset.load(0)


def test_missing_root_says_where_it_looked_and_points_to_the_readme(tmp_path):
    with pytest.raises(SegnestError, match="nowhere.*datasets/README.md"):
        ADE20K(tmp_path / "nowhere", "train")
    with pytest.raises(SegnestError, match="leftImg8bit.*datasets/README.md"):
        Cityscapes(tmp_path, "train")


def test_default_root_follows_segnest_data(tmp_path, monkeypatch):
    monkeypatch.setenv("SEGNEST_DATA", str(tmp_path))
    _make_ade(tmp_path / "ade20k", [np.ones((8, 8))])
    assert len(build_dataset("ade20k", None, "val")) == 1


def test_image_without_mask_is_named(tmp_path):
    base = _make_ade(tmp_path, [np.ones((8, 8))])
    _save(base / "images" / "validation" / "ADE_val_00000009.jpg", _rgb(8, 8))
    with pytest.raises(SegnestError, match="ADE_val_00000009.jpg"):
        ADE20K(tmp_path, "val")


def test_empty_split_is_an_error(tmp_path):
    _make_ade(tmp_path, [np.ones((8, 8))])
    with pytest.raises(SegnestError, match="no images"):
        ADE20K(tmp_path, "train")


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "I;16"])
def test_images_of_any_mode_load_as_rgb_and_16_bit_ones_keep_their_precision(tmp_path, mode):
    rgb = _rgb(16, 16)
    if mode == "I;16":
        grey = (np.arange(256, dtype=np.uint16).reshape(16, 16) * 257).astype(np.uint16)
        source = Image.fromarray(grey)
    else:
        source = Image.fromarray(rgb).convert(mode)
    _make_folder(tmp_path, "a\n", [np.zeros((16, 16))])
    source.save(tmp_path / "images" / "train" / "img0.png")
    image, _ = FolderDataset(tmp_path).load(0)
    assert image.shape == (16, 16, 3)
    assert image.dtype == (np.uint16 if mode == "I;16" else np.uint8)
    if mode == "I;16":
        np.testing.assert_array_equal(image[..., 1].ravel(), np.arange(256) * 257)
    if mode == "RGBA":
        np.testing.assert_array_equal(image, rgb)


def test_a_missing_folder_dataset_is_not_told_to_set_segnest_data(tmp_path):
    from segnest.data import build_dataset
    from segnest.errors import SegnestError

    with pytest.raises(SegnestError) as err:
        build_dataset("folder", str(tmp_path / "mine"), "train")
    assert "SEGNEST_DATA" not in str(err.value) and "--data-root" in str(err.value)
