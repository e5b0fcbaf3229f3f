"""``segnest export`` of a detection checkpoint (Faster, Mask, Cascade and Cascade Mask
R-CNN), verified against :class:`segnest.inference.detection.DetectionPredictor` before the
file appears (written atomically, as :mod:`segnest.inference.export` writes a segmentation
export).

The graph: ``image`` uint8 ``(H, W, 3)`` RGB (one image, any H and W) -> ``boxes`` float32
``(N, 4)`` x1, y1, x2, y2 in the image's pixels, ``labels`` int64 ``(N,)`` 1..K (the
metadata's ``classes`` from 1), ``scores`` float32 ``(N,)`` (every detection above the
model's 0.05, highest first; a caller applies its own threshold), and for mask models
``mask_probs`` float32 ``(N, 1, 28, 28)``: each detection's mask probabilities inside its
box, which a caller pastes into the box and thresholds at 0.5
(:func:`segnest.inference.coco.encode_masks` does it one mask at a time). Resizing to the
test size and back is inside the graph.

Formats: ``onnx`` through the TorchScript-based exporter (torchvision's detection models
are written for it). ``pt2`` is tried with ``torch.export`` and refused in one line when it
cannot hold the model (on torch 2.14 it stops at the RPN's data-dependent proposal count).
``aoti``, ``openvino`` and ``torchscript`` are refused in one line.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import segnest
from segnest.errors import SegnestError
from segnest.inference.backends import METADATA_FILE
from segnest.inference.coco import encode_masks, low_resolution_masks
from segnest.inference.config import ExportConfig
from segnest.inference.detection import DetectionPredictor
from segnest.inference.export import (
    ONNX_OPSET,
    add_onnx_metadata,
    check_images,
    check_sizes,
)
from segnest.runtime.files import atomic_path

DETECTION_FORMATS = ("onnx", "pt2")
BOX_TOLERANCE = 1e-2  # pixels
SCORE_TOLERANCE = 1e-4
MASK_IOU = 0.99  # each mask's IoU with predict's


class DetectionGraph(nn.Module):
    """An R-CNN as a graph of one uint8 image to its detections (see the module
    docstring); build it and run it inside :func:`low_resolution_masks`."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        output = self.model([image.permute(2, 0, 1).float() / 255])[0]
        outputs = (output["boxes"], output["labels"], output["scores"])
        return outputs + ((output["mask_probs"],) if "mask_probs" in output else ())


def output_names(has_masks: bool) -> list[str]:
    return ["boxes", "labels", "scores"] + (["mask_probs"] if has_masks else [])


def export_detection(cfg: ExportConfig, checkpoint: dict[str, Any], target: Path) -> Path:
    """Export the detection checkpoint to ``target`` in ``cfg.format``, verified."""
    fmt = cfg.format
    name = checkpoint.get("model_name")
    if fmt not in DETECTION_FORMATS:
        raise SegnestError(f"--format {fmt} cannot hold the detection model {name}: use "
                           "--format onnx (ONNX Runtime)")
    predictor = DetectionPredictor.from_checkpoint(checkpoint, device="cpu",
                                                   source=cfg.checkpoint, score_threshold=0.0)
    graph = DetectionGraph(predictor.model).eval()
    images = [check_images(h, w, 3, seed)[0] for seed, (h, w) in
              enumerate(check_sizes(cfg.size))]
    metadata = detection_metadata(checkpoint, fmt, predictor.has_masks)
    with low_resolution_masks(predictor.model), atomic_path(target) as temp:
        if fmt == "onnx":
            export_onnx(graph, images[0], temp, predictor.has_masks, metadata)
            run = onnx_runner(temp)
        else:
            run = export_pt2(graph, images[0], temp, metadata, name)
        problems = [verify(run, predictor, image) for image in images]
        failed = [problem for problem in problems if problem]
        if failed:
            raise SegnestError(f"the exported {fmt} model differs from segnest predict: "
                               f"{failed[0]}; the export is not faithful, not writing {target}")
    sizes = ", ".join(f"{image.shape[0]}x{image.shape[1]}" for image in images)
    outputs = ", ".join(output_names(predictor.has_masks))
    print(f"exported {fmt} to {target}: uint8 image (H,W,3) -> {outputs}, any H and W; "
          f"detections equal to segnest predict's at {sizes} (boxes within "
          f"{BOX_TOLERANCE} px, scores within {SCORE_TOLERANCE}, masks IoU >= {MASK_IOU})")
    return target


def detection_metadata(checkpoint: dict[str, Any], fmt: str, has_masks: bool
                       ) -> dict[str, Any]:
    return {
        "segnest_version": segnest.__version__, "format": fmt, "graph": "detection",
        "model": checkpoint.get("model_name"), "classes": checkpoint.get("classes"),
        "category_ids": checkpoint.get("category_ids"),
        "input": {"name": "image", "dtype": "uint8", "layout": "HWC", "shape": ["H", "W", 3],
                  "range": [0, 255]},
        "outputs": output_names(has_masks), "iteration": checkpoint.get("iteration"),
    }


def export_onnx(graph: DetectionGraph, example: torch.Tensor, path: Path, has_masks: bool,
                metadata: dict[str, Any]) -> None:
    names = output_names(has_masks)
    axes: dict[str, dict[int, str]] = {"image": {0: "height", 1: "width"}}
    axes.update({name: {0: "detections"} for name in names})
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's and the deprecation's, many per box op
        torch.onnx.export(graph, (example,), str(path), dynamo=False, opset_version=ONNX_OPSET,
                          input_names=["image"], output_names=names, dynamic_axes=axes)
    add_onnx_metadata(path, metadata)


def onnx_runner(path: Path):
    try:
        import onnxruntime
    except ImportError:
        raise SegnestError("verifying an ONNX export needs onnxruntime: pip install "
                           "onnxruntime (or pip install 'segnest[onnx]')") from None
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda image: [torch.from_numpy(v) for v in session.run(None,
                                                                   {"image": image.numpy()})]


def export_pt2(graph: DetectionGraph, example: torch.Tensor, path: Path,
               metadata: dict[str, Any], name: str | None):
    height = torch.export.Dim("height", min=32, max=8192)
    width = torch.export.Dim("width", min=32, max=8192)
    try:
        # torch.export logs the whole graph when it fails; the one line below says it all.
        with torch.no_grad(), _quiet_logging():
            program = torch.export.export(graph, (example,),
                                          dynamic_shapes=({0: height, 1: width},))
    except Exception as error:  # torch.export's many error types: the model does not fit
        reason = str(error).strip().splitlines()[0][:160]
        raise SegnestError(f"--format pt2 cannot hold {name} on torch {torch.__version__}: "
                           f"torch.export stops at a data-dependent shape "
                           f"({type(error).__name__}: {reason}); use --format onnx") from None
    torch.export.save(program, str(path), extra_files={METADATA_FILE: json.dumps(metadata)})
    module = torch.export.load(str(path)).module()
    return lambda image: list(module(image))


@contextlib.contextmanager
def _quiet_logging():
    logging.disable(logging.CRITICAL)
    try:
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        logging.disable(logging.NOTSET)


def verify(run, predictor: DetectionPredictor, image: torch.Tensor) -> str | None:
    """What differs between the exported model's detections of ``image`` and predict's,
    or None when they agree."""
    pixels = image.numpy()
    expected = predictor.predict(pixels)
    outputs = run(image)
    boxes, labels, scores = (outputs[0].float(), outputs[1].numpy(), outputs[2].float())
    where = f"a {pixels.shape[0]}x{pixels.shape[1]} image"
    if len(scores) != len(expected):
        return f"{len(scores)} detections instead of {len(expected)} on {where}"
    if not len(expected):
        return None
    box_error = float(np.abs(boxes.numpy() - expected.boxes).max())
    score_error = float(np.abs(scores.numpy() - expected.scores).max())
    if (labels != expected.labels).any() or box_error > BOX_TOLERANCE or \
            score_error > SCORE_TOLERANCE:
        return (f"boxes differ by up to {box_error:.2e} px, scores by {score_error:.2e}, "
                f"{int((labels != expected.labels).sum())} labels on {where}")
    if expected.masks is not None:
        from pycocotools import mask as mask_utils

        masks = encode_masks(outputs[3].float(), boxes, *pixels.shape[:2])
        for ours, theirs in zip(masks, expected.masks, strict=True):
            a, b = mask_utils.decode(ours).astype(bool), mask_utils.decode(theirs).astype(bool)
            union = (a | b).sum()
            iou = (a & b).sum() / union if union else 1.0
            if iou < MASK_IOU:
                return f"a mask overlaps predict's by IoU {iou:.3f} on {where}"
    return None
