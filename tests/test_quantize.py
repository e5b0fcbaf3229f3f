"""segnest quantize: int8 ONNX models of a checkpoint, calibrated, checked, written safely."""

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import save_tiny_checkpoint

from segnest.cli import main
from segnest.commands.config import parse_layer_types
from segnest.data import build_dataset, generate_palette
from segnest.errors import SegnestError
from segnest.inference.config import QUANTIZE_LAYER_TYPES, QuantizeConfig

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from segnest.inference.quantize import (  # noqa: E402 (needs onnxruntime)
    OnnxModel,
    conv_layer_types,
    run_quantize,
)

NUM_CLASSES = 3
TINY = dict(num_classes=NUM_CLASSES, aux=True, head_channels=16, stage_width=8, stem_width=8)


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    return save_tiny_checkpoint(tmp_path / "run" / "best.pt", TINY, generate_palette(NUM_CLASSES),
                                sharpen_head=True)


def quantize(checkpoint: Path, data: Path, out: Path, **overrides) -> dict:
    values = dict(checkpoint=str(checkpoint), data_root=str(data), out=str(out),
                  calibration_images=4, check_images=2)
    values.update(overrides)
    return run_quantize(QuantizeConfig(**values))


def quantized_convs(path: Path) -> dict[str, int]:
    """Layer type -> convolutions whose weight is dequantized from int8 (QDQ)."""
    model = onnx.load(str(path))
    dequantized = {node.output[0] for node in model.graph.node
                   if node.op_type == "DequantizeLinear"}
    counts: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type == "Conv" and node.input[1] in dequantized:
            kind = _type_of_quantized(model, node)
            counts[kind] = counts.get(kind, 0) + 1
    return counts


def _type_of_quantized(model, node) -> str:
    """The layer type of a QDQ convolution, read from its attributes as the fp32 graph's."""
    attrs = {a.name: a for a in node.attribute}
    group = attrs["group"].i if "group" in attrs else 1
    kernel = list(attrs["kernel_shape"].ints)
    dilations = list(attrs["dilations"].ints) if "dilations" in attrs else [1]
    if group > 1 and max(kernel) > 1:
        return "grouped"
    if max(kernel) == 1:
        return "pointwise"
    return "dilated" if max(dilations) > 1 else "dense"


@pytest.mark.slow
def test_quantized_model_runs_and_its_logits_follow_fp32(checkpoint, folder_dataset, tmp_path):
    from segnest.inference.strategies import inference_model
    from segnest.models import model_from_checkpoint

    out = tmp_path / "model.int8.onnx"
    result = quantize(checkpoint, folder_dataset, out,
                      layer_types=QUANTIZE_LAYER_TYPES)
    assert result["target"] == out and out.is_file()
    assert not list(tmp_path.glob(".*partial"))
    x = torch.randn(2, 3, 40, 56, generator=torch.Generator().manual_seed(3))
    logits = OnnxModel(out)(x)
    fp32 = inference_model(model_from_checkpoint(torch.load(checkpoint, weights_only=True)))
    with torch.inference_mode():
        expected = fp32(x)["out"]
    assert logits.shape == expected.shape == (2, NUM_CLASSES, 40, 56)
    # An untrained model has no margin between classes, so labels are a poor judge; the
    # logits of an int8 model whose scales were wrong would not even correlate.
    correlation = np.corrcoef(logits.flatten().numpy(), expected.flatten().numpy())[0, 1]
    assert correlation > 0.95
    # The check's fp32 reference must stay in eval mode after the export (a model left
    # training, dropout on, agreed on only 83% here).
    assert result["agreement"] >= 0.97 and result["images"] == 2
    from segnest.inference.export import read_metadata

    metadata = read_metadata(out)
    assert len(metadata["classes"]) == NUM_CLASSES and metadata["graph"] == "logits"
    assert metadata["quantization"]["dtype"] == "int8"
    assert sorted(metadata["quantization"]["layer_types"]) == sorted(QUANTIZE_LAYER_TYPES)
    # Run directly, the int8 graph refuses a side below its metadata's min_side, as the
    # fp32 export does.
    import onnxruntime

    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    with pytest.raises(Exception, match="input_outside_limits_min_side_32"):
        session.run(None, {"image": np.zeros((1, 3, 16, 40), np.float32)})


@pytest.mark.slow
def test_only_the_chosen_layer_types_are_quantized(checkpoint, folder_dataset, tmp_path):
    out = tmp_path / "model.int8.onnx"
    result = quantize(checkpoint, folder_dataset, out, layer_types=("pointwise", "dilated"))
    found = quantized_convs(out)
    assert set(found) == {"pointwise", "dilated"}
    assert found == result["counts"]
    assert found["dilated"] == 3  # the ASPP's three rates


def test_conv_types_are_read_from_the_graph(checkpoint, tmp_path):
    from segnest.inference.export import LogitsOnly, export_onnx
    from segnest.models import model_from_checkpoint

    model = model_from_checkpoint(torch.load(checkpoint, weights_only=True))
    path = tmp_path / "fp32.onnx"
    with torch.no_grad():
        export_onnx(LogitsOnly(model).eval(), torch.randn(1, 3, 32, 32), path, end_to_end=False)
    types = list(conv_layer_types(onnx.load(str(path))).values())
    # resnest14: one Split-Attention 3x3 per block (4), the ASPP's three dilated 3x3, the
    # three stem 3x3s and the head's 3x3; the rest are 1x1.
    assert types.count("grouped") == 4
    assert types.count("dilated") == 3
    assert types.count("dense") == 4
    assert types.count("pointwise") == len(types) - 11


def test_layer_types_are_validated():
    assert parse_layer_types("dense, pointwise,dense") == ("dense", "pointwise")
    for bad in ("", "dense,depthwise", ","):
        with pytest.raises(SegnestError, match="--layer-types"):
            parse_layer_types(bad)


@pytest.mark.parametrize("flags, message", [
    (["--layer-types", "winograd"], "--layer-types 'winograd' must list"),
    (["--calibration-images", "0"], "--calibration-images"),
    (["--check-images", "-1"], "--check-images"),
])
def test_bad_flags_are_one_line_errors(checkpoint, flags, message, capsys):
    assert main(["quantize", "--checkpoint", str(checkpoint), *flags]) != 0
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_out_may_not_be_the_checkpoint_or_another_file(checkpoint, folder_dataset, tmp_path,
                                                       capsys):
    before = checkpoint.read_bytes()
    other = tmp_path / "notes.onnx"
    other.write_text("my notes")
    for out, message in ((checkpoint, "which is the checkpoint"),
                         (other, "is not a onnx export")):
        code = main(["quantize", "--checkpoint", str(checkpoint), "--data-root",
                     str(folder_dataset), "--out", str(out)])
        err = capsys.readouterr().err
        assert code != 0 and message in err and len(err.strip().splitlines()) == 1
    assert checkpoint.read_bytes() == before and other.read_text() == "my notes"


def test_a_dataset_without_images_is_one_line(checkpoint, tmp_path, capsys):
    code = main(["quantize", "--checkpoint", str(checkpoint), "--data-root",
                 str(tmp_path / "nothing"), "--out", str(tmp_path / "m.int8.onnx")])
    err = capsys.readouterr().err
    assert code != 0 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "m.int8.onnx").exists()


def test_calibration_images_are_normalized_and_resized_as_inference_feeds_them(
        folder_dataset):
    from segnest.inference.quantize import calibration_batches
    from segnest.inference.settings import InferenceSettings

    dataset = build_dataset("folder", folder_dataset, "train")
    settings = InferenceSettings(base_size=64, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    batches = list(calibration_batches(dataset, 3, settings))
    assert len(batches) == 3
    for batch in batches:
        assert batch.shape[:2] == (1, 3) and max(batch.shape[-2:]) == 64
    image, _ = dataset.load(0)
    raw = torch.from_numpy(image).float().permute(2, 0, 1) / 255
    assert abs(float(batches[0].mean()) - float((raw.mean() - 0.5) / 0.25)) < 0.05
