"""Exported models as eval, predict and ``load_model`` run them: an OpenVINO IR
(``segnest export --format openvino``, ``segnest quantize --backend openvino``) or an ONNX
logits model (``segnest export --format onnx``, ``segnest quantize``), given where a
checkpoint would be.

The export's metadata stands in for the checkpoint: classes, palette, normalisation, base
size, dataset and iteration (:func:`export_checkpoint`). ``--precision`` reaches OpenVINO
as its inference precision hint (``auto``: bf16 where the CPU has it natively); ONNX
Runtime runs a model as it is, in fp32 (int8 where quantized). Both run on the CPU.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from segnest.errors import SegnestError
from segnest.inference.export import _is_onnx_file, read_metadata
from segnest.inference.openvino import OpenVinoModel, is_ir
from segnest.inference.quantize import OnnxModel
from segnest.runtime.precision import precision_name, resolve_precision


def is_exported_model(path: str | os.PathLike) -> bool:
    """Whether ``path`` is an OpenVINO IR graph or an ONNX model (by content)."""
    path = Path(path)
    return path.is_file() and (is_ir(path) or _is_onnx_file(path))


def export_checkpoint(metadata: dict[str, Any]) -> dict[str, Any]:
    """What a training checkpoint would say about the model an export holds."""
    return {
        "dataset": metadata.get("dataset"), "iteration": metadata.get("iteration"),
        "classes": list(metadata["classes"]), "palette": metadata.get("palette"),
        "model_name": metadata.get("model"), "config": {},
        "model_kwargs": {"num_classes": len(metadata["classes"]),
                         "in_chans": int(metadata.get("in_channels", 3))},
        "inference": {"base_size": metadata.get("base_size"), "mean": metadata.get("mean"),
                      "std": metadata.get("std")},
    }


def load_exported_model(path: str | os.PathLike, *, precision: str = "fp32",
                        device: torch.device = torch.device("cpu"), compile: bool = False
                        ) -> tuple[Any, dict[str, Any]]:
    """``(runner, checkpoint-like dict)`` of the export at ``path``; one line for what it
    cannot do."""
    path = Path(path)
    if device.type != "cpu":
        raise SegnestError(f"{path} is an exported CPU model; run it with --device cpu, or "
                           "pass the checkpoint to run on a GPU")
    if compile:
        raise SegnestError(f"--compile applies to checkpoints; {path} is an exported model, "
                           "already optimised by its runtime: leave out --compile")
    metadata = read_metadata(path)
    if metadata.get("graph", "logits") != "logits":
        raise SegnestError(f"{path} is an end-to-end export (image in, labels out); eval and "
                           "predict run logits exports: export again without --end-to-end")
    if "classes" not in metadata:
        raise SegnestError(f"{path} holds no class list in its metadata; export it again with "
                           "segnest export")
    dtype = resolve_precision(precision, device)
    if is_ir(path):
        runner = OpenVinoModel(path, precision=precision_name(dtype))
    elif dtype is not None:
        raise SegnestError(f"--precision {precision}: ONNX Runtime runs {path} as it is "
                           "(fp32, or int8 where quantized); use --precision fp32, or an "
                           "OpenVINO export for bf16")
    else:
        runner = OnnxModel(path)
    return runner, export_checkpoint(metadata)
