"""``segnest train``: the model decides the task. ``--model deeplabv3`` (the default)
trains segmentation (:mod:`segnest.tasks.segmentation`), the R-CNN models train detection
(:mod:`segnest.tasks.detection`); each with its own settings class, presets and rules, on
the same engine.

The command's flags are those of every task's settings (:class:`TrainFlags`, for the parser
and --help); :func:`resolve_train_config` builds and validates the settings of the task of
``--model``, refusing in one line a flag or recipe key that task does not read. Torch-free
at import: the command line builds its parser from here."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from segnest.commands.config import load_recipe, resolve_config
from segnest.errors import SegnestError
from segnest.presets import DATASETS
from segnest.schema import FlagNames, flag, help_
from segnest.tasks.detection.config import (
    DETECTION_DATASETS,
    DETECTION_LR_RULE,
    DETECTION_MODELS,
    DETECTION_PRESETS,
    DetectionConfig,
)
from segnest.tasks.segmentation.config import (
    HELP_PRESETS,
    SEGMENTATION_MODELS,
    TrainConfig,
)

TRAIN_MODELS = SEGMENTATION_MODELS + DETECTION_MODELS
TRAIN_DATASETS = DATASETS + tuple(d for d in DETECTION_DATASETS if d not in DATASETS)
# --model -> the settings class of its task.
TASK_SETTINGS: dict[str, type] = {**dict.fromkeys(SEGMENTATION_MODELS, TrainConfig),
                                  **dict.fromkeys(DETECTION_MODELS, DetectionConfig)}
# How a refusal names the models of a task's settings.
TASK_MODELS = {TrainConfig: "segmentation (--model deeplabv3)",
               DetectionConfig: "detection models (--model mask_rcnn, ...)"}


def _shown_default(cls: type, name: str) -> str:
    return next(f for f in fields(cls) if f.name == name).metadata["default_shown"]


@dataclass
class TrainFlags(DetectionConfig, TrainConfig):
    """``segnest train``: DeepLabV3 segmentation or R-CNN detection on a ResNeSt backbone
    with the paper's recipes.

    The flags of every task, for the parser and --help only: never validated as such
    (:func:`resolve_train_config` builds the settings of ``--model``'s task). The fields
    both tasks declare are restated here with the help that names both."""

    help_presets = {**HELP_PRESETS, "coco": DETECTION_PRESETS["coco"],
                    "mini detection": DETECTION_PRESETS["mini"]}

    model: str = field(default=SEGMENTATION_MODELS[0], metadata=help_(
        "deeplabv3 trains segmentation; faster_rcnn, mask_rcnn, cascade_rcnn or "
        "cascade_mask_rcnn train COCO-format detection (docs/detection.md)",
        choices=TRAIN_MODELS))
    dataset: str = field(default=TrainConfig.dataset, metadata=help_(
        "dataset (coco: detection models only)", choices=TRAIN_DATASETS))
    data_root: str | None = field(default=None, metadata=help_(
        "dataset root, stored absolute (see datasets/README.md)",
        default_shown=_shown_default(TrainConfig, "data_root") + "; coco: required"))
    lr: float | None = field(default=None, metadata=help_(
        "base learning rate", above=0,
        default_shown=_shown_default(TrainConfig, "lr") + "; detection models: "
        f"{DETECTION_LR_RULE[0]:g} x total batch / {DETECTION_LR_RULE[1]}"))
    val_interval: int | None = field(default=None, metadata=help_(
        "validate every N iterations", min=1,
        default_shown=_shown_default(TrainConfig, "val_interval") + "; detection: a tenth of "
        "the run"))
    work_dir: str | None = field(default=None, metadata=help_(
        "output folder", default_shown=_shown_default(TrainConfig, "work_dir")
        + "; detection: " + _shown_default(DetectionConfig, "work_dir")))


def _user_values(given: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
    """(the recipe's keys then the command line's over them, the recipe as messages name
    it)."""
    if not given.get("config"):
        return dict(given), None
    return {**load_recipe(given["config"], TrainFlags), **given}, f"recipe {given['config']}"


def settings_class(given: dict[str, Any]) -> type:
    """The settings class of the task ``given`` (flags, and the recipe they name) trains,
    after refusing in one line a dataset of the other task or a setting it does not read."""
    user, recipe = _user_values(given)
    model = user.get("model", TrainFlags.model)
    if not isinstance(model, str) or model not in TASK_SETTINGS:
        raise SegnestError(f"--model {model!r} is not one of {', '.join(TRAIN_MODELS)}; pick "
                           "one of those")
    cls = TASK_SETTINGS[model]
    dataset = user.get("dataset")
    dataset = dataset if isinstance(dataset, str) else None  # a wrong type: validation's
    if cls is DetectionConfig and dataset in set(DATASETS) - set(DETECTION_DATASETS):
        raise SegnestError(f"--dataset {dataset!r} is a segmentation dataset; --model {model} "
                           "trains on --dataset coco (with --data-root, or own data with "
                           "--train-ann, --train-images, --val-ann, --val-images) or mini")
    if cls is TrainConfig and dataset in set(DETECTION_DATASETS) - set(DATASETS):
        raise SegnestError(f"--dataset {dataset!r} is a detection dataset; give --model "
                           f"{', '.join(DETECTION_MODELS)}, or a segmentation dataset")
    known = {f.name for f in fields(cls)}
    flags = {f.name for f in fields(TrainFlags)}
    for name in user:
        if name not in known and name in flags:
            where = (FlagNames({name: recipe}).show(name, user[name])
                     if recipe and name not in given else flag(name))
            other = TASK_MODELS[TrainConfig if cls is DetectionConfig else DetectionConfig]
            raise SegnestError(f"{where} applies to {other} only, not to --model {model}; "
                               "drop it")
    return cls


def resolve_train_config(cls: type, given: dict[str, Any],
                         presets: dict[str, dict[str, Any]] | None = None) -> Any:
    """The validated settings of ``segnest train`` for the task of ``--model``: a detection
    model's from the detection presets (``--dataset`` coco unless given), segmentation's
    from :func:`segnest.tasks.segmentation.presets.resolve_train_config` with ``presets``.
    ``cls`` (the command's flags class) is not used: the model picks the class."""
    task = settings_class(given)
    if task is DetectionConfig:
        return resolve_config(DetectionConfig, given, DETECTION_PRESETS)
    from segnest.tasks.segmentation.presets import resolve_train_config as segmentation

    return segmentation(TrainConfig, given, presets)


def run_train(cfg: TrainConfig | DetectionConfig) -> dict[str, Any]:
    """Train the task of ``cfg`` (its settings class); the task's result (see its
    ``run_*``)."""
    if isinstance(cfg, DetectionConfig):
        from segnest.tasks.detection.task import run_detection

        return run_detection(cfg)
    from segnest.tasks.segmentation.task import run_train as run_segmentation

    return run_segmentation(cfg)
