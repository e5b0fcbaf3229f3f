"""``segnest export`` of detection checkpoints: ONNX with any image size, checked against
the PyTorch predictor before the file appears; formats that cannot hold a detector say so
in one line and write nothing."""


import numpy as np
import pytest
import torch

pytest.importorskip("pycocotools")
onnxruntime = pytest.importorskip("onnxruntime")

import segnest  # noqa: E402
from segnest.cli import main  # noqa: E402
from segnest.errors import SegnestError  # noqa: E402
from segnest.inference import detection_export  # noqa: E402
from segnest.inference.backends import read_metadata  # noqa: E402
from segnest.inference.coco import encode_masks  # noqa: E402
from segnest.inference.config import ExportConfig  # noqa: E402
from segnest.inference.detection import DetectionPredictor  # noqa: E402
from segnest.models import create_model  # noqa: E402
from segnest.runtime.checkpoint import save_checkpoint  # noqa: E402
from segnest.tasks.dispatch import run_export  # noqa: E402

KWARGS = dict(num_classes=3, stage_width=16, fpn_channels=16, head_channels=16,
              box_fc_channels=32, test_min_size=64, max_size=96)


def detection_checkpoint(tmp_path, architecture: str):
    torch.manual_seed(0)
    name = f"{architecture}_resnest14"
    model = create_model(name, **KWARGS)
    path = tmp_path / "best.pt"
    save_checkpoint({"model": model.state_dict(), "model_name": name, "model_kwargs": KWARGS,
                     "task": "detection", "classes": ["a", "b", "c"],
                     "category_ids": [1, 2, 3], "iteration": 5}, path)
    return path


@pytest.mark.parametrize("architecture", ["faster_rcnn", "mask_rcnn"])
def test_onnx_export_gives_the_predictors_detections_at_any_image_size(tmp_path, architecture,
                                                                      capsys):
    checkpoint = detection_checkpoint(tmp_path, architecture)
    target = run_export(ExportConfig(checkpoint=str(checkpoint), format="onnx", size=64))
    assert target == tmp_path / "best.onnx"
    metadata = read_metadata(target)
    assert metadata["graph"] == "detection" and metadata["classes"] == ["a", "b", "c"]
    session = onnxruntime.InferenceSession(str(target), providers=["CPUExecutionProvider"])
    predictor = DetectionPredictor.from_checkpoint(torch.load(checkpoint, weights_only=False),
                                                   device="cpu", score_threshold=0.0)
    image = np.random.default_rng(1).integers(0, 256, (77, 101, 3), dtype=np.uint8)
    outputs = session.run(None, {"image": image})
    expected = predictor(image)
    assert len(expected) > 0 and len(outputs[2]) == len(expected)
    np.testing.assert_allclose(outputs[0], expected.boxes, atol=1e-2)
    np.testing.assert_array_equal(outputs[1], expected.labels)
    np.testing.assert_allclose(outputs[2], expected.scores, atol=1e-4)
    if architecture == "mask_rcnn":
        masks = encode_masks(torch.from_numpy(outputs[3]), torch.from_numpy(outputs[0]), 77, 101)
        same = [np.array_equal(detections_mask(m), expected.mask(i))
                for i, m in enumerate(masks)]
        assert np.mean(same) > 0.98
    # The exported detector is not a segmentation model: eval/predict/load_model say so.
    code = main(["eval", "--checkpoint", str(target)])
    err = capsys.readouterr().err.strip()
    assert code != 0 and len(err.splitlines()) == 1
    assert f"is a detection model ({architecture}_resnest14) exported to onnx" in err
    with pytest.raises(SegnestError, match="take the checkpoint it was exported from"):
        segnest.load_model(target)


def detections_mask(rle) -> np.ndarray:
    from pycocotools import mask as mask_utils

    return mask_utils.decode(rle).astype(bool)


def test_an_export_that_differs_from_predict_is_not_written(tmp_path, monkeypatch):
    checkpoint = detection_checkpoint(tmp_path, "faster_rcnn")
    monkeypatch.setattr(detection_export, "verify", lambda *args: "boxes differ by 3 px")
    with pytest.raises(SegnestError, match="boxes differ by 3 px.*not writing"):
        run_export(ExportConfig(checkpoint=str(checkpoint), format="onnx", size=64))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt"]


@pytest.mark.parametrize("fmt", ["torchscript", "openvino", "aoti"])
def test_formats_that_cannot_hold_a_detector_say_so_in_one_line(tmp_path, fmt):
    checkpoint = detection_checkpoint(tmp_path, "mask_rcnn")
    with pytest.raises(SegnestError, match=f"--format {fmt} cannot hold") as error:
        run_export(ExportConfig(checkpoint=str(checkpoint), format=fmt, size=64))
    assert "\n" not in str(error.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt"]


def test_pt2_is_written_verified_or_refused_in_one_line(tmp_path, capsys):
    checkpoint = detection_checkpoint(tmp_path, "faster_rcnn")
    try:
        target = run_export(ExportConfig(checkpoint=str(checkpoint), format="pt2", size=64))
    except SegnestError as error:  # torch 2.14: the RPN's data-dependent proposal count
        assert "--format pt2 cannot hold" in str(error) and "\n" not in str(error)
        assert "def forward" not in capsys.readouterr().err  # no graph dump
        assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt"]
        return
    assert read_metadata(target)["graph"] == "detection"
