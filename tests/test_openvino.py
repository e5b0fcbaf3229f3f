"""OpenVINO as a backend: segnest export --format openvino writes a verified IR that plain
OpenVINO runs at any batch and size with segnest's metadata; a mismatched weights file and
a missing OpenVINO are each one line."""

import sys
from pathlib import Path

import pytest
import torch
from test_export import CLASSES, NUM_CLASSES, checkpoint, reference_logits  # noqa: F401

from segnest.config import ExportConfig
from segnest.errors import SegnestError
from segnest.inference.export import read_metadata, run_export
from segnest.inference.openvino import OpenVinoModel

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
