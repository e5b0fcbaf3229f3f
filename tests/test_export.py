"""segnest export: each format re-loads in its own runtime with dynamic batch, height and
width, carries its metadata, and gives segnest predict's labels; nothing unfaithful is
written."""

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import save_tiny_checkpoint

import segnest
from segnest.commands.config import validate_config
from segnest.data import generate_palette
from segnest.errors import SegnestError
from segnest.inference import export
from segnest.inference.config import ExportConfig
from segnest.inference.export import (
    CeilAvgPool,
    check_images,
    read_metadata,
    run_export,
    without_ceil_pools,
    working_size,
)
from segnest.inference.strategies import _scaled_size
from segnest.runtime.compiling import has_cxx

NUM_CLASSES = 5
TINY = dict(num_classes=NUM_CLASSES, aux=True, head_channels=16, stage_width=8, stem_width=8)
PALETTE = generate_palette(NUM_CLASSES)
CLASSES = ["sky", "road", "tree", "car", "person"]
BASE_SIZE = 48  # save_tiny_checkpoint's
# (H, W) of batches: square, non-square, odd, and one whose working size is an exact half
# (99 * 48 / 352 + 0.5 = 14.0 in rational arithmetic, 13.99... in float64 as predict rounds it).
SIZES = [(48, 48), (40, 56), (33, 61), (99, 352)]
LOGITS_FORMATS = ["pt2", "onnx", "torchscript"]
END_TO_END_FORMATS = ["pt2", "onnx"]


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    # A sharpened head: the untrained model predicts all classes, not one everywhere.
    return save_tiny_checkpoint(tmp_path / "run" / "best.pt", TINY, PALETTE, CLASSES,
                                sharpen_head=True)


def reference_logits(checkpoint: Path, x: torch.Tensor) -> torch.Tensor:
    from segnest.models import model_from_checkpoint

    model = model_from_checkpoint(torch.load(checkpoint, weights_only=True)).eval()
    with torch.inference_mode():
        return model(x)["out"]


def run_in_own_runtime(fmt: str, path: Path, x: torch.Tensor) -> torch.Tensor:
    """The export's output as a user runs it: no segnest code involved."""
    if fmt in ("pt2", "aoti"):
        if fmt == "pt2":
            module = torch.export.load(str(path)).module()
        else:
            from torch._inductor import aoti_load_package

            module = aoti_load_package(str(path))
        with torch.inference_mode():
            return module(x)
    if fmt == "torchscript":
        return torch.jit.load(str(path))(x)
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {"image": x.numpy()})[0])


def normalized(images: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return (images.permute(0, 3, 1, 2).float() / 255 - mean) / std


def skip_without_onnx(fmt: str) -> None:
    if fmt == "onnx":
        pytest.importorskip("onnx")
        pytest.importorskip("onnxruntime")


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
@pytest.mark.parametrize("fmt", LOGITS_FORMATS)
def test_logits_export_matches_pytorch_at_any_batch_and_size(checkpoint, tmp_path, fmt):
    skip_without_onnx(fmt)
    path = run_export(ExportConfig(checkpoint=str(checkpoint), format=fmt, size=48,
                                   out=str(tmp_path / f"model.{fmt}")))
    assert path == tmp_path / f"model.{fmt}" and path.is_file()
    assert not list(tmp_path.glob(".*partial"))
    for seed, (batch, (height, width)) in enumerate([(1, (40, 56)), (2, (33, 61)),
                                                    (3, (64, 32))]):
        x = torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))
        exported = run_in_own_runtime(fmt, path, x)
        assert exported.shape == (batch, NUM_CLASSES, height, width)
        assert (exported - reference_logits(checkpoint, x)).abs().max() <= 1e-4


def _export_without_guard(fmt: str, checkpoint: Path, path: Path) -> None:
    """The logits graph as segnest exported it before graphs held their input limits."""
    from segnest.inference.predictor import Predictor

    predictor = Predictor.from_checkpoint(torch.load(checkpoint, weights_only=True),
                                          validate_config(export.InferenceFlags(device="cpu")))
    model = (without_ceil_pools(predictor.model) if fmt == "pt2" else predictor.model)
    example = torch.randn(2, 3, 48, 48)
    export.EXPORTERS[fmt](export.LogitsOnly(model).eval(), example, path, end_to_end=False,
                          metadata={})


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
@pytest.mark.parametrize("fmt", LOGITS_FORMATS)
def test_a_logits_graph_run_directly_refuses_an_image_below_its_min_side(checkpoint, tmp_path,
                                                                        fmt):
    """Without segnest in between: ONNX Runtime, torch.jit.load and torch.export.load raise
    an error naming the limit for a side below the metadata's min_side, and give a valid
    image exactly the logits of a graph without the guard."""
    skip_without_onnx(fmt)
    path = run_export(ExportConfig(checkpoint=str(checkpoint), format=fmt, size=48,
                                   out=str(tmp_path / f"model.{fmt}")))
    assert read_metadata(path)["input"]["min_side"] == 32
    # What each runtime says: the failing node's name, the scripted message, the program's
    # constraint on the dynamic size.
    said = {"onnx": "Name:'/input_outside_limits_min_side_32/",
            "torchscript": "this model takes at least 32 pixels a side",
            "pt2": ">= 32"}[fmt]
    for height, width in [(16, 16), (48, 31), (31, 48)]:
        with pytest.raises(Exception) as refused:
            run_in_own_runtime(fmt, path, torch.randn(1, 3, height, width))
        assert said in str(refused.value)
    unguarded = tmp_path / f"unguarded.{fmt}"
    _export_without_guard(fmt, checkpoint, unguarded)
    for batch, height, width in [(1, 32, 32), (2, 33, 61), (1, 40, 56)]:
        x = torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(height))
        guarded, before = run_in_own_runtime(fmt, path, x), run_in_own_runtime(fmt, unguarded, x)
        if fmt == "pt2":
            # Knowing H, W >= 32, torch.export proves the ASPP's input already channels_last
            # and drops a copy: the convolutions then add in another order (float rounding,
            # as far from eager PyTorch as before).
            assert (guarded - before).abs().max() <= 1e-6
            reference = reference_logits(checkpoint, x)
            assert ((guarded - reference).abs().max()
                    <= 2 * max((before - reference).abs().max(), 1e-7))
        else:
            assert torch.equal(guarded, before)


@pytest.mark.parametrize("fmt", END_TO_END_FORMATS)
def test_end_to_end_export_gives_segnest_predicts_labels(checkpoint, tmp_path, fmt):
    skip_without_onnx(fmt)
    path = run_export(ExportConfig(checkpoint=str(checkpoint), format=fmt, size=48,
                                   end_to_end=True))
    assert path == checkpoint.with_name(f"best.end2end{export.SUFFIXES[fmt]}")
    predictor = segnest.load_model(checkpoint, device="cpu")
    for seed, (height, width) in enumerate(SIZES):
        images = check_images(height, width, 3, seed=10 + seed)  # batch 2, uint8 NHWC
        labels = run_in_own_runtime(fmt, path, images)
        assert labels.dtype == torch.uint8 and labels.shape == (2, height, width)
        expected = np.stack(predictor([image.numpy() for image in images]))
        assert len(np.unique(expected)) > 1
        assert (labels.numpy() == expected).mean() >= 0.999


def test_exported_working_size_rounds_halves_as_segnest_predict(tmp_path):
    """Integer arithmetic would give 8 rows for 55 x 352 at base 48; predict gives 7."""
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")

    class Resize(torch.nn.Module):
        def forward(self, image):
            return export._resize(image.permute(0, 3, 1, 2).float(),
                                  working_size(image, BASE_SIZE))

    example = torch.zeros(2, 48, 64, 3, dtype=torch.uint8)
    program = export.exported_program(Resize(), example, end_to_end=True).module()
    export.export_onnx(Resize(), example, tmp_path / "resize.onnx", end_to_end=True)
    session = ort.InferenceSession(str(tmp_path / "resize.onnx"),
                                   providers=["CPUExecutionProvider"])
    for height, width in [(55, 352), (352, 55), (99, 352), (40, 56), (33, 61), (48, 48)]:
        image = torch.zeros(1, height, width, 3, dtype=torch.uint8)
        expected = _scaled_size(height, width, 1.0, BASE_SIZE)
        assert tuple(working_size(image, BASE_SIZE)) == expected
        assert tuple(program(image).shape[-2:]) == expected
        assert session.run(None, {"image": image.numpy()})[0].shape[-2:] == expected


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
@pytest.mark.parametrize("fmt,end_to_end", [("pt2", False), ("pt2", True), ("onnx", True),
                                            ("torchscript", False)])
def test_metadata_round_trips(checkpoint, tmp_path, fmt, end_to_end):
    skip_without_onnx(fmt)
    path = run_export(ExportConfig(checkpoint=str(checkpoint), format=fmt, size=32,
                                   end_to_end=end_to_end, out=str(tmp_path / "model")))
    metadata = read_metadata(path)
    assert metadata["classes"] == CLASSES
    assert metadata["palette"] == PALETTE.tolist()
    assert metadata["mean"] == pytest.approx([0.485, 0.456, 0.406])
    assert metadata["std"] == pytest.approx([0.229, 0.224, 0.225])
    assert metadata["in_channels"] == 3 and metadata["base_size"] == BASE_SIZE
    assert metadata["format"] == fmt and metadata["segnest_version"] == segnest.__version__
    assert metadata["dataset"] == "folder" and metadata["iteration"] == 1
    if end_to_end:
        assert metadata["graph"] == "end_to_end"
        assert metadata["input"]["layout"] == "NHWC" and metadata["input"]["dtype"] == "uint8"
        assert metadata["output"]["name"] == "labels"
    else:
        assert metadata["graph"] == "logits" and metadata["input"]["layout"] == "NCHW"
        assert metadata["output"]["shape"] == ["N", NUM_CLASSES, "H", "W"]
    # ... and as each runtime's own API shows it
    if fmt == "pt2":
        extra = {"segnest.json": ""}
        torch.export.load(str(path), extra_files=extra)
        assert json.loads(extra["segnest.json"]) == metadata
    elif fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        assert json.loads(session.get_modelmeta().custom_metadata_map["segnest"]) == metadata


def test_read_metadata_refuses_a_file_without_it(checkpoint, tmp_path):
    with pytest.raises(SegnestError, match="best.pt holds no segnest export metadata"):
        read_metadata(checkpoint)


@pytest.mark.parametrize("end_to_end", [False, True])
def test_an_export_that_fails_the_check_writes_nothing(checkpoint, tmp_path, monkeypatch,
                                                       end_to_end):
    real = export.load_exported

    def off_by_a_little(fmt, path):
        run = real(fmt, path)
        # A wrong graph: every label shifted by one class (logits rolled over the classes).
        if end_to_end:
            return lambda x: (run(x) + 1) % NUM_CLASSES
        return lambda x: run(x).roll(1, dims=1)

    monkeypatch.setattr(export, "load_exported", off_by_a_little)
    target = tmp_path / "model.pt2"
    with pytest.raises(SegnestError, match=r"labels equal segnest predict's on only .*"
                                           r"not writing .*model.pt2"):
        run_export(ExportConfig(checkpoint=str(checkpoint), format="pt2", size=32,
                                end_to_end=end_to_end, out=str(target)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_logits_beyond_the_tolerance_are_refused(checkpoint, tmp_path, monkeypatch):
    real = export.load_exported
    monkeypatch.setattr(export, "load_exported",
                        lambda fmt, path: (lambda x, run=real(fmt, path): run(x) + 1e-3))
    with pytest.raises(SegnestError, match="logits differ from PyTorch by up to 1.00e-03"):
        run_export(ExportConfig(checkpoint=str(checkpoint), size=32,
                                out=str(tmp_path / "model.pt2")))
    assert not (tmp_path / "model.pt2").exists()


def test_export_default_path_and_format(checkpoint):
    path = run_export(ExportConfig(checkpoint=str(checkpoint), size=32))
    assert path == checkpoint.with_name("best.pt2") and export.is_export(path, "pt2")
    assert not export.is_export(path, "aoti") and not export.is_export(path, "torchscript")


@pytest.mark.parametrize("flags,match", [
    (dict(format="tflite"), "--format"),
    (dict(format="torchscript", end_to_end=True), "--end-to-end is not available for "
                                                  "--format torchscript"),
])
def test_bad_export_flags_are_refused_before_any_work(flags, match):
    with pytest.raises(SegnestError, match=match):
        validate_config(ExportConfig(checkpoint="best.pt", **flags))


def _zip(path: Path, members: list[str]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for member in members:
            archive.writestr(member, b"{}")
    return path


def tiny_onnx(path: Path) -> Path:
    """A real (one-node) ONNX model: what the onnx guard must parse to accept."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Relu", ["image"], ["logits"])], "g",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, 4, 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 3, 4, 4])])
    onnx.save(helper.make_model(graph), str(path))
    return path


def test_each_format_recognises_only_its_own_earlier_exports(tmp_path):
    # Members as torch.export.save and aoti_compile_and_package write them.
    pt2 = _zip(tmp_path / "a.pt2", ["a/archive_format", "a/models/model.json",
                                    "a/data/weights/weight_0"])
    aoti = _zip(tmp_path / "b.pt2", ["b/archive_format", "b/data/aotinductor/model/x.so",
                                     "b/data/aotinductor/model/x.wrapper_metadata.json"])
    onnx_like = tiny_onnx(tmp_path / "c.onnx")
    checkpoint_like = _zip(tmp_path / "d.pt", ["d/data.pkl", "d/data/0"])
    found = {(path.name, fmt): export.is_export(path, fmt)
             for path in (pt2, aoti, onnx_like, checkpoint_like)
             for fmt in ("pt2", "aoti", "onnx", "torchscript")}
    assert {key for key, yes in found.items() if yes} == {
        ("a.pt2", "pt2"), ("b.pt2", "aoti"), ("c.onnx", "onnx")}


def test_a_pt2_export_is_never_written_over_another_format(checkpoint, tmp_path):
    onnx_like = tmp_path / "model.onnx"
    onnx_like.write_bytes(b"\x08\x09\x12\x07pytorch")
    with pytest.raises(SegnestError, match="--out .*model.onnx exists and is not a pt2 export"):
        run_export(ExportConfig(checkpoint=str(checkpoint), out=str(onnx_like), size=32))
    assert onnx_like.read_bytes() == b"\x08\x09\x12\x07pytorch"


def test_ceil_avg_pool_equals_the_ceil_mode_pool_it_replaces():
    pool = torch.nn.AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 3, 1), pool, torch.nn.AvgPool2d(3, 1, 1))
    replaced = without_ceil_pools(model)
    assert isinstance(replaced[1], CeilAvgPool) and replaced[2] is not model[2]
    assert type(replaced[2]) is torch.nn.AvgPool2d and model[1] is pool  # a copy, as it was
    for height, width in [(33, 61), (32, 32), (7, 2)]:
        x = torch.randn(2, 3, height, width)
        torch.testing.assert_close(replaced(x), model(x))


@pytest.mark.slow
@pytest.mark.skipif(not has_cxx(), reason="AOTInductor compiles C++")
@pytest.mark.parametrize("end_to_end", [False, True])
def test_aoti_package_runs_at_any_batch_and_size(checkpoint, tmp_path, end_to_end,
                                                monkeypatch):
    # Without torch's switch, under which AOTInductor would check the program's input
    # constraints: the package must refuse a too-small image by itself.
    monkeypatch.delenv("AOTI_RUNTIME_CHECK_INPUTS", raising=False)
    path = run_export(ExportConfig(checkpoint=str(checkpoint), format="aoti", size=32,
                                   end_to_end=end_to_end))
    assert path.name == ("best.end2end.aoti.pt2" if end_to_end else "best.aoti.pt2")
    assert export.is_export(path, "aoti") and not export.is_export(path, "pt2")
    assert read_metadata(path)["graph"] == ("end_to_end" if end_to_end else "logits")
    predictor = segnest.load_model(checkpoint, device="cpu")
    for seed, (height, width) in enumerate(SIZES):
        images = check_images(height, width, 3, seed=20 + seed)
        if end_to_end:
            labels = run_in_own_runtime("aoti", path, images).numpy()
            expected = np.stack(predictor([image.numpy() for image in images]))
            assert (labels == expected).mean() >= 0.999
        else:
            x = normalized(images)
            exported = run_in_own_runtime("aoti", path, x)
            assert (exported - reference_logits(checkpoint, x)).abs().max() <= 1e-4
    if not end_to_end:  # the compiled program keeps the logits graph's min_side
        for height, width in [(16, 40), (40, 31)]:
            with pytest.raises(Exception, match="this model takes at least 32 pixels a side"):
                run_in_own_runtime("aoti", path, torch.randn(2, 3, height, width))


@pytest.mark.parametrize("content", [b"\x08\x09\x12\x07pytorch", b"\x08" + b"\xff" * 64],
                         ids=["onnx-header-without-graph", "first-byte-only"])
def test_an_onnx_export_replaces_only_a_file_that_parses_as_onnx(checkpoint, tmp_path,
                                                                  content):
    """The guard reads the file as ONNX; its first byte (0x08) proves nothing."""
    target = tmp_path / "model.onnx"
    target.write_bytes(content)
    assert not export.is_export(target, "onnx")
    with pytest.raises(SegnestError, match="exists and is not a onnx export"):
        run_export(ExportConfig(checkpoint=str(checkpoint), out=str(target), format="onnx",
                                size=32))
    assert target.read_bytes() == content


def test_read_metadata_of_a_truncated_onnx_file_is_one_line(checkpoint, tmp_path):
    path = run_export(ExportConfig(checkpoint=str(checkpoint), out=str(tmp_path / "m.onnx"),
                                   format="onnx", size=32))
    truncated = tmp_path / "cut.onnx"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(SegnestError, match="cut.onnx is not a readable ONNX model") as error:
        read_metadata(truncated)
    assert "\n" not in str(error.value)


def test_onnx_export_without_the_onnx_package_names_the_extra_before_any_work(
        checkpoint, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "onnx", None)
    with pytest.raises(SegnestError, match=r"pip install 'segnest\[export\]'") as error:
        run_export(ExportConfig(checkpoint=str(tmp_path / "missing.pt"), format="onnx",
                                out=str(tmp_path / "m.onnx")))
    assert "--format pt2" in str(error.value) and not (tmp_path / "m.onnx").exists()
