"""``segnest train``: the model decides the task. ``--model deeplabv3`` (the default)
trains segmentation (:mod:`segnest.tasks.segmentation`), the R-CNN models train detection
(:mod:`segnest.tasks.detection`); each with its own presets, the same engine."""

from __future__ import annotations

from typing import Any

from segnest.config import (
    DETECTION_MODELS,
    DETECTION_PRESETS,
    TrainConfig,
    load_recipe,
    resolve_config,
)


def _model_of(given: dict[str, Any]) -> str:
    recipe = load_recipe(given["config"], TrainConfig) if given.get("config") else {}
    return {**recipe, **given}.get("model", TrainConfig.model)


def resolve_train_config(cls: type, given: dict[str, Any],
                         presets: dict[str, dict[str, Any]] | None = None) -> TrainConfig:
    """The validated config of ``segnest train``: a detection model's from the detection
    presets (``--dataset`` coco unless given), segmentation's from
    :func:`segnest.tasks.segmentation.presets.resolve_train_config` with ``presets``."""
    if _model_of(given) in DETECTION_MODELS:
        recipe = load_recipe(given["config"], cls) if given.get("config") else {}
        if "dataset" not in given and "dataset" not in recipe:
            given = {**given, "dataset": "coco"}
        return resolve_config(cls, given, DETECTION_PRESETS)
    from segnest.tasks.segmentation.presets import resolve_train_config as segmentation

    return segmentation(cls, given, presets)


def run_train(cfg: TrainConfig) -> dict[str, Any]:
    """Train the task of ``cfg.model``; the task's result (see its ``run_*``)."""
    if cfg.model in DETECTION_MODELS:
        from segnest.tasks.detection.task import run_detection

        return run_detection(cfg)
    from segnest.tasks.segmentation.task import run_train as run_segmentation

    return run_segmentation(cfg)
