"""OpenVINO as a CPU inference backend (the optional extra ``segnest[openvino]``).

- :func:`to_openvino` converts the logits graph (normalized image ``(N, C, H, W)`` ->
  logits ``(N, classes, H, W)``, as ``segnest export`` traces it) with dynamic batch,
  height and width;
- :func:`save_ir` writes it as OpenVINO IR, ``<name>.xml`` (the graph, with segnest's
  export metadata in its ``rt_info`` under ``segnest``, and the SHA-256 of the weights)
  and ``<name>.bin`` (the weights): the weights first, then the graph, each atomically,
  so that the graph under its final name always comes with its complete weights;
- :func:`quantize_ir` quantizes a converted model to int8 with NNCF's post-training
  quantization (activations calibrated on given images; the layers NNCF's
  ``PERFORMANCE`` preset picks, symmetric);
- :class:`OpenVinoModel` runs an IR as segnest runs a model (a CPU batch in, float32
  logits out), with ``--precision`` mapped to OpenVINO's inference precision hint
  (:data:`PRECISION_HINTS`): OpenVINO's own default on a CPU with native bf16 is bf16, so
  fp32 is asked for explicitly.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from segnest.errors import SegnestError
from segnest.runtime.files import atomic_path

EXTRA = "pip install 'segnest[openvino]'"
METADATA_KEY = "segnest"
# --precision -> OpenVINO's INFERENCE_PRECISION_HINT.
PRECISION_HINTS = {"fp32": "f32", "bf16": "bf16", "fp16": "f16"}
XML_SUFFIX = ".xml"


def openvino() -> Any:
    """The openvino module, or one line saying how to install it."""
    try:
        import openvino as ov
    except ImportError:
        raise SegnestError(f"OpenVINO is not installed; install the extra with {EXTRA}") from None
    return ov


def weights_path(xml: Path) -> Path:
    """The weights file next to an IR graph (``model.xml`` -> ``model.bin``)."""
    return Path(xml).with_suffix(".bin")


def to_openvino(module: nn.Module, example: torch.Tensor) -> Any:
    """``module`` (image -> logits) as an ``openvino.Model`` with dynamic N, H and W."""
    ov = openvino()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's deprecation and shape warnings
        # Dynamic N, H and W from the start: converted at the example's static shape, the
        # shape arithmetic of export.guard_ir would be folded away as constants.
        return ov.convert_model(module.eval(), example_input=example,
                                input=[ov.PartialShape([-1, example.shape[1], -1, -1])])


def _digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(2**20):
            digest.update(chunk)
    return digest.hexdigest()


class StagedIR:
    """An IR written to a private folder beside its target, readable there (for checks)
    before :meth:`commit` moves it under the target's name."""

    def __init__(self, model: Any, target: Path, metadata: dict[str, Any]) -> None:
        ov = openvino()
        self.target = Path(target)
        self.folder = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.",
                                            dir=self.target.parent))
        self.xml = self.folder / "model.xml"
        # The digest of the weights goes into the graph: first without it, to get them.
        ov.save_model(model, str(self.xml), compress_to_fp16=False)
        metadata = {**metadata, "weights_sha256": _digest(weights_path(self.xml))}
        model.set_rt_info(json.dumps(metadata), [METADATA_KEY])
        ov.save_model(model, str(self.xml), compress_to_fp16=False)

    def commit(self) -> None:
        with atomic_path(weights_path(self.target)) as temp:
            shutil.copyfile(weights_path(self.xml), temp)
        with atomic_path(self.target) as temp:
            shutil.copyfile(self.xml, temp)

    def discard(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def read_ir_metadata(xml: str | os.PathLike) -> dict[str, Any]:
    """segnest's metadata of an IR graph (keys as in ``segnest export``'s metadata)."""
    ov = openvino()
    try:
        model = ov.Core().read_model(str(xml), str(weights_path(Path(xml))))
        return json.loads(model.get_rt_info([METADATA_KEY]).astype(str))
    except (RuntimeError, ValueError) as error:
        raise SegnestError(f"{xml} is not an OpenVINO model written by segnest export or "
                           f"quantize ({str(error).splitlines()[0]}); export it again") from None


def is_ir(path: Path) -> bool:
    """Whether ``path`` holds an OpenVINO IR graph (an XML ``<net>`` document)."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(512)
    except OSError:
        return False
    return head.lstrip().startswith(b"<?xml") and b"<net " in head


class OpenVinoModel:
    """An OpenVINO IR (image -> logits) called like a PyTorch model: a CPU batch
    ``(B, C, H, W)`` in, float32 logits ``(B, classes, H, W)`` out. ``precision`` is a
    ``--precision`` name (fp32, bf16, fp16) passed on as the inference precision hint."""

    def __init__(self, xml: str | os.PathLike, precision: str = "fp32",
                 threads: int | None = None) -> None:
        ov = openvino()
        if precision not in PRECISION_HINTS:
            raise SegnestError(f"--precision {precision} has no OpenVINO counterpart; use "
                               f"one of {', '.join(PRECISION_HINTS)}")
        xml = Path(xml)
        weights = weights_path(xml)
        metadata = read_ir_metadata(xml)
        expected = metadata.get("weights_sha256")
        if expected is not None and _digest(weights) != expected:
            raise SegnestError(f"{weights} is not the weights file of {xml} (its SHA-256 "
                               "differs from the one the graph records); export the model "
                               "again")
        self.metadata = metadata
        core = ov.Core()
        config = {"INFERENCE_PRECISION_HINT": PRECISION_HINTS[precision],
                  "INFERENCE_NUM_THREADS": threads or torch.get_num_threads(),
                  "PERFORMANCE_HINT": "LATENCY"}
        self.compiled = core.compile_model(core.read_model(str(xml), str(weights)), "CPU",
                                           config)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        images = x.detach().cpu().float().contiguous().numpy()
        return torch.from_numpy(self.compiled(images)[0].copy())


def quantize_ir(model: Any, batches: Sequence[torch.Tensor]) -> Any:
    """``model`` (an ``openvino.Model``) with int8 weights and activations (NNCF
    post-training quantization, ``PERFORMANCE`` preset), calibrated on ``batches``."""
    openvino()
    try:
        import nncf
    except ImportError:
        raise SegnestError(f"NNCF is not installed; install the extra with {EXTRA}") from None
    dataset = nncf.Dataset(list(batches), lambda batch: batch.numpy())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return nncf.quantize(model, dataset, subset_size=len(batches),
                             preset=nncf.QuantizationPreset.PERFORMANCE)
