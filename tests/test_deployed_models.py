"""eval and predict measure the exported ONNX and int8 models a user will deploy, with the
classes, palette and normalisation their metadata carries (#25 item 10)."""

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import save_tiny_checkpoint

import segnest
from segnest.data import generate_palette
from segnest.errors import SegnestError
from segnest.inference.config import EvalConfig, ExportConfig, PredictConfig, QuantizeConfig
from segnest.inference.evaluate import run_eval
from segnest.inference.export import run_export
from segnest.inference.predict import run_predict

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

CLASSES = ["left", "right", "square"]
TINY = dict(num_classes=3, aux=True, head_channels=16, stage_width=8, stem_width=8)


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    return save_tiny_checkpoint(tmp_path / "run" / "best.pt", TINY, generate_palette(3),
                                classes=CLASSES, sharpen_head=True)


def onnx_export(checkpoint: Path, end_to_end: bool = False) -> Path:
    name = "e2e.onnx" if end_to_end else "best.onnx"
    return run_export(ExportConfig(checkpoint=str(checkpoint), format="onnx", size=32,
                                   end_to_end=end_to_end, out=str(checkpoint.with_name(name))))


def evaluated(model: Path, data: Path, out: Path) -> dict:
    return run_eval(EvalConfig(checkpoint=str(model), dataset="folder", data_root=str(data),
                               out=str(out)))


def test_eval_of_an_onnx_export_gives_the_checkpoints_metrics(checkpoint, folder_dataset,
                                                               tmp_path):
    exported = onnx_export(checkpoint)
    reference = evaluated(checkpoint, folder_dataset, tmp_path / "pt")
    measured = evaluated(exported, folder_dataset, tmp_path / "onnx")
    assert measured["mIoU"] == pytest.approx(reference["mIoU"], abs=1e-6)
    assert measured["IoU"] == pytest.approx(reference["IoU"], abs=1e-6)
    saved = json.loads((tmp_path / "onnx" / "metrics.json").read_text())
    assert saved["exported"]["format"] == "onnx"


def test_eval_and_predict_take_an_int8_model_with_its_metadata(checkpoint, folder_dataset,
                                                               tmp_path):
    from segnest.inference.quantize import run_quantize

    int8 = tmp_path / "best.int8.onnx"
    run_quantize(QuantizeConfig(checkpoint=str(checkpoint), data_root=str(folder_dataset),
                                out=str(int8), calibration_images=2, check_images=1))
    results = evaluated(int8, folder_dataset, tmp_path / "int8")
    assert 0.0 <= results["mIoU"] <= 100.0
    saved = json.loads((tmp_path / "int8" / "metrics.json").read_text())
    assert saved["exported"]["quantization"]["dtype"] == "int8"
    image = next((folder_dataset / "images" / "val").glob("*.png"))
    run_predict(PredictConfig(inputs=[str(image)], checkpoint=str(int8),
                              out=str(tmp_path / "masks")))
    assert (tmp_path / "masks" / f"{image.stem}_mask.png").is_file()


def test_load_model_of_an_onnx_export_predicts_the_checkpoints_labels(checkpoint):
    photo = np.random.default_rng(0).integers(0, 256, (37, 53, 3)).astype(np.uint8)
    exported = segnest.load_model(onnx_export(checkpoint))
    assert exported.classes == tuple(CLASSES)
    assert np.array_equal(exported(photo), segnest.load_model(checkpoint, device="cpu")(photo))


def test_an_end_to_end_graph_is_refused_with_the_way_to_measure_it(checkpoint, folder_dataset,
                                                                     tmp_path):
    with pytest.raises(SegnestError, match="end-to-end graph.*without --end-to-end"):
        evaluated(onnx_export(checkpoint, end_to_end=True), folder_dataset, tmp_path / "m")


def test_an_onnx_model_refuses_a_gpu_and_pytorch_only_flags(checkpoint):
    exported = onnx_export(checkpoint)
    for settings, flag in (({"device": "cuda"}, "--device cuda"),
                           ({"compile": True}, "--compile"),
                           ({"precision": "bf16"}, "--precision")):
        with pytest.raises(SegnestError, match=flag):
            segnest.load_model(exported, **settings)


def test_an_onnx_model_refuses_a_working_size_below_its_documented_min_side(checkpoint):
    """The logits graph's metadata documents min_side 32; a smaller side is refused."""
    exported = segnest.load_model(onnx_export(checkpoint), base_size=16)
    with pytest.raises(SegnestError, match="at least 32 pixels a side"):
        exported(np.zeros((40, 40, 3), np.uint8))
