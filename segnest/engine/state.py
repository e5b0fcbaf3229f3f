"""What a run saves, restores and checks on resume (:class:`RunState`), and the metric that
decides ``best.pt`` (:class:`BestMetric`, supplied by the task).

What ``--resume`` takes from the checkpoint: the weights, the optimizer's momentum buffers,
the grad scaler, the iteration and sample position, the best metric and every rank's random
generators. What it takes from the command line: everything else, so the learning-rate
schedule is rebuilt for the length, learning rate and schedule flags given now and continues
from the stored iteration (``--iters 6`` after a 2-iteration run trains iterations 3-6 of a
6-iteration schedule). Changes that cannot continue the run exactly are refused: another
model, batch size, seed, number of processes or training set size.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

import segnest
from segnest.engine.rng import restore_rng_state
from segnest.engine.workdir import (
    BEST_CHECKPOINT_NAME,
    LAST_CHECKPOINT_NAME,
    find_resume_checkpoint,
    periodic_checkpoint_name,
    prune_periodic_checkpoints,
)
from segnest.errors import SegnestError
from segnest.runtime.checkpoint import load_checkpoint, save_checkpoint
from segnest.runtime.distributed import (
    DistInfo,
)
from segnest.runtime.record import CheckpointRecord


@dataclass(frozen=True)
class BestMetric:
    """The validation metric that decides ``best.pt``: its ``name`` among the task's
    validation metrics, its direction, and the checkpoint key that holds its best value
    (the one segnest 0.1 wrote too, so earlier checkpoints resume with their best).
    ``fraction_scale`` converts a best that a checkpoint without ``metric_unit: percent``
    stored as a fraction (segnest 0.1's mIoU) to this run's unit."""

    name: str
    checkpoint_key: str
    higher_is_better: bool = True
    fraction_scale: float = 1.0

    @property
    def worst(self) -> float:
        return -math.inf if self.higher_is_better else math.inf

    def improves(self, value: float, best: float) -> bool:
        return value > best if self.higher_is_better else value < best

    def stored_best(self, record: CheckpointRecord) -> float:
        """The best value a checkpoint holds (the worst possible when it holds none)."""
        if self.checkpoint_key not in record.extra:
            return self.worst
        value = float(record.extra[self.checkpoint_key])
        return value if record.metric_unit == "percent" else value * self.fraction_scale


def parameters_finite(model: nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())



# Settings that fix the sample order: a run resumed with others would not continue exactly.
_FIXED_ON_RESUME = ("batch_size", "seed")
# What the record holds that the run computed from its data (the class weights of
# --class-weights auto): a resumed run must arrive at the same.
_RECORD_FIXED_ON_RESUME = ("class_weights",)
# Settings that say where and how to resume, not what to train.
_NOT_COMPARED_ON_RESUME = ("resume", "overwrite", "config")



class RunState:
    """What a training run saves, restores and checks on resume.

    ``identity`` (task, model name and constructor arguments) must match on resume; the
    model, optimizer buffers and grad scaler are restored with the iteration, the sample
    position, the best validation metric (``best_metric``: the task's, stored under its
    ``checkpoint_key``) and every rank's random
    generators; the schedule continues from the stored iteration with the settings given
    now (see the module's docstring). ``record`` holds what a later command reads from the
    checkpoint (classes, palette, dataset, the command's configuration as ``config``, ...).

    ``iteration`` counts optimizer steps, ``position`` the batches drawn: a batch skipped
    for bad samples advances the position but not the iteration.
    """

    def __init__(self, *, work_dir: Path, dist: DistInfo, model: nn.Module,
                 optimizer: torch.optim.Optimizer, scheduler: Any, scaler: torch.amp.GradScaler,
                 identity: dict[str, Any], iters_per_epoch: int, best_metric: BestMetric,
                 record: dict[str, Any]) -> None:
        self.work_dir, self.dist, self.model = work_dir, dist, model
        self.optimizer, self.scheduler, self.scaler = optimizer, scheduler, scaler
        self.identity, self.iters_per_epoch = identity, iters_per_epoch
        self.best_metric, self.record = best_metric, record
        self.iteration = 0
        self.position = 0
        self.best = best_metric.worst
        self.best_iteration: int | None = None
        self.saved_iteration: int | None = None
        self.metrics: dict[str, Any] = {}
        self.stopped_by: str | None = None
        # The hardware decisions of the checkpoint resumed (empty for a new run).
        self.restored_hardware: dict[str, str] = {}

    @property
    def epoch(self) -> int:
        return self.position // self.iters_per_epoch

    def resume(self, resume: str | None) -> Path | None:
        """Restore from ``--resume PATH`` or the newest checkpoint of ``--resume auto``;
        returns the file used (None for a fresh run)."""
        if resume is None:
            return None
        path = find_resume_checkpoint(self.work_dir) if resume == "auto" else Path(resume)
        if path is None:  # --resume auto on a first run: a new run, nothing worth saying
            return None
        record = CheckpointRecord.read(load_checkpoint(path))
        self._check_compatible(path, record)
        self.model.load_state_dict(record.weights)
        self._restore_optimizer(path, record.optimizer)
        if record.scaler or not self.scaler.is_enabled():
            # A run trained without a scaler (fp32, bf16) stored an empty one; fp16 starts one.
            self.scaler.load_state_dict(record.scaler)
        self.iteration = int(record.iteration)
        self.position = int(record.position if record.position is not None else self.iteration)
        self.scheduler.resume_at(self.iteration)
        self.best = self.best_metric.stored_best(record)
        self.best_iteration = record.best_iteration
        self.restored_hardware = dict(record.hardware or {})
        if path.resolve() == (self.work_dir / LAST_CHECKPOINT_NAME).resolve():
            self.saved_iteration = self.iteration
        self.metrics = dict(record.metrics)
        restore_rng_state(record.rng[self.dist.rank])
        if self.dist.is_main:
            print(f"resumed from {path} at iteration {self.iteration}")
            stored_precision = record.precision or "fp32"
            if "precision" in self.record and stored_precision != self.record["precision"]:
                print(f"precision: the checkpoint was trained in {stored_precision}, this run "
                      f"continues in {self.record['precision']} (the fp32 weights carry over)")
            changed = self._changed_settings(record.config)
            if changed:
                print("settings changed since that checkpoint, taken from this command: "
                      + ", ".join(changed) + f"; the schedule continues at iteration "
                      f"{self.iteration} of {self.scheduler.total_iters}")
        return path

    def _restore_optimizer(self, path: Path, stored: dict[str, Any]) -> None:
        """The stored buffers (momentum) with the hyperparameters given now (learning rate,
        momentum, weight decay), which ``load_state_dict`` alone would replace."""
        given = [{k: v for k, v in group.items() if k != "params"}
                 for group in self.optimizer.param_groups]
        try:
            self.optimizer.load_state_dict(stored)
        except ValueError as err:
            raise SegnestError(
                f"--resume {path}: the optimizer's parameter groups differ from this run's "
                f"({err}); resume with the same --no-decay-norm setting") from err
        for group, settings in zip(self.optimizer.param_groups, given, strict=True):
            group.update(settings)

    def _changed_settings(self, stored: Mapping[str, Any]) -> list[str]:
        current = self.record.get("config") or {}
        return [f"{key} {stored[key]!r} -> {value!r}" for key, value in current.items()
                if key in stored and key not in _NOT_COMPARED_ON_RESUME
                and stored[key] != value]

    def _check_compatible(self, path: Path, record: CheckpointRecord) -> None:
        stored = {"task": record.task or "segmentation", "model_name": record.model_name,
                  "model_kwargs": record.model_kwargs}
        if stored != self.identity:
            raise SegnestError(
                f"--resume {path} was trained as {stored['task']} {stored['model_name']} "
                f"{stored['model_kwargs']}, not {self.identity['task']} "
                f"{self.identity['model_name']} {self.identity['model_kwargs']}; resume with the "
                "same backbone, dataset and model flags, or start a new --work-dir")
        ranks = len(record.rng or ())
        if ranks != self.dist.world_size:
            raise SegnestError(
                f"--resume {path} was written by {ranks} process(es), this run has "
                f"{self.dist.world_size}; resume with the same number of processes to "
                "continue exactly")
        stored_config, config = record.config, self.record.get("config") or {}
        for key in _FIXED_ON_RESUME:
            if key in stored_config and key in config and stored_config[key] != config[key]:
                flag = "--" + key.replace("_", "-")
                raise SegnestError(
                    f"--resume {path} was trained with {flag} {stored_config[key]}, this run "
                    f"has {config[key]}; the run cannot continue exactly with another {flag}: "
                    f"resume with {flag} {stored_config[key]}, or start a new --work-dir")
        for key in _RECORD_FIXED_ON_RESUME:
            if key in self.record and getattr(record, key) != self.record[key]:
                raise SegnestError(
                    f"--resume {path} was trained with {key.replace('_', ' ')} "
                    f"{getattr(record, key)}, this run has {self.record[key]}; the run cannot "
                    f"continue exactly: resume with the same --{key.replace('_', '-')} and "
                    "training data (the work folder's class_weights.txt holds the stored ones), "
                    "or start a new --work-dir")
        stored_epoch = record.iters_per_epoch or self.iters_per_epoch
        if stored_epoch != self.iters_per_epoch:
            raise SegnestError(
                f"--resume {path} was written by a run of {stored_epoch} iterations per epoch, "
                f"this one has {self.iters_per_epoch}: the training set or the batch size "
                "changed; resume on the same data with the same --batch-size")

    def payload(self, rng: list[dict]) -> dict[str, Any]:
        """The checkpoint dict: the task's record and the model's identity, the weights and
        where the run stands (:class:`~segnest.runtime.record.CheckpointRecord`)."""
        record = CheckpointRecord.read({**self.record, **self.identity})
        record.weights = self.model.state_dict()
        record.iteration, record.position = self.iteration, self.position
        record.epoch = self.epoch  # completed epochs
        record.iters_per_epoch = self.iters_per_epoch
        record.optimizer = self.optimizer.state_dict()
        record.scheduler = self.scheduler.state_dict()
        record.scaler = self.scaler.state_dict()
        record.rng = rng
        record.extra[self.best_metric.checkpoint_key] = self.best
        record.best_metric, record.best_iteration = self.best_metric.name, self.best_iteration
        record.metrics, record.metric_unit = self.metrics, "percent"
        record.segnest_version = segnest.__version__
        return record.state()

    def save(self, rng: list[dict], *, best: bool, keep: int) -> bool:
        """Write ``last.pt`` (and ``best.pt``, and a kept ``iter_<N>.pt``) on rank 0;
        nothing when the weights are not finite (returns False then)."""
        if not self.dist.is_main:
            return True
        if not parameters_finite(self.model):
            print(f"warning: not saving iteration {self.iteration}: the weights are not "
                  "finite", file=sys.stderr)
            return False
        state = self.payload(rng)
        if best:
            save_checkpoint(state, self.work_dir / BEST_CHECKPOINT_NAME)
        save_checkpoint(state, self.work_dir / LAST_CHECKPOINT_NAME)
        if keep:
            save_checkpoint(state, self.work_dir / periodic_checkpoint_name(self.iteration))
            prune_periodic_checkpoints(self.work_dir, keep)
        self.saved_iteration = self.iteration
        return True
