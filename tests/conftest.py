"""Shared fixtures: tiny datasets in the real on-disk layouts, tiny training settings."""

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


def write_imbalanced_dataset(root: Path, n_train: int = 8, n_val: int = 3, size: int = 48,
                             seed: int = 0) -> Path:
    """A 3-class folder dataset with a rare class: sky above ground, and a small 'rare'
    disc of about 1.2% of the pixels in each image, a little brighter than the ground."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("sky 0 0 200\nground 0 200 0\nrare 200 0 0\n")
    colours = np.array([[70, 90, 140], [80, 110, 70], [110, 130, 80]], np.uint8)
    for split, count in (("train", n_train), ("val", n_val)):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "masks" / split).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            mask = np.zeros((size, size), np.uint8)
            horizon = int(rng.integers(size // 3, 2 * size // 3))
            mask[horizon:] = 1
            radius = max(2, size // 16)
            cy, cx = (int(value) for value in rng.integers(radius, size - radius, 2))
            yy, xx = np.mgrid[:size, :size]
            mask[(yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2] = 2
            noise = rng.integers(0, 40, (size, size, 3))
            image = np.clip(colours[mask].astype(int) + noise, 0, 255).astype(np.uint8)
            Image.fromarray(image).save(root / "images" / split / f"img{i}.png")
            Image.fromarray(mask).save(root / "masks" / split / f"img{i}.png")
    return root


@pytest.fixture
def folder_dataset(tmp_path: Path) -> Path:
    return write_folder_dataset(tmp_path / "data")


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    """Tests never write into the user's ~/.cache/segnest (label censuses, mini data)."""
    import os

    previous = os.environ.get("SEGNEST_CACHE")
    os.environ["SEGNEST_CACHE"] = str(tmp_path_factory.mktemp("segnest-cache"))
    yield
    if previous is None:
        os.environ.pop("SEGNEST_CACHE", None)
    else:
        os.environ["SEGNEST_CACHE"] = previous


@pytest.fixture(autouse=True, scope="session")
def _private_weight_caches(tmp_path_factory):
    """Empty torch.hub and Hugging Face caches, offline: a test never sees the user's
    downloaded weights nor downloads any (tests that need cached weights make them)."""
    import os

    names = ("TORCH_HOME", "HF_HOME", "HF_HUB_CACHE", "HF_HUB_OFFLINE")
    previous = {name: os.environ.get(name) for name in names}
    os.environ.pop("HF_HUB_CACHE", None)
    os.environ["TORCH_HOME"] = str(tmp_path_factory.mktemp("torch-home"))
    os.environ["HF_HOME"] = str(tmp_path_factory.mktemp("hf-home"))
    os.environ["HF_HUB_OFFLINE"] = "1"
    yield
    for name, value in previous.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Tiny models gain nothing from intra-op threads, and multi-process tests would
    oversubscribe the cores; one thread keeps the suite fast and steady."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# The smallest DeepLabV3-ResNeSt that trains: flags for the CLI, fields for TrainConfig.
TINY_MODEL = dict(backbone="resnest14", stage_width=8, stem_width=8, head_channels=16)
TINY_FLAGS = ["--backbone", "resnest14", "--stage-width", "8", "--stem-width", "8",
              "--head-channels", "16", "--batch-size", "2", "--base-size", "48",
              "--crop-size", "32", "--workers", "0", "--lr", "0.01", "--device", "cpu",
              "--seed", "0", "--keep-checkpoints", "100"]


def _tiny_train_config(data_root, work_dir, **overrides):
    from segnest.tasks.segmentation.config import TrainConfig

    values = dict(dataset="folder", data_root=str(data_root), work_dir=str(work_dir),
                  iters=6, batch_size=2, base_size=48, crop_size=32, workers=0,
                  val_interval=3, checkpoint_interval=3, keep_checkpoints=100, panels=2,
                  log_interval=1, device="cpu", lr=0.01, **TINY_MODEL)
    values.update(overrides)
    return TrainConfig(**values)


@pytest.fixture
def tiny_train_config():
    """``tiny_train_config(data_root, work_dir, **overrides)``: a TrainConfig of a tiny
    model on a folder dataset, 6 iterations, validating and keeping a checkpoint every 3."""
    return _tiny_train_config


@pytest.fixture
def tiny_flags() -> list[str]:
    return list(TINY_FLAGS)


def save_tiny_checkpoint(path: Path, model_kwargs: dict, palette, classes=None,
                         sharpen_head: bool = False) -> Path:
    """A segnest checkpoint of a seeded, untrained ``deeplabv3_resnest14`` with
    ``model_kwargs`` at ``path``; ``sharpen_head`` scales the classifier so that the
    untrained model predicts several classes instead of one everywhere."""
    import torch

    from segnest.models import create_model

    torch.manual_seed(0)
    model = create_model("deeplabv3_resnest14", **model_kwargs)
    if sharpen_head:
        with torch.no_grad():
            model.head[3].weight.mul_(20)
            model.head[3].bias.zero_()
    num_classes = model_kwargs["num_classes"]
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({
        "model": model.state_dict(),
        "model_name": "deeplabv3_resnest14",
        "model_kwargs": model_kwargs,
        "dataset": "folder",
        "classes": list(classes or [f"class{i}" for i in range(num_classes)]),
        "palette": palette.tolist(),
        "config": {"base_size": 48, "crop_size": 40, "data_root": None},
        "iteration": 1,
    }, path)
    return path


@pytest.fixture(autouse=True)
def measured_hardware(monkeypatch):
    """Hardware decisions without timing this machine's CPU (no test depends on it): the
    dilated convolutions measure faster in float32, as on the CPU that chose it first.
    Tests of the decisions themselves patch the measurement again."""
    from segnest.models import pixelwise
    from segnest.runtime import tuning

    tuning.hardware_decisions.cache_clear()
    monkeypatch.setattr(tuning, "measure_dilated",
                        lambda dilation, dtype, training=False: (0.001, 0.002))
    # The segmentation loss: upsampling in bands measures faster, as where it was chosen.
    monkeypatch.setattr(pixelwise, "_time_loss_paths", lambda *args: (0.001, 0.002))
    monkeypatch.setattr(tuning, "cpu_model", lambda: "Test CPU")
    monkeypatch.setattr(tuning, "busy_cpu", lambda: None)  # whatever else the machine runs
    yield
    tuning.hardware_decisions.cache_clear()


CLASSIFICATION_CLASSES = ("blue", "green", "red")


def write_class_folder(root: Path, counts: dict[str, int] | None = None, size: int = 32,
                       seed: int = 0) -> Path:
    """An image-classification folder in pretraining's layout, ``root/<split>/<class>/``,
    of ``size`` px images tinted by class (blue, green, red); ``counts``: images per class
    per split (default 8 train, 4 val)."""
    rng = np.random.default_rng(seed)
    for split, count in (counts or {"train": 8, "val": 4}).items():
        for index, name in enumerate(CLASSIFICATION_CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for number in range(count):
                pixels = rng.integers(0, 120, (size, size, 3))
                pixels[..., 2 - index] += 120
                Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{number}.png")
    return root
