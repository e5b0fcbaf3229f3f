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

Tags. TensorBoard groups tags by the text before the first ``/`` and sorts the groups (and
the cards in a group) by name. So the headline of every task is in the group ``headline``,
which sorts before the tasks' own groups: the first screen shows the validation (and eval)
mIoU of a segmentation run and the top-1 of a pretraining run, whatever else the folder
holds. Everything else is in the task's namespace, so pretraining and segmentation never
share a chart:

====================================  ======================================================
``headline/segmentation_mIoU`` ...      validation metrics in percent (``_pixAcc``, ``_mAcc``);
                                        an eval run logs the same tags at the checkpoint's
                                        iteration
``headline/segmentation_results``       an image of the numbers (eval runs): a single point
                                        is easy to miss on a chart, the numbers are not
``headline/pretraining_top1``, ``_top5``  pretraining validation accuracy, at the iteration
``segmentation/loss`` ``/lr`` ...       training scalars (``aux_loss``, ``images_per_s``);
                                        pretraining's under ``pretraining/``
``segmentation/results``                text: the metrics table (eval runs)
``segmentation/most_confused``          text: the most confused pairs (more than 40 classes)
``segmentation_images/...``             ``confusion_matrix``, ``legend`` and the
                                        ``image_gt_pred/<i>`` panels
``segmentation_per_class/IoU/<class>``  per-class IoU in percent
``headline/detection_bbox_AP``, ``_segm_AP``  detection validation COCO AP in percent;
                                        ``detection/`` holds its loss terms and the 12
                                        numbers (``bbox_AP50`` ...),
                                        ``detection_per_class/`` the per-class AP,
                                        ``detection_images/gt_pred/<i>`` the panels
``config``                              text: the run's settings as YAML
====================================  ======================================================

HParams: each run holds one HParams session in its own folder (not the timestamped
sub-run of ``SummaryWriter.add_hparams``), named by when it started and what it is
(``18:03:12 train ...``, ``18:09:40 eval val ms flip ...``: :func:`session_name`) so that
rows differ, with the columns that tell runs apart (:data:`HPARAM_COLUMNS`) and the
headline metrics.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from segnest.inference import visualize
from segnest.inference.confusion import MAX_DRAWN_CLASSES, confusion_image, most_confused
from segnest.inference.metrics import percent

TB_FOLDER = "tb"
TRAIN_RUN = "train"
PRETRAIN_RUN = "pretrain"

SEGMENTATION = "segmentation"
PRETRAINING = "pretraining"
HEADLINE = "headline"
HEADLINE_METRICS = ("mIoU", "pixAcc", "mAcc")
PRETRAINING_METRICS = ("top1", "top5")
PER_CLASS_IOU = f"{SEGMENTATION}_per_class/IoU"
IMAGES = f"{SEGMENTATION}_images"
PANELS = f"{IMAGES}/image_gt_pred"
CONFUSION_IMAGE = f"{IMAGES}/confusion_matrix"
LEGEND = f"{IMAGES}/legend"
MOST_CONFUSED = f"{SEGMENTATION}/most_confused"
RESULTS_TEXT = f"{SEGMENTATION}/results"
RESULTS_IMAGE = f"{HEADLINE}/{SEGMENTATION}_results"
CONFIG = "config"


def headline_tag(task: str, metric: str) -> str:
    """``headline/<task>_<metric>``: a task's headline metric, in the group shown first."""
    return f"{HEADLINE}/{task}_{metric}"


def training_tag(task: str, scalar: str) -> str:
    """``<task>/<scalar>``: a training scalar (loss, lr, ...) in its task's namespace."""
    return f"{task}/{scalar}"


DETECTION = "detection"
DETECTION_RUN = "train"
DETECTION_HEADLINE = ("bbox_AP", "segm_AP")
DETECTION_PANELS = f"{DETECTION}_images/gt_pred"
DETECTION_PER_CLASS = f"{DETECTION}_per_class"

METRIC_TAGS = tuple(headline_tag(SEGMENTATION, key) for key in HEADLINE_METRICS)
"""The HParams metrics of a segmentation run (train or eval)."""
PRETRAINING_TAGS = tuple(headline_tag(PRETRAINING, key) for key in PRETRAINING_METRICS)
"""The HParams metrics of a pretraining run."""


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
    for key, tag in zip(HEADLINE_METRICS, METRIC_TAGS, strict=True):
        if not math.isnan(results[key]):
            writer.add_scalar(tag, results[key], step)
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


DETECTION_TAGS = tuple(headline_tag(DETECTION, key) for key in DETECTION_HEADLINE)
"""The HParams metrics of a detection run: COCO box and mask AP in percent."""


def log_detection_results(writer: Any, metrics: Mapping[str, Any],
                          panels: Sequence[np.ndarray], step: int) -> None:
    """COCO metrics of one detection validation at ``step``: ``bbox_AP``/``segm_AP`` in the
    headline group, the 12 numbers per IoU type under ``detection/<type>_<number>``, the
    per-class AP under ``detection_per_class/<type>_AP/<class>`` and the ground truth |
    prediction panels under ``detection_images/gt_pred/<i>``; undefined numbers are left
    out."""
    for key, tag in zip(DETECTION_HEADLINE, DETECTION_TAGS, strict=True):
        if metrics.get(key) is not None:
            writer.add_scalar(tag, metrics[key], step)
    for iou_type in ("bbox", "segm"):
        for name, value in (metrics.get(iou_type) or {}).items():
            if name == "per_class":
                for label, ap in value.items():
                    if ap is not None:
                        writer.add_scalar(f"{DETECTION_PER_CLASS}/{iou_type}_AP/{label}",
                                          ap, step)
            elif value is not None:
                writer.add_scalar(training_tag(DETECTION, f"{iou_type}_{name}"), value, step)
    visualize.log_panels(writer, DETECTION_PANELS, panels, step)


def log_results_card(writer: Any, title: str, results: Mapping[str, Any], step: int) -> None:
    """An evaluation's headline numbers as text (``segmentation/results``, a table) and as
    an image in the headline group, for an eval run whose single point a chart shows
    small or, scaled for outliers, not at all."""
    shown = [(key, results[key]) for key in HEADLINE_METRICS if not math.isnan(results[key])]
    header = "| run | " + " | ".join(key for key, _ in shown) + " |"
    rule = "|---" * (len(shown) + 1) + "|"
    row = f"| {title} | " + " | ".join(percent(value) for _, value in shown) + " |"
    writer.add_text(RESULTS_TEXT, "\n".join((header, rule, row)), step)
    numbers = "   ".join(f"{key} {percent(value)}" for key, value in shown)
    writer.add_image(RESULTS_IMAGE, visualize.text_card([title, numbers]), step,
                     dataformats="HWC")


def log_config(writer: Any, config: Mapping[str, Any], step: int = 0) -> None:
    """The run's settings as a YAML block under the text tag ``config``."""
    text = yaml.safe_dump(_plain(dict(config)), sort_keys=False)
    writer.add_text(CONFIG, f"```yaml\n{text}```", step)


# Settings that say where files go and how a run is logged and kept, not what it learns.
_NOT_HYPERPARAMETERS = frozenset({
    "config", "work_dir", "resume", "overwrite", "tensorboard", "workers", "log_interval",
    "checkpoint_interval", "keep_checkpoints", "panels", "export",
    "amp"})  # amp: the deprecated spelling of --precision


def hparams_of(config: Mapping[str, Any]) -> dict[str, Any]:
    """The settings of ``config`` that shape the result (HParams columns): all but where
    files go and how the run is logged and kept."""
    return {key: value for key, value in config.items() if key not in _NOT_HYPERPARAMETERS}


# HParams columns of a segmentation run. TensorBoard's table sorts the columns by name and
# shows the first five: these are the five that tell runs apart, named so that they sort
# in this order; the pretrained weights come sixth (one click away), the rest of the
# settings are in the run's ``config`` text.
HPARAM_COLUMNS = ("backbone", "crop", "inference", "iters", "lr", "pretrained")


def segmentation_hparams(training: Mapping[str, Any],
                         evaluation: Mapping[str, Any]) -> dict[str, Any]:
    """The HParams columns (:data:`HPARAM_COLUMNS`) of a training run or of an eval of its
    checkpoints: the model and recipe from ``training`` (its settings), the rest from
    ``evaluation`` (``iteration``, the ``inference`` settings, and ``lr`` when it differs
    from the recipe's, e.g. a default the run computed). TensorBoard takes the column list
    from one run, so every run of a work folder declares the same columns."""
    inference = evaluation.get("inference") or {}
    count = len(inference.get("scales", ()))
    # Short enough for the table's column ("3 scales+flip"); the scales are in the config.
    views = f"{count} scale{'s' if count != 1 else ''}" + ("+flip" if inference.get("flip") else "")
    lr = evaluation.get("lr", training.get("lr"))
    return {
        "backbone": training.get("backbone"),
        "crop": training.get("crop_size"),
        "inference": views,
        "iters": evaluation.get("iteration"),
        "lr": "default" if lr is None else lr,
        "pretrained": Path(training["pretrained"]).name if training.get("pretrained")
        else "none",
    }


# HParams columns of a pretraining run, named (as HPARAM_COLUMNS) so that TensorBoard's
# sorting by name shows these five first; the total batch (per device x processes) comes
# sixth, the rest of the settings are in the run's ``config`` text.
PRETRAINING_HPARAM_COLUMNS = ("backbone", "crop", "epochs", "lr", "mixing", "total_batch")


def pretraining_hparams(training: Mapping[str, Any], lr: float,
                        total_batch: int) -> dict[str, Any]:
    """The HParams columns (:data:`PRETRAINING_HPARAM_COLUMNS`) of a pretraining run from
    its settings ``training``, the learning rate it uses (a default it computed included)
    and its total batch. ``mixing`` names mixup and CutMix with their alphas, or none."""
    mixes = [f"{name} {training[key]:g}" for name, key in (("mixup", "mixup"),
                                                           ("cutmix", "cutmix"))
             if training.get(key)]
    return {
        "backbone": training.get("backbone"),
        "crop": training.get("crop_size"),
        "epochs": training.get("epochs"),
        "lr": lr,
        "mixing": "+".join(mixes) or "none",
        "total_batch": total_batch,
    }


def session_name(kind: str, work_dir: str | os.PathLike) -> str:
    """An HParams row's name: when the run started, what it is and its work folder
    (``18:03:12 train folder_resnest14 12-05``); the part that differs comes first, as
    TensorBoard shows only the start of it, and rows never share a name."""
    return f"{time.strftime('%H:%M:%S')} {kind} {Path(work_dir).name} {time.strftime('%m-%d')}"


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
                *, start: bool = True, end: bool = True, name: str = "") -> None:
    """This run's HParams session in its own event file: the settings in ``config`` as
    hyperparameters (in its order), the scalars ``metric_tags`` (which the run logs) as
    its metrics, ``name`` (:func:`session_name`) as the row's name. ``start`` writes the
    experiment and session start, ``end`` the session end, so that a training run is
    listed while it runs and marked finished when it ends."""
    from tensorboard.plugins.hparams import plugin_data_pb2
    from torch.utils.tensorboard.summary import hparams

    experiment, session_start, session_end = hparams(
        hparam_values(config), {tag: 0.0 for tag in metric_tags})
    if name:
        plugin = session_start.value[0].metadata.plugin_data
        content = plugin_data_pb2.HParamsPluginData.FromString(plugin.content)
        content.session_start_info.group_name = name
        plugin.content = content.SerializeToString()
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
