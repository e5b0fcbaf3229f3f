"""Checkpoints written by segnest 0.1.0 (before the engine/tasks restructuring) keep
working: they evaluate to the numbers they gave then, load as predictors and resume.

tests/data/release-0.1.0-segmentation.pt: ``segnest train`` of the tiny model
(TINY_FLAGS) on ``write_folder_dataset`` for 2 iterations, seed 0 (its ``last.pt``).
tests/data/release-0.1.0-classification.pt: ``segnest pretrain`` of resnest14 (stage and
stem width 8) on :func:`class_folder` for 1 epoch of 3 iterations, seed 0.
"""

import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import write_folder_dataset
from PIL import Image

DATA = Path(__file__).parent / "data"
SEGMENTATION = DATA / "release-0.1.0-segmentation.pt"
CLASSIFICATION = DATA / "release-0.1.0-classification.pt"


def class_folder(root: Path) -> Path:
    """The image folder the classification checkpoint was trained on."""
    rng = np.random.default_rng(0)
    for split, count in (("train", 8), ("val", 4)):
        for index, name in enumerate(("red", "green", "blue")):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for number in range(count):
                pixels = rng.integers(0, 120, (32, 32, 3))
                pixels[..., 2 - index] += 120
                Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{number}.png")
    return root


def test_release_segmentation_checkpoint_evaluates_to_its_release_numbers(tmp_path):
    from segnest.inference.config import EvalConfig
    from segnest.inference.evaluate import run_eval

    data = write_folder_dataset(tmp_path / "data")
    results = run_eval(EvalConfig(checkpoint=str(SEGMENTATION), data_root=str(data),
                                  device="cpu", workers=0, out=str(tmp_path / "eval")))
    assert results["mIoU"] == pytest.approx(15.063989667723376, abs=1e-4)
    assert results["pixAcc"] == pytest.approx(45.19196900317013, abs=1e-4)


def test_release_segmentation_checkpoint_loads_as_a_predictor(tmp_path):
    import segnest

    data = write_folder_dataset(tmp_path / "data")
    predictor = segnest.load_model(str(SEGMENTATION), device="cpu")
    labels = np.asarray(predictor(str(data / "images" / "val" / "img0.png")))
    assert labels.shape == Image.open(data / "images" / "val" / "img0.png").size[::-1]
    assert set(np.unique(labels)) <= {0, 1, 2}


def test_release_segmentation_checkpoint_resumes_with_its_best_miou(tmp_path,
                                                                    tiny_train_config):
    from segnest.tasks.segmentation.task import run_train

    data = write_folder_dataset(tmp_path / "data")
    work_dir = tmp_path / "run"
    work_dir.mkdir()
    shutil.copy(SEGMENTATION, work_dir / "last.pt")
    result = run_train(tiny_train_config(data, work_dir, iters=4, val_interval=2,
                                         checkpoint_interval=2, seed=0, tensorboard=False,
                                         resume="auto"))
    assert result["iteration"] == 4 and not result["interrupted"]
    assert result["best_miou"] >= 15.063989667723376 - 1e-4


def test_release_classification_checkpoint_resumes_with_its_best_top1(tmp_path):
    from segnest.tasks.classification.config import PretrainConfig
    from segnest.tasks.classification.task import run_pretrain

    data = class_folder(tmp_path / "images")
    work_dir = tmp_path / "run"
    work_dir.mkdir()
    shutil.copy(CLASSIFICATION, work_dir / "last.pt")
    result = run_pretrain(PretrainConfig(
        dataset="imagenet", data_root=str(data), backbone="resnest14", stage_width=8, stem_width=8,
        crop_size=32, crop_pct=1.0, batch_size=8, epochs=2, warmup_epochs=0.5, workers=0,
        tensorboard=False, work_dir=str(work_dir), device="cpu", seed=0, resume="auto"))
    assert result["iterations"] == 6 and not result["interrupted"]
    assert result["best_top1"] >= 100 / 3 - 1e-4
