"""Segmentation transforms: output contract, padding, cat_max_ratio and reproducibility."""

import os
import random

import numpy as np
import torch

from segnest.data.transforms import SegEvalTransform, SegTrainTransform, seed_worker


def _sample(height=40, width=60, seed=0):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    mask = rng.integers(0, 5, (height, width)).astype(np.int64)
    return image, mask


def test_train_output_has_crop_size_and_dtypes():
    image, mask = _sample()
    transform = SegTrainTransform(base_size=64, crop_size=(48, 32))
    image_tensor, mask_tensor = transform(image=image, mask=mask, index=3)
    assert image_tensor.shape == (3, 48, 32) and image_tensor.dtype == torch.float32
    assert mask_tensor.shape == (48, 32) and mask_tensor.dtype == torch.int64


def test_padding_fills_the_mask_with_ignore():
    image, mask = _sample(20, 20)
    # The long side becomes 16 px at most, so a 32 px crop needs padding on both axes.
    transform = SegTrainTransform(base_size=16, crop_size=32, scale_range=(0.5, 1.0),
                                  hflip=0.0, photometric=False)
    _, mask_tensor = transform(image=image, mask=mask, index=0)
    assert (mask_tensor[16:, :] == 255).all() and (mask_tensor[:, 16:] == 255).all()
    assert (mask_tensor[:8, :8] < 5).all()


def test_same_seed_epoch_and_index_give_identical_samples():
    image, mask = _sample()
    first = SegTrainTransform(base_size=64, crop_size=32, seed=7)
    second = SegTrainTransform(base_size=64, crop_size=32, seed=7)
    first.set_epoch(2)
    second.set_epoch(2)
    second(image=image, mask=mask, index=11)  # other draws in between must not matter
    a = first(image=image, mask=mask, index=5)
    b = second(image=image, mask=mask, index=5)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_a_new_epoch_or_index_gives_a_different_sample():
    image, mask = _sample()
    transform = SegTrainTransform(base_size=64, crop_size=32, seed=7)
    reference = transform(image=image, mask=mask, index=5)[0]
    assert not torch.equal(reference, transform(image=image, mask=mask, index=6)[0])
    transform.set_epoch(1)
    assert not torch.equal(reference, transform(image=image, mask=mask, index=5)[0])


def _dominance(mask_tensor):
    labels = mask_tensor[mask_tensor != 255]
    return torch.bincount(labels).max().item() / labels.numel()


def test_cat_max_ratio_avoids_crops_dominated_by_one_class():
    # Class 1 fills a 32x32 corner of a 64x64 mask of class 0: about 23% of the random
    # 24x24 crops hold both classes below 75% each, and 93% of 10-crop retries find one.
    image = np.zeros((64, 64, 3), np.uint8)
    mask = np.zeros((64, 64), np.int64)
    mask[:32, :32] = 1
    common = dict(base_size=64, crop_size=24, scale_range=(1.0, 1.0), hflip=0.0,
                  photometric=False)
    plain = SegTrainTransform(**common)
    balanced = SegTrainTransform(cat_max_ratio=0.75, **common)
    plain_ok = sum(_dominance(plain(image=image, mask=mask, index=i)[1]) < 0.75 for i in range(40))
    balanced_ok = sum(
        _dominance(balanced(image=image, mask=mask, index=i)[1]) < 0.75 for i in range(40)
    )
    assert plain_ok <= 18
    assert balanced_ok >= 30


def test_cat_max_ratio_still_crops_when_no_crop_can_satisfy_it():
    transform = SegTrainTransform(base_size=32, crop_size=16, scale_range=(1.0, 1.0),
                                  cat_max_ratio=0.5)
    _, mask_tensor = transform(image=np.zeros((32, 32, 3), np.uint8),
                               mask=np.zeros((32, 32), np.int64), index=0)
    assert mask_tensor.shape == (16, 16) and (mask_tensor == 0).all()


def test_eval_transform_keeps_size_and_only_normalizes():
    image, mask = _sample(21, 33)
    image_tensor, mask_tensor = SegEvalTransform()(image=image, mask=mask, index=0)
    assert image_tensor.shape == (3, 21, 33) and mask_tensor.shape == (21, 33)
    assert torch.equal(mask_tensor, torch.from_numpy(mask))
    assert image_tensor[1, 2, 3].item() == np.float32((image[2, 3, 1] / 255 - 0.456) / 0.224)


def test_seed_worker_seeds_numpy_and_random_from_torch():
    torch.manual_seed(123)
    seed_worker(0)
    first = (np.random.rand(), random.random())
    torch.manual_seed(123)
    seed_worker(0)
    assert (np.random.rand(), random.random()) == first
    assert os.environ.get("NO_ALBUMENTATIONS_UPDATE") == "1"
