"""What a task tells the engine: the :class:`Task` protocol and the :class:`Training` it is
handed, the pieces :func:`segnest.engine.trainer.fit` built for the run.

A task is one object per run (it keeps its datasets between the calls). The engine calls,
in order: :meth:`Task.check`, :meth:`Task.work_dir`, :meth:`Task.prepare_data`,
:meth:`Task.total_iters`, :meth:`Task.build_model`, :meth:`Task.default_lr`,
:meth:`Task.param_groups`, :meth:`Task.schedule`, :meth:`Task.record`,
:meth:`Task.writer_hparams`, :meth:`Task.begin`; then, in the loop,
:meth:`Task.batches`, :meth:`Task.step`, :meth:`Task.validate`; and
:meth:`Task.finish` at the end.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from segnest.engine.loop import Progress
from segnest.engine.state import BestMetric, RunState
from segnest.runtime.distributed import DistInfo


@dataclass(frozen=True)
class BuiltModel:
    """A task's model with the name and constructor arguments that rebuild it
    (``create_model(name, **kwargs)``): a checkpoint stores both, resume compares them."""

    model: nn.Module
    name: str
    kwargs: dict[str, Any]


@dataclass
class Training:
    """The pieces of one run, as :func:`segnest.engine.trainer.fit` assembled them.

    ``model`` holds the weights and the state dict; ``train_model`` is what trains (the
    model in DDP and/or compiled). ``precision`` is the autocast dtype (None: float32).
    """

    cfg: Any
    dist: DistInfo
    work_dir: Path
    model: nn.Module
    train_model: nn.Module
    model_name: str
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    precision: torch.dtype | None
    lr: float
    iters_per_epoch: int
    total_iters: int
    run: RunState
    writer: Any | None = None

    @property
    def device(self) -> torch.device:
        return self.dist.device

    @property
    def images_per_step(self) -> int:
        """Images per iteration over all processes (``--batch-size`` is per process)."""
        return self.cfg.batch_size * self.dist.world_size


class Task(Protocol):
    """One kind of training (segmentation, classification, ...) on the shared engine.

    ``name`` is stored in checkpoints as ``task`` (resume refuses another);
    ``log_name`` is the console copy in the work folder, ``tensorboard_run`` the run's
    TensorBoard folder under ``tb/``, ``metric_tags`` its HParams metrics,
    ``scalar_namespace`` the TensorBoard namespace of its training scalars
    (``<namespace>/loss``, see :func:`segnest.inference.tensorboard.training_tag`) and
    ``best_metric`` the validation metric that picks ``best.pt``.
    """

    name: str
    log_name: str
    tensorboard_run: str
    metric_tags: tuple[str, ...]
    scalar_namespace: str
    best_metric: BestMetric

    def check(self, cfg: Any, dist: DistInfo) -> Any:
        """Refuse settings that cannot work, before any data is read; return the checked
        config (the task keeps it: the calls below read it)."""

    def work_dir(self) -> Path:
        """The run's work folder."""

    def prepare_data(self, dist: DistInfo) -> int:
        """Build the datasets; return this rank's iterations per epoch (at least 1)."""

    def total_iters(self, iters_per_epoch: int) -> int:
        """The length of the run in iterations."""

    def build_model(self, dist: DistInfo) -> BuiltModel:
        """The model on the CPU, with its pretrained weights if asked for."""

    def default_lr(self, world_size: int) -> float:
        """The learning rate when none is given."""

    def param_groups(self, model: nn.Module, lr: float) -> list[dict[str, Any]]:
        """The SGD parameter groups (lr multipliers, weight decay)."""

    def schedule(self, optimizer: torch.optim.Optimizer, total_iters: int,
                 iters_per_epoch: int) -> Any:
        """The learning-rate schedule, stepped every iteration; it has ``resume_at``."""

    def record(self) -> dict[str, Any]:
        """What the checkpoint holds for later commands (classes, dataset, ...)."""

    def writer_hparams(self, training: Training) -> Mapping[str, Any] | None:
        """The HParams of the run (None: the settings of the config that shape it)."""

    def begin(self, training: Training) -> None:
        """Start the run: files beside the checkpoints, the banner (rank 0)."""

    def batches(self, training: Training, epoch: int, start_batch: int) -> Iterable[Any]:
        """This rank's batches of ``epoch`` from ``start_batch`` on."""

    def step(self, training: Training, batch: Any) -> dict[str, float] | None:
        """Train on one batch; its scalars (``loss`` first), or None for a skipped batch."""

    def validate_due(self, iteration: int) -> bool:
        """Whether the run validates after ``iteration``."""

    def validate(self, training: Training, progress: Progress) -> Mapping[str, Any]:
        """The named validation metrics, ``best_metric.name`` among them."""

    def lr_hint(self, training: Training) -> str:
        """What to try when the loss stops being finite."""

    def finish(self, training: Training, finished: bool) -> dict[str, Any]:
        """The end-of-run summary (printed on rank 0) and the command's result."""
