"""Evaluating a detection checkpoint: metrics.json's bbox_AP/segm_AP equal pycocotools run
on the --save-pred JSON and the ground truth."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("pycocotools")
from test_coco import reference_metrics  # noqa: E402

from segnest.data.coco import coco_source  # noqa: E402
from segnest.data.mini import ensure_mini_detection  # noqa: E402
from segnest.errors import SegnestError  # noqa: E402
from segnest.models import create_model  # noqa: E402
from segnest.tasks.detection import evaluate as detection_eval  # noqa: E402
from segnest.tasks.detection.evaluate import run_detection_eval  # noqa: E402

TINY = dict(stage_width=16, fpn_channels=32, head_channels=32, box_fc_channels=64,
            roi_batch_size_per_image=64, rpn_pre_nms_top_n_test=200,
            rpn_post_nms_top_n_test=100, train_min_size=(64, 96), test_min_size=96,
            max_size=128)


@pytest.fixture(scope="module")
def mini_root(tmp_path_factory) -> Path:
    return ensure_mini_detection(tmp_path_factory.mktemp("cache"))


class _Transform:
    paste_masks = True


class NoisyOracle(nn.Module):
    """Answers each validation image with its ground truth, jittered, relabelled now and
    then, with random scores, and masks as low-resolution maps of its boxes."""

    has_masks = True

    def __init__(self, annotation_file: Path) -> None:
        super().__init__()
        self.transform = _Transform()
        data = json.loads(annotation_file.read_text())
        ids = sorted(c["id"] for c in data["categories"])
        self.by_size: dict[tuple[int, int], list] = {}
        self.rng = np.random.default_rng(0)
        for image in data["images"]:
            boxes = [(a["bbox"], ids.index(a["category_id"]) + 1) for a in data["annotations"]
                     if a["image_id"] == image["id"]]
            self.by_size.setdefault((image["height"], image["width"]), []).append(boxes)
        self.count = {key: 0 for key in self.by_size}

    def forward(self, images):
        size = tuple(images[0].shape[-2:])
        truth = self.by_size[size][self.count[size] % len(self.by_size[size])]
        self.count[size] += 1
        boxes, labels = [], []
        for (x, y, w, h), label in truth:
            jitter = self.rng.normal(0, 0.1, 4) * [w, h, w, h]
            boxes.append([x + jitter[0], y + jitter[1], x + w + jitter[2], y + h + jitter[3]])
            labels.append(label if self.rng.random() > 0.15 else int(self.rng.integers(1, 5)))
        count = len(boxes)
        result = {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                  "labels": torch.tensor(labels, dtype=torch.int64),
                  "scores": torch.tensor(self.rng.uniform(0.1, 1, count), dtype=torch.float32)}
        probabilities = torch.zeros(count, 1, 28, 28)
        probabilities[:, :, 3:25, 3:25] = 0.9
        key = "masks" if self.transform.paste_masks else "mask_probs"
        result[key] = probabilities
        return [result]


def checkpoint_for(model: nn.Module, name: str, kwargs: dict, mini_root: Path) -> dict:
    source = coco_source(mini_root, "val")
    return {"model": model.state_dict(), "model_name": name, "model_kwargs": kwargs,
            "task": "detection", "category_ids": [1, 2, 3, 4], "iteration": 7,
            "val_annotations": str(source.annotations), "val_images": str(source.images)}


def saved_tiny_detector(mini_root: Path, path: Path) -> dict:
    """A seeded, untrained tiny Mask R-CNN checkpoint with class names, saved at ``path``."""
    from segnest.runtime.checkpoint import save_checkpoint

    torch.manual_seed(0)
    model = create_model("mask_rcnn_resnest14", num_classes=4, **TINY)
    checkpoint = checkpoint_for(model, "mask_rcnn_resnest14", {"num_classes": 4, **TINY},
                                mini_root)
    checkpoint["classes"] = ["circle", "square", "triangle", "cross"]
    save_checkpoint(checkpoint, path)
    return checkpoint


def test_metrics_json_equals_pycocotools_on_the_saved_predictions(mini_root, tmp_path,
                                                                  monkeypatch):
    annotations = coco_source(mini_root, "val").annotations
    monkeypatch.setattr(detection_eval, "model_from_checkpoint",
                        lambda *args, **kwargs: NoisyOracle(annotations))
    checkpoint = checkpoint_for(nn.Linear(1, 1), "mask_rcnn_resnest14", {}, mini_root)
    results = tmp_path / "results.json"
    run_detection_eval(checkpoint, str(tmp_path / "best.pt"), str(tmp_path / "eval"),
                       str(results), device="cpu")
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    for iou_type in ("bbox", "segm"):
        reference = reference_metrics(annotations, results, iou_type)
        assert 10 < reference["AP"] < 90
        assert metrics[f"{iou_type}_AP"] == pytest.approx(reference["AP"], abs=1e-3)
        assert metrics[iou_type]["AP75"] == pytest.approx(reference["AP75"], abs=1e-3)
    assert "| circle |" in (tmp_path / "eval" / "metrics.md").read_text()


def test_a_real_checkpoint_evaluates_end_to_end(mini_root, tmp_path):
    torch.manual_seed(0)
    model = create_model("mask_rcnn_resnest14", num_classes=4, **TINY)
    checkpoint = checkpoint_for(model, "mask_rcnn_resnest14", {"num_classes": 4, **TINY},
                                mini_root)
    metrics = run_detection_eval(checkpoint, str(tmp_path / "best.pt"), str(tmp_path / "e"),
                                 str(tmp_path / "r.json"), device="cpu", samples=3)
    written = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert written["bbox_AP"] == metrics["bbox_AP"] and "segm_AP" in written
    assert written["images"] == 3
    entries = json.loads((tmp_path / "r.json").read_text())
    assert {e["image_id"] for e in entries} <= {1, 2, 3}
    assert all("segmentation" in e and e["category_id"] in (1, 2, 3, 4) for e in entries)


def test_a_segmentation_checkpoint_is_refused_with_the_reason(mini_root, tmp_path):
    model = create_model("deeplabv3_resnest14", num_classes=4, stage_width=16)
    checkpoint = checkpoint_for(model, "deeplabv3_resnest14",
                                {"num_classes": 4, "stage_width": 16}, mini_root)
    checkpoint["task"] = "segmentation"
    with pytest.raises(SegnestError, match="not a detection model"):
        run_detection_eval(checkpoint, "seg.pt", str(tmp_path), None, device="cpu")


def test_load_model_of_a_detection_checkpoint_predicts_and_draws(mini_root, tmp_path):
    import segnest

    checkpoint = saved_tiny_detector(mini_root, tmp_path / "best.pt")
    predictor = segnest.load_model(tmp_path / "best.pt", device="cpu", score_threshold=0.0)
    photo = coco_source(mini_root, "val").images / "mini_val_00000.png"
    detections = predictor(photo)
    assert len(detections) > 0 and detections.masks is not None
    assert set(detections.class_names) <= set(checkpoint["classes"])
    assert (detections.scores[:-1] >= detections.scores[1:]).all()
    first = detections.mask(0)
    assert first.shape == (detections.height, detections.width)
    assert detections.to_json()["detections"][0]["class"] == detections.class_names[0]
    drawn = predictor.draw(predictor.read(photo), detections)
    assert drawn.shape == (detections.height, detections.width, 3)
    with pytest.raises(SegnestError, match="score_threshold"):
        segnest.load_model(tmp_path / "best.pt", flip=True)


def test_an_unreadable_image_stops_the_evaluation_or_is_left_out_of_it(mini_root, tmp_path,
                                                                      monkeypatch):
    import shutil

    root = Path(shutil.copytree(mini_root, tmp_path / "coco"))
    source = coco_source(root, "val")
    data = json.loads(source.annotations.read_text())
    broken = min(data["images"], key=lambda image: image["id"])
    (source.images / broken["file_name"]).write_bytes(b"\x89PNG not really")
    monkeypatch.setattr(detection_eval, "model_from_checkpoint",
                        lambda *args, **kwargs: NoisyOracle(source.annotations))
    checkpoint = checkpoint_for(nn.Linear(1, 1), "mask_rcnn_resnest14", {}, root)
    with pytest.raises(SegnestError, match=f"{broken['file_name']}.*--skip-bad-samples"):
        run_detection_eval(checkpoint, "best.pt", str(tmp_path / "stop"), None, device="cpu",
                           data_root=str(root))
    run_detection_eval(checkpoint, "best.pt", str(tmp_path / "skip"), str(tmp_path / "r.json"),
                       device="cpu", data_root=str(root), skip_bad_samples=True)
    written = json.loads((tmp_path / "skip" / "metrics.json").read_text())
    assert written["skipped_samples"] == 1 and written["images"] == len(data["images"]) - 1
    entries = json.loads((tmp_path / "r.json").read_text())
    assert entries and broken["id"] not in {entry["image_id"] for entry in entries}


def test_segnest_eval_and_predict_dispatch_a_detection_checkpoint(mini_root, tmp_path):
    from segnest.inference.config import EvalConfig, PredictConfig
    from segnest.tasks.dispatch import run_eval, run_predict

    path = tmp_path / "best.pt"
    saved_tiny_detector(mini_root, path)
    metrics = run_eval(EvalConfig(checkpoint=str(path), out=str(tmp_path / "e"), device="cpu",
                                  samples=2))
    assert "bbox_AP" in metrics and (tmp_path / "e" / "metrics.json").is_file()
    with pytest.raises(SegnestError, match="^--flip does not apply to .* a detection checkpoint"):
        run_eval(EvalConfig(checkpoint=str(path), flip=True))
    photo = coco_source(mini_root, "val").images / "mini_val_00000.png"
    written = run_predict(PredictConfig(inputs=[str(photo)], checkpoint=str(path),
                                        out=str(tmp_path / "p"), device="cpu"))
    assert [p.name for p in written] == ["mini_val_00000.json"]
    assert "detections" in json.loads(written[0].read_text())
    assert (tmp_path / "p" / "mini_val_00000.jpg").is_file()
