"""OpenVINO as a backend: segnest export --format openvino writes a verified IR that plain
OpenVINO runs at any batch and size with segnest's metadata; a mismatched weights file and
a missing OpenVINO are each one line."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from conftest import save_tiny_checkpoint
from test_export import CLASSES, NUM_CLASSES, checkpoint, reference_logits  # noqa: F401

import segnest
from segnest.data import generate_palette
from segnest.errors import SegnestError
from segnest.inference.config import ExportConfig, QuantizeConfig
from segnest.inference.export import check_images, read_metadata, run_export
from segnest.inference.openvino import OpenVinoModel
from segnest.inference.quantize import run_quantize
from segnest.runtime import precision

ov = pytest.importorskip("openvino")


def test_openvino_export_runs_in_plain_openvino_at_any_batch_and_size(checkpoint, tmp_path):  # noqa: F811
    path = run_export(ExportConfig(checkpoint=str(checkpoint), format="openvino", size=48))
    assert path == checkpoint.with_name("best.openvino.xml")
    assert path.with_suffix(".bin").is_file()
    assert sorted(p.name for p in checkpoint.parent.iterdir()) == [
        "best.openvino.bin", "best.openvino.xml", "best.pt"]  # nothing staged is left
    assert read_metadata(path)["classes"] == CLASSES
    core = ov.Core()
    compiled = core.compile_model(core.read_model(str(path)), "CPU",
                                  {"INFERENCE_PRECISION_HINT": "f32"})
    for seed, (batch, height, width) in enumerate([(1, 40, 56), (2, 33, 61), (3, 64, 32)]):
        x = torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))
        exported = torch.from_numpy(compiled(x.numpy())[0])
        assert exported.shape == (batch, NUM_CLASSES, height, width)
        assert (exported - reference_logits(checkpoint, x)).abs().max() <= 1e-4


def test_a_weights_file_that_is_not_the_graphs_is_refused(checkpoint, tmp_path):  # noqa: F811
    first = run_export(ExportConfig(checkpoint=str(checkpoint), format="openvino", size=48))
    other = run_export(ExportConfig(checkpoint=str(checkpoint), format="openvino", size=48,
                                    out=str(tmp_path / "other.xml")))
    weights = first.with_suffix(".bin").read_bytes()
    other.with_suffix(".bin").write_bytes(weights[:-4] + bytes(4))
    with pytest.raises(SegnestError, match="is not the weights file of"):
        OpenVinoModel(other)
    OpenVinoModel(first)  # its own weights: accepted


def test_an_openvino_export_must_be_an_xml_name(checkpoint, tmp_path):  # noqa: F811
    with pytest.raises(SegnestError, match="ending in .xml"):
        run_export(ExportConfig(checkpoint=str(checkpoint), format="openvino", size=48,
                                out=str(tmp_path / "model.ir")))


def test_without_openvino_installed_one_line_names_the_extra(monkeypatch, checkpoint):  # noqa: F811
    monkeypatch.setitem(sys.modules, "openvino", None)
    with pytest.raises(SegnestError, match=r"pip install 'segnest\[openvino\]'"):
        run_export(ExportConfig(checkpoint=str(checkpoint), format="openvino", size=48))
    assert not list(Path(checkpoint).parent.glob("*.xml"))



def test_openvino_int8_is_checked_against_fp32_before_it_is_written(folder_dataset, tmp_path,
                                                                    capsys):
    pytest.importorskip("nncf")
    from test_quantize import NUM_CLASSES as CLASSES_3
    from test_quantize import TINY as TINY_3

    source = save_tiny_checkpoint(tmp_path / "run" / "best.pt", TINY_3,
                                  generate_palette(CLASSES_3), sharpen_head=True)
    result = run_quantize(QuantizeConfig(checkpoint=str(source), data_root=str(folder_dataset),
                                         calibration_images=4, check_images=2,
                                         backend="openvino"))
    out = source.with_name("best.int8.openvino.xml")
    printed = capsys.readouterr().out
    assert result["target"] == out and out.is_file() and out.with_suffix(".bin").is_file()
    assert result["agreement"] >= 0.9 and result["images"] == 2
    assert abs(result["candidate_miou"] - result["reference_miou"]) < 10
    # The check is printed before the model is reported written.
    assert "mIoU" in printed and printed.index("agree") < printed.index(f"-> {out}")
    assert read_metadata(out)["quantization"]["dtype"] == "int8"
    x = torch.randn(1, 3, 40, 48)
    assert OpenVinoModel(out)(x).shape == (1, CLASSES_3, 40, 48)


def test_load_model_runs_an_openvino_or_onnx_export_as_the_checkpoint(checkpoint):  # noqa: F811
    xml = run_export(ExportConfig(checkpoint=str(checkpoint), format="openvino", size=48))
    images = [check_images(h, w, 3, seed=3)[0].numpy() for h, w in ((48, 48), (40, 56))]
    expected = segnest.load_model(checkpoint, device="cpu")(images)
    exports = [xml]
    if importlib.util.find_spec("onnxruntime"):
        exports.append(run_export(ExportConfig(checkpoint=str(checkpoint), format="onnx",
                                               size=48)))
    for path in exports:
        predictor = segnest.load_model(path, device="cpu")
        assert predictor.classes == tuple(CLASSES)
        for got, want in zip(predictor(images), expected, strict=True):
            assert (got == want).mean() >= 0.999


def test_precision_reaches_openvino_as_its_hint_and_onnx_refuses_bf16(checkpoint, monkeypatch):  # noqa: F811
    monkeypatch.setattr(precision, "cpu_native_bf16", lambda: True)
    xml = run_export(ExportConfig(checkpoint=str(checkpoint), format="openvino", size=48))
    hints = {name: str(segnest.load_model(xml, device="cpu", precision=name).model.ir.compiled
                       .get_property("INFERENCE_PRECISION_HINT"))
             for name in ("fp32", "bf16")}
    assert hints == {"fp32": "<Type: 'float32'>", "bf16": "<Type: 'bfloat16'>"}
    with pytest.raises(SegnestError, match="--compile applies to checkpoints"):
        segnest.load_model(xml, device="cpu", compile=True)
    if importlib.util.find_spec("onnxruntime"):
        onnx_path = run_export(ExportConfig(checkpoint=str(checkpoint), format="onnx", size=48))
        with pytest.raises(SegnestError, match="ONNX Runtime runs"):
            segnest.load_model(onnx_path, device="cpu", precision="bf16")


def without_guard(model):
    """``model`` (an IR read by OpenVINO) with the image passed straight to what the
    min_side guard's Multiply fed: the graph as it was before ``export.guard_ir``."""
    guard = [op for op in model.get_ordered_ops()
             if op.get_friendly_name() == "input_outside_limits_min_side_32/Multiply"]
    assert len(guard) == 1, "the IR holds no min_side guard"
    image = model.get_parameters()[0]
    for reader in list(guard[0].output(0).get_target_inputs()):
        reader.replace_source_output(image.output(0))
    model.validate_nodes_and_infer_types()
    return model


def assert_guarded(xml: Path) -> None:
    """Run directly in OpenVINO, the IR at ``xml`` fails at its guard for a side below 32
    and gives valid images exactly the outputs of the same graph without the guard."""
    core = ov.Core()
    hint = {"INFERENCE_PRECISION_HINT": "f32"}
    compiled = core.compile_model(core.read_model(str(xml)), "CPU", hint)
    for height, width in [(16, 40), (16, 16), (48, 31)]:
        with pytest.raises(Exception, match="input_outside_limits_min_side_32/GatherElements"):
            compiled(torch.randn(1, 3, height, width).numpy())
    unguarded = core.compile_model(without_guard(core.read_model(str(xml))), "CPU", hint)
    unguarded(torch.randn(1, 3, 16, 40).numpy())  # what the guard stops: labels
    for batch, height, width in [(1, 32, 32), (2, 33, 61), (1, 40, 56)]:
        x = torch.randn(batch, 3, height, width,
                        generator=torch.Generator().manual_seed(height)).numpy()
        assert (compiled(x)[0] == unguarded(x)[0]).all()


def test_an_openvino_ir_refuses_an_image_below_its_min_side(checkpoint):  # noqa: F811
    """Plain OpenVINO fails at the graph's guard node; segnest's loader says it in one line
    before the runtime sees the input."""
    from segnest.inference.backends import load_exported_model

    xml = run_export(ExportConfig(checkpoint=str(checkpoint), format="openvino", size=48))
    assert read_metadata(xml)["input"]["min_side"] == 32
    assert_guarded(xml)
    runner, _ = load_exported_model(xml)
    with pytest.raises(SegnestError, match="at least 32 pixels a side.*min_side.*16 x 40"):
        runner(torch.randn(1, 3, 16, 40))
    assert runner(torch.randn(1, 3, 32, 40)).shape == (1, NUM_CLASSES, 32, 40)


def test_an_int8_openvino_ir_refuses_an_image_below_its_min_side(folder_dataset, tmp_path):
    """segnest quantize --backend openvino: NNCF quantizes the graph without the guard, and
    the IR written holds it, as the fp32 export's does."""
    pytest.importorskip("nncf")
    from test_quantize import NUM_CLASSES as CLASSES_3
    from test_quantize import TINY as TINY_3

    source = save_tiny_checkpoint(tmp_path / "run" / "best.pt", TINY_3,
                                  generate_palette(CLASSES_3), sharpen_head=True)
    out = run_quantize(QuantizeConfig(checkpoint=str(source), data_root=str(folder_dataset),
                                      calibration_images=4, check_images=2,
                                      backend="openvino"))["target"]
    assert read_metadata(out)["input"]["min_side"] == 32
    assert_guarded(out)
