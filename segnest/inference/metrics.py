"""Segmentation metrics from one dataset-level confusion matrix.

Convention (used for every number segnest reports):

- The confusion matrix ``mat[gt, pred]`` is summed over the whole dataset (and over all
  ranks); metrics are computed once from it, never averaged over images.
- ``IoU_c = TP / (TP + FP + FN)``. A class with ``TP + FP + FN = 0`` (absent from both the
  ground truth and the prediction) has no defined IoU: it is NaN and left out of mIoU, as
  mmsegmentation and cityscapesscripts do (the ResNeSt authors' code counts it as 0).
  A class absent from the ground truth but predicted somewhere has IoU 0 and counts.
- ``Acc_c = TP / (TP + FN)``; classes absent from the ground truth are NaN and left out of
  mAcc.
- ``pixAcc = correct / labelled pixels``. Pixels whose target equals ``ignore_index`` are
  not labelled and never counted.
- With no labelled pixel at all, every summary value is NaN.

Unit: every metric is a percentage (0-100), as papers print them, on the console, in
``metrics.json``, in TensorBoard and in checkpoints.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from segnest.data.transforms import IGNORE_INDEX
from segnest.runtime.files import write_text_atomic


class ConfusionMatrix:
    """Accumulates a ``[gt, pred]`` pixel count matrix on the device of the predictions."""

    def __init__(
        self, num_classes: int, ignore_index: int = IGNORE_INDEX, device: torch.device | str = "cpu"
    ) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self._mat = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    @property
    def mat(self) -> torch.Tensor:
        """The int64 matrix; rows are ground-truth classes, columns predicted classes."""
        return self._mat

    def reset(self) -> None:
        self._mat.zero_()

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Adds one batch of integer predictions and targets of the same (any) shape."""
        if pred.shape != target.shape:
            raise ValueError(
                f"pred and target shapes differ: {tuple(pred.shape)} vs {tuple(target.shape)}"
            )
        if pred.is_floating_point() or target.is_floating_point():
            raise ValueError("pred and target must be integer class ids (take argmax of logits)")
        n = self.num_classes
        labelled = target != self.ignore_index
        # int64 before the arithmetic: uint8 masks would overflow in n * t + p.
        t = target[labelled].long()
        p = pred[labelled].long()
        # One check (one device sync) for both tensors; an out-of-range id would otherwise
        # land silently in a wrong cell.
        if ((t < 0) | (t >= n) | (p < 0) | (p >= n)).any():
            bad_t = t[(t < 0) | (t >= n)]
            if bad_t.numel():
                raise ValueError(
                    f"target has class id {int(bad_t[0])} outside [0, {n}) that is not the "
                    f"ignore index {self.ignore_index}; check the dataset's label mapping"
                )
            bad_p = p[(p < 0) | (p >= n)]
            raise ValueError(
                f"prediction has class id {int(bad_p[0])} outside [0, {n}); "
                "check the model's num_classes"
            )
        counts = torch.bincount(n * t + p, minlength=n * n).view(n, n)
        self._mat += counts.to(self._mat.device)

    def all_reduce(self) -> None:
        """Sums the matrix over all ranks in place; a no-op without torch.distributed.

        Call it once, after the last update: calling it twice double-counts.
        """
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self._mat, op=dist.ReduceOp.SUM)

    def compute(self) -> dict[str, Any]:
        """Returns pixAcc, mIoU, mAcc (percent), per-class IoU/Acc (percent), pixel counts
        and the matrix itself (``confusion``, rows ground truth, as lists of ints)."""
        counts = self._mat.detach().cpu()
        mat = counts.to(torch.float64).numpy()
        tp = np.diag(mat)
        gt_pixels = mat.sum(axis=1)
        pred_pixels = mat.sum(axis=0)
        union = gt_pixels + pred_pixels - tp
        with np.errstate(divide="ignore", invalid="ignore"):
            iou = np.where(union > 0, 100.0 * tp / union, np.nan)
            acc = np.where(gt_pixels > 0, 100.0 * tp / gt_pixels, np.nan)
        labelled = float(mat.sum())
        correct = float(tp.sum())
        return {
            "pixAcc": 100.0 * correct / labelled if labelled > 0 else math.nan,
            "mIoU": _nanmean(iou),
            "mAcc": _nanmean(acc),
            "IoU": [float(v) for v in iou],
            "Acc": [float(v) for v in acc],
            "labelled_pixels": int(labelled),
            "correct_pixels": int(correct),
            "gt_pixels": [int(v) for v in gt_pixels],
            "pred_pixels": [int(v) for v in pred_pixels],
            "confusion": counts.tolist(),
        }


def _nanmean(values: np.ndarray) -> float:
    finite = values[~np.isnan(values)]
    return float(finite.mean()) if finite.size else math.nan


def percent(value: float) -> str:
    """A metric as printed everywhere: two decimals, "n/a" when undefined."""
    return "n/a" if math.isnan(value) else f"{value:.2f}"


def _check_names(results: dict[str, Any], class_names: Sequence[str]) -> None:
    if len(class_names) != len(results["IoU"]):
        raise ValueError(f"{len(class_names)} class names given for {len(results['IoU'])} classes")


def _summary(results: dict[str, Any]) -> str:
    return (
        f"pixAcc {percent(results['pixAcc'])}  mIoU {percent(results['mIoU'])}  "
        f"mAcc {percent(results['mAcc'])}"
    )


def format_table(results: dict[str, Any], class_names: Sequence[str]) -> str:
    """Aligned plain-text per-class table (IoU and Acc in %) followed by a summary line."""
    _check_names(results, class_names)
    name_width = max([len("class"), *(len(name) for name in class_names)])
    header = f"{'class':<{name_width}}  {'IoU':>7}  {'Acc':>7}"
    lines = [header, "-" * len(header)]
    for name, iou, acc in zip(class_names, results["IoU"], results["Acc"], strict=True):
        lines.append(f"{name:<{name_width}}  {percent(iou):>7}  {percent(acc):>7}")
    lines.append("-" * len(header))
    lines.append(_summary(results))
    return "\n".join(lines)


def to_markdown(results: dict[str, Any], class_names: Sequence[str]) -> str:
    """Markdown summary table and per-class table (values in %)."""
    _check_names(results, class_names)
    lines = [
        "| pixAcc | mIoU | mAcc |",
        "|---:|---:|---:|",
        f"| {percent(results['pixAcc'])} | {percent(results['mIoU'])} "
        f"| {percent(results['mAcc'])} |",
        "",
        "| class | IoU | Acc |",
        "|---|---:|---:|",
    ]
    for name, iou, acc in zip(class_names, results["IoU"], results["Acc"], strict=True):
        lines.append(f"| {name} | {percent(iou)} | {percent(acc)} |")
    return "\n".join(lines) + "\n"


def _nan_to_none(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {key: _nan_to_none(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_nan_to_none(item) for item in value]
    return value


def save_results(
    results: dict[str, Any],
    class_names: Sequence[str],
    out_dir: str | os.PathLike[str],
    extra: dict[str, Any] | None = None,
) -> tuple[Path, Path]:
    """Writes ``metrics.json`` (NaN as null) and ``metrics.md`` into ``out_dir``.

    The confusion matrix (``confusion``) is written one ground-truth row per line, so that a
    150-class matrix stays 150 lines of the file.

    ``extra`` (timings, inference settings, checkpoint path...) is merged into the JSON
    top level; it may not overwrite a metric. Returns the two paths.
    """
    _check_names(results, class_names)
    extra = dict(extra or {})
    clashes = sorted(set(extra) & (set(results) | {"class_names"}))
    if clashes:
        raise ValueError(f"extra fields would overwrite metrics: {', '.join(clashes)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"class_names": list(class_names), **results, **extra}
    # allow_nan=False guarantees the file is strict JSON; default=str covers paths.
    confusion = payload.pop("confusion", None)
    text = json.dumps(_nan_to_none(payload), indent=2, allow_nan=False, default=str)
    if confusion is not None:
        rows = ",\n".join("    " + json.dumps(row) for row in confusion)
        text = text[:-2] + f',\n  "confusion": [\n{rows}\n  ]\n}}'
    text += "\n"
    json_path = out / "metrics.json"
    md_path = out / "metrics.md"
    write_text_atomic(json_path, text)
    write_text_atomic(md_path, to_markdown(results, class_names))
    return json_path, md_path


def metric_warnings(results: dict[str, Any], class_names: Sequence[str]) -> list[str]:
    """Why the scores in ``results`` may mean little, one sentence each (empty when fine).

    With no labelled pixel every summary value is NaN; with one ground-truth class, mIoU
    measures that class alone and says nothing about telling classes apart.
    """
    if results["labelled_pixels"] == 0:
        return ["every evaluated pixel is ignore in the ground truth, so pixAcc, mIoU and "
                "mAcc are undefined; check the masks, --split and --samples"]
    present = [name for name, count in zip(class_names, results["gt_pixels"], strict=True)
               if count > 0]
    if len(present) < 2:
        return [f"the ground truth holds only 1 class ({present[0]}), so mIoU scores that "
                "class alone; evaluate on more images or check the masks"]
    return []
