"""The settings of ``segnest bench`` and ``segnest demo``, declared with their rules
(:mod:`segnest.schema`).

Torch-free: the command line imports it to build its flags."""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field

from segnest.errors import SegnestError
from segnest.presets import DATASET_PRESETS
from segnest.schema import (
    DEVICE,
    DEVICE_HELP,
    MIN_INPUT_SIZE,
    PRECISION_HELP,
    PRECISIONS,
    Names,
    help_,
)
from segnest.tasks.detection.config import DETECTION_PRESETS

BENCH_MODES = ("infer", "train")
DEMO_TASKS = ("segmentation", "detection")


def _known_model(cfg: BenchConfig, names: Names) -> None:
    from segnest.models import list_models

    if cfg.model not in list_models():
        close = difflib.get_close_matches(cfg.model, list_models(), n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise SegnestError(f"unknown {names.show('model', cfg.model)}; {hint}'segnest models' "
                           "lists the valid names")


@dataclass
class BenchConfig:
    """``segnest bench``: speed, memory and achieved FLOP/s of a model."""

    checks = (_known_model,)

    model: str = field(default="deeplabv3_resnest50", metadata=help_("model name"))
    size: int = field(default=512, metadata=help_("input side", min=MIN_INPUT_SIZE))
    batch: int = field(default=2, metadata=help_("batch size", min=1))
    mode: str = field(default="infer", metadata=help_("what to time", choices=BENCH_MODES))
    compile: bool = field(default=False, metadata=help_("torch.compile the model"))
    fuse_bn: bool = field(default=True, metadata=help_("fold BN into convs for inference"))
    checkpoint_activations: bool = field(default=False, metadata=help_("activation checkpointing"))
    precision: str = field(
        default="fp32", metadata=help_(PRECISION_HELP + "; the conv probe runs in the same",
                                       choices=PRECISIONS))
    warmup: int = field(default=2, metadata=help_("untimed runs", min=0))
    runs: int = field(default=5, metadata=help_("timed runs (median reported)", min=1))
    num_classes: int = field(default=150, metadata=help_("classes of the head", min=1))
    json: bool = field(default=False, metadata=help_("print one JSON object"))
    device: str | None = field(default=None, metadata=help_(DEVICE_HELP, pattern=DEVICE))


@dataclass
class DemoConfig:
    """``segnest demo``: the whole pipeline on bundled data, in minutes, on a CPU."""

    task: str = field(default="segmentation", metadata=help_(
        "segmentation: pretrain a ResNeSt-14, train DeepLabV3 on it; detection: train Mask "
        "R-CNN-ResNeSt-14 on the mini detection set, report box and mask AP",
        choices=DEMO_TASKS))
    work_dir: str = field(default="runs/demo", metadata=help_("output folder"))
    pretrain_epochs: int = field(
        default=15, metadata=help_("classification pretraining epochs", min=1)
    )
    iters: int | None = field(default=None, metadata=help_(
        f"training iterations (default: the mini presets': {DATASET_PRESETS['mini']['iters']} "
        f"segmentation, {DETECTION_PRESETS['mini']['iters']} detection)", min=1))
    compare_scratch: bool = field(
        default=False,
        metadata=help_("also train from scratch with the same budget and report both"),
    )
    workers: int = field(default=2, metadata=help_("data loader workers", min=0))
    precision: str = field(
        default="fp32",
        metadata=help_(PRECISION_HELP + "; for pretraining, training and evaluation",
                       choices=PRECISIONS))
    device: str | None = field(default=None, metadata=help_(DEVICE_HELP, pattern=DEVICE))
