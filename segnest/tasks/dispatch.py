"""``segnest eval``, ``segnest predict`` and ``segnest export`` for every task: the
checkpoint's task picks the evaluator and the predictor from :data:`TASK_COMMANDS`, the one
table that knows them, and the exporter (:func:`run_export`).

The task is read from the checkpoint (its ``task`` entry, or what its ``model_name``
builds for older files; :func:`segnest.models.factory.checkpoint_task`) without reading
its tensors. Exported models (ONNX, OpenVINO) are segmentation models. A flag given that
the checkpoint's task does not use (``--multi-scale`` for a classifier) is refused with
one line before any work, instead of being silently ignored.

Adding a task's eval or predict is one entry: a function taking the command's config
(``EvalConfig`` or ``PredictConfig``) and the flags (config field names) it honours.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from segnest.errors import SegnestError
from segnest.inference.backends import is_exported_model
from segnest.inference.config import EvalConfig, ExportConfig, PredictConfig
from segnest.inference.detection_export import export_detection
from segnest.inference.evaluate import run_eval as run_segmentation_eval
from segnest.inference.export import export_segmentation, prepare_export
from segnest.inference.predict import run_predict as run_segmentation_predict
from segnest.models.factory import checkpoint_task
from segnest.runtime.checkpoint import load_checkpoint
from segnest.runtime.distributed import resolve_device
from segnest.runtime.precision import resolve_precision
from segnest.schema import FlagNames, validate
from segnest.schema import flag as flag_name
from segnest.tasks.classification.evaluate import run_classification_eval
from segnest.tasks.classification.predict import run_classification_predict
from segnest.tasks.detection.evaluate import run_detection_eval
from segnest.tasks.detection.predict import run_detection_predict

# The flags every task's eval and predict take.
COMMON = frozenset({"checkpoint", "device", "precision", "skip_bad_samples"})
_CLASSIFICATION = COMMON | {"fuse_bn", "compile"}


@dataclass(frozen=True)
class TaskCommands:
    """How ``segnest eval`` and ``segnest predict`` handle one task's checkpoints: the
    function each runs and the flags (config field names) it honours."""

    trained_by: str  # the command that writes such checkpoints, for messages
    evaluate: Callable[[EvalConfig], Any]
    eval_flags: frozenset[str]
    predict: Callable[[PredictConfig], list[Path]]
    predict_flags: frozenset[str]


def _detection_eval(cfg: EvalConfig) -> dict[str, Any]:
    return run_detection_eval(load_checkpoint(cfg.checkpoint), cfg.checkpoint, cfg.out,
                              cfg.save_pred, cfg.device, cfg.data_root, cfg.split,
                              cfg.samples, cfg.skip_bad_samples)


_EVERY_EVAL_FLAG = frozenset(f.name for f in dataclasses.fields(EvalConfig))
_EVERY_PREDICT_FLAG = frozenset(f.name for f in dataclasses.fields(PredictConfig))

TASK_COMMANDS: dict[str, TaskCommands] = {
    "segmentation": TaskCommands("segnest train", run_segmentation_eval, _EVERY_EVAL_FLAG,
                                 run_segmentation_predict, _EVERY_PREDICT_FLAG),
    "classification": TaskCommands(
        "segnest pretrain", run_classification_eval,
        _CLASSIFICATION | {"data_root", "split", "out", "samples", "workers", "batch_size"},
        run_classification_predict, _CLASSIFICATION | {"inputs", "out"}),
    "detection": TaskCommands(
        "segnest train --model <architecture>", _detection_eval,
        COMMON - {"precision"} | {"data_root", "split", "out", "save_pred", "samples"},
        run_detection_predict, COMMON - {"precision"} | {"inputs", "out"}),
}


def task_of(path: str | Path) -> str:
    """The task of the checkpoint (or exported model) at ``path``; segmentation where the
    file does not say (its own command then explains what is wrong with it)."""
    if is_exported_model(path):
        return "segmentation"
    return checkpoint_task(load_checkpoint(path, mmap=True, verify=False)) or "segmentation"


def check_flags(cfg: Any, task: str, honoured: frozenset[str], command: str) -> None:
    """Refuse a flag given (not at its default) that ``task``'s ``command`` does not use."""
    for field in dataclasses.fields(cfg):
        default = (field.default_factory() if field.default_factory is not dataclasses.MISSING
                   else field.default)
        if field.name not in honoured and getattr(cfg, field.name) != default:
            raise SegnestError(
                f"{flag_name(field.name)} does not apply to {cfg.checkpoint}, a {task} "
                f"checkpoint (from {TASK_COMMANDS[task].trained_by}); segnest {command} of "
                f"a {task} checkpoint takes {_flags(honoured)}; drop {flag_name(field.name)}")


def _flags(names: frozenset[str]) -> str:
    return " ".join(sorted(flag_name(name) for name in names if name not in ("inputs",
                                                                            "checkpoint")))


def run_eval(cfg: EvalConfig) -> Any:
    """``segnest eval``: the evaluation of the checkpoint's task."""
    task = task_of(cfg.checkpoint)
    commands = TASK_COMMANDS[task]
    check_flags(cfg, task, commands.eval_flags, "eval")
    return commands.evaluate(cfg)


def run_predict(cfg: PredictConfig) -> list[Path]:
    """``segnest predict``: the predictions of the checkpoint's task."""
    cfg = validate(cfg, FlagNames())
    resolve_precision(cfg.precision, resolve_device(cfg.device))  # refused before any file
    task = task_of(cfg.checkpoint)
    commands = TASK_COMMANDS[task]
    check_flags(cfg, task, commands.predict_flags, "predict")
    return commands.predict(cfg)


def run_export(cfg: ExportConfig) -> Path:
    """``segnest export``: the exporter of the checkpoint's task (detection: ONNX boxes,
    labels, scores and masks; otherwise the segmentation exporter, which refuses what it
    cannot export), verified before the atomic write."""
    cfg, target, checkpoint = prepare_export(cfg)
    if checkpoint_task(checkpoint) == "detection":
        return export_detection(cfg, checkpoint, target)
    return export_segmentation(cfg, checkpoint, target)
