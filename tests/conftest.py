"""Shared fixtures: tiny datasets in the real on-disk layouts, generated per test session."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def write_folder_dataset(root: Path, n_train: int = 8, n_val: int = 3, size: int = 40,
                         seed: int = 0) -> Path:
    """A 3-class folder dataset: a left/right split plus a square, easy to learn."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("left 200 0 0\nright 0 200 0\nsquare 0 0 200\n")
    for split, count in (("train", n_train), ("val", n_val)):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "masks" / split).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            h, w = size + int(rng.integers(0, 9)), size + int(rng.integers(0, 9))
            mask = np.zeros((h, w), np.uint8)
            mask[:, w // 2:] = 1
            top, left = int(rng.integers(0, h - 12)), int(rng.integers(0, w - 12))
            mask[top:top + 10, left:left + 10] = 2
            colours = np.array([[90, 60, 60], [60, 90, 60], [60, 60, 160]], np.uint8)
            image = colours[mask] + rng.integers(0, 30, (h, w, 3)).astype(np.uint8)
            Image.fromarray(image).save(root / "images" / split / f"img{i}.png")
            Image.fromarray(mask).save(root / "masks" / split / f"img{i}.png")
    return root


@pytest.fixture
def folder_dataset(tmp_path: Path) -> Path:
    return write_folder_dataset(tmp_path / "data")


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Tiny models gain nothing from intra-op threads, and multi-process tests would
    oversubscribe the cores; one thread keeps the suite fast and steady."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
