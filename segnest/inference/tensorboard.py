"""What segnest writes to TensorBoard, where, and under which names: the one place for the
run layout, the tag scheme and the functions that training validation and ``segnest eval``
share, so that both log the same things under the same tags.

Runs (``tensorboard --logdir <work_dir>/tb`` shows them side by side, named):

- ``<work_dir>/tb/train``: ``segnest train``; ``<work_dir>/tb/pretrain``: ``segnest pretrain``.
  A resumed run appends to its folder; ``--overwrite`` removes everything under ``tb/``.
- ``<tb root>/eval_<split>[_ms][_flip]``: each ``segnest eval`` setting is its own run
  (:func:`eval_run_name`). The tb root is the checkpoint's folder's ``tb/`` (the training
  work folder, beside ``train``) unless ``--out`` is given, then ``<out>/tb/``: an eval
  writes only where its metrics go or where they go by default. Evaluating again replaces
  that run's events at once (:func:`write_run_atomically`), so a re-run never plots twice.

Tags. TensorBoard groups tags by the text before the first ``/`` and sorts the groups by
name, so the headline curves have short groups that sort first and the long per-class
list a group that sorts last:

=============================  ==========================================================
``train/loss`` ``train/lr`` ..  training scalars (``aux_loss``, ``images_per_s``)
``val/mIoU`` ``val/pixAcc``     validation metrics in percent, also ``val/mAcc``; an eval
                                run logs the same tags at the checkpoint's iteration
``val_images/confusion_matrix`` row-normalised confusion matrix (up to 40 classes)
``val/most_confused``           text: the most confused class pairs (more than 40 classes)
``val_images/image_gt_pred/<i>`` image | ground truth | prediction panels
``val_images/legend``           the palette of the classes present (with the images branch)
``val_per_class/IoU/<class>``   per-class IoU in percent
``config``                      text: the run's settings as YAML
=============================  ==========================================================

HParams: each run holds one HParams session in its own folder (not the timestamped
sub-run of ``SummaryWriter.add_hparams``): its settings as hyperparameters and its
``val/*`` scalars as metrics, one row per run in the HParams view.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from segnest.inference import visualize
from segnest.inference.confusion import MAX_DRAWN_CLASSES, confusion_image, most_confused

TB_FOLDER = "tb"
TRAIN_RUN = "train"
PRETRAIN_RUN = "pretrain"

HEADLINE_METRICS = ("mIoU", "pixAcc", "mAcc")
VAL = "val"
PER_CLASS_IOU = "val_per_class/IoU"
IMAGES = "val_images"
PANELS = f"{IMAGES}/image_gt_pred"
CONFUSION_IMAGE = f"{IMAGES}/confusion_matrix"
LEGEND = f"{IMAGES}/legend"
MOST_CONFUSED = f"{VAL}/most_confused"
CONFIG = "config"

METRIC_TAGS = tuple(f"{VAL}/{key}" for key in HEADLINE_METRICS)
"""The HParams metrics of a segmentation run (train or eval)."""


def run_dir(root: str | os.PathLike, run: str) -> Path:
    """The folder of run ``run`` under a work or output folder ``root``."""
    return Path(root) / TB_FOLDER / run


def eval_run_name(split: str, multi_scale: bool, flip: bool) -> str:
    """``eval_<split>[_ms][_flip]``: one run per evaluation setting of a checkpoint."""
    return f"eval_{split}" + ("_ms" if multi_scale else "") + ("_flip" if flip else "")


def log_segmentation_results(writer: Any, results: Mapping[str, Any],
                             class_names: Sequence[str], palette: Any,
                             panels: Sequence[np.ndarray], step: int) -> None:
    """Metrics, per-class IoU, confusion matrix and panels of one evaluation (training
    validation or ``segnest eval``) at ``step``; undefined (NaN) values are left out."""
    for key in HEADLINE_METRICS:
        if not math.isnan(results[key]):
            writer.add_scalar(f"{VAL}/{key}", results[key], step)
    for name, iou in zip(class_names, results["IoU"], strict=True):
        if not math.isnan(iou):
            writer.add_scalar(f"{PER_CLASS_IOU}/{name}", iou, step)
    confusion = results.get("confusion")
    if confusion is not None:
        if len(class_names) <= MAX_DRAWN_CLASSES:
            writer.add_image(CONFUSION_IMAGE, confusion_image(confusion, class_names), step,
                             dataformats="HWC")
        else:
            writer.add_text(MOST_CONFUSED, most_confused(confusion, class_names), step)
    visualize.log_panels(writer, PANELS, panels, step)
    if panels:
        present = [index for index, (gt, pred) in enumerate(
            zip(results["gt_pixels"], results["pred_pixels"], strict=True)) if gt or pred]
        writer.add_image(LEGEND, visualize.legend_image(list(class_names), palette,
                                                        present=present),
                         step, dataformats="HWC")


def log_config(writer: Any, config: Mapping[str, Any], step: int = 0) -> None:
    """The run's settings as a YAML block under the text tag ``config``."""
    text = yaml.safe_dump(_plain(dict(config)), sort_keys=False)
    writer.add_text(CONFIG, f"```yaml\n{text}```", step)


# Settings that say where files go and how a run is logged and kept, not what it learns.
_NOT_HYPERPARAMETERS = frozenset({
    "config", "work_dir", "resume", "overwrite", "tensorboard", "workers", "log_interval",
    "checkpoint_interval", "keep_checkpoints", "panels", "export"})


def hparams_of(config: Mapping[str, Any]) -> dict[str, Any]:
    """The settings of ``config`` that shape the result (HParams columns): all but where
    files go and how the run is logged and kept."""
    return {key: value for key, value in config.items() if key not in _NOT_HYPERPARAMETERS}


def segmentation_hparams(training: Mapping[str, Any],
                         evaluation: Mapping[str, Any]) -> dict[str, Any]:
    """One set of HParams columns for a training run and each eval of its checkpoints:
    the training settings, then how the metrics were measured (``evaluation``: checkpoint,
    iteration, dataset, split, samples, inference settings, device, world size; for a
    training run, its own single-scale validation). TensorBoard takes the column list from
    one run, so every run of a work folder declares the same columns."""
    return {**hparams_of(training), **evaluation}


def hparam_values(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``config`` flattened (``inference.scales``) into the value types HParams takes:
    numbers and strings as they are, booleans, None, lists and the rest as text."""
    values: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            values.update(hparam_values(value, f"{name}."))
        elif isinstance(value, int | float | str) and not isinstance(value, bool):
            values[name] = value
        else:
            values[name] = str(value)
    return values


def log_hparams(writer: Any, config: Mapping[str, Any], metric_tags: Sequence[str],
                *, start: bool = True, end: bool = True) -> None:
    """This run's HParams session in its own event file: the settings in ``config`` as
    hyperparameters, the scalars ``metric_tags`` (which the run logs) as its metrics.
    ``start`` writes the experiment and session start, ``end`` the session end, so that a
    training run is listed while it runs and marked finished when it ends."""
    from torch.utils.tensorboard.summary import hparams

    experiment, session_start, session_end = hparams(
        hparam_values(config), {tag: 0.0 for tag in metric_tags})
    for summary in ((experiment, session_start) if start else ()) + ((session_end,) if end else ()):
        writer.file_writer.add_summary(summary)


def write_run_atomically(run_folder: Path, fill: Callable[[Any], None]) -> None:
    """Write a whole run with ``fill(writer)`` and put it in place of ``run_folder``'s
    earlier events, if any: the events are written in a hidden ``.partial`` folder beside
    it, so an interrupted write leaves the earlier run as it was, and a finished one
    replaces it whole (evaluating twice never plots two points per step)."""
    from torch.utils.tensorboard import SummaryWriter

    run_folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=run_folder.parent, prefix=f".{run_folder.name}-",
                                    suffix=".partial"))
    retired = staging.with_suffix(".old")
    try:
        writer = SummaryWriter(log_dir=str(staging))
        try:
            fill(writer)
        finally:
            writer.close()
        if run_folder.exists():
            os.replace(run_folder, retired)
        os.replace(staging, run_folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if retired.exists():  # the earlier run goes only once the new one is in place
            if run_folder.exists():
                shutil.rmtree(retired, ignore_errors=True)
            else:
                os.replace(retired, run_folder)


def _plain(value: Any) -> Any:
    """``value`` with tuples as lists and paths as text, as YAML shows them plainly."""
    if isinstance(value, Mapping):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)
