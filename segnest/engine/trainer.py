"""``fit(task, cfg)``: the one assembly of a training run, whatever the task.

The order is the same for every task: the process and work folder, the seed, the data and
the iterations per epoch, the model (pretrained weights, then SyncBN across processes), the
optimizer and schedule, the precision, the run state and its resume, the DDP/compile
wrapper, the writer, the task's banner, the loop, and the task's summary.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from segnest.engine.loop import run_loop
from segnest.engine.process import training_precision, training_process, wrap_for_training
from segnest.engine.state import RunState
from segnest.engine.task import Task, Training
from segnest.engine.workdir import run_folder
from segnest.engine.writer import close_writer, open_writer
from segnest.runtime.distributed import (
    DistInfo,
    broadcast_object,
    convert_sync_batchnorm,
    seed_everything,
)
from segnest.runtime.precision import grad_scaler, precision_name
from segnest.runtime.tuning import HardwareDecisions, apply_recorded, prepare_for_training


def fit(task: Task, cfg: Any) -> dict[str, Any]:
    """Train ``task`` with the shared flags of ``cfg`` (device, workers, seed, resume,
    overwrite, lr, momentum, precision, compile, tensorboard, intervals); return the task's
    result. The task's own settings are the task's business."""
    with training_process(cfg.device, cfg.workers) as dist:
        cfg = task.check(cfg, dist)
        with run_folder(task.work_dir(), dist, resume=cfg.resume, overwrite=cfg.overwrite,
                        log_name=task.log_name):
            training = _assemble(task, cfg, dist)
            finished = run_loop(
                training.run, total_iters=training.total_iters,
                batches=lambda epoch, start: task.batches(training, epoch, start),
                step=lambda batch: task.step(training, batch),
                validate_due=task.validate_due,
                validate=lambda progress: task.validate(training, progress),
                images_per_step=training.images_per_step,
                checkpoint_interval=cfg.checkpoint_interval,
                keep_checkpoints=cfg.keep_checkpoints, writer=training.writer,
                log_interval=cfg.log_interval, lr_hint=task.lr_hint(training),
                scalar_namespace=task.scalar_namespace)
            close_writer(training.writer, finished)
            return task.finish(training, finished)


def _assemble(task: Task, cfg: Any, dist: DistInfo) -> Training:
    device = dist.device
    seed_everything(cfg.seed, dist.rank)
    work_dir = task.work_dir()
    iters_per_epoch = task.prepare_data(dist)
    total_iters = task.total_iters(iters_per_epoch)
    built = task.build_model(dist)
    model = built.model.to(device)
    if dist.distributed:
        model = convert_sync_batchnorm(model, device)
    lr = cfg.lr if cfg.lr is not None else task.default_lr(dist.world_size)
    optimizer = torch.optim.SGD(task.param_groups(model, lr), lr=lr, momentum=cfg.momentum)
    scheduler = task.schedule(optimizer, total_iters, iters_per_epoch)
    precision = training_precision(cfg, device)
    scaler = grad_scaler(device, precision)
    decisions = prepare_for_training(model, device, precision)
    run = RunState(
        work_dir=work_dir, dist=dist, model=model, optimizer=optimizer, scheduler=scheduler,
        scaler=scaler, iters_per_epoch=iters_per_epoch, best_metric=task.best_metric,
        identity={"task": task.name, "model_name": built.name, "model_kwargs": built.kwargs},
        record={**task.record(), "precision": precision_name(precision),
                "config": dataclasses.asdict(cfg)})
    run.resume(cfg.resume)
    _hardware_decisions(run, model, decisions, device, precision)
    training = Training(
        cfg=cfg, dist=dist, work_dir=work_dir, model=model,
        train_model=wrap_for_training(model, dist, cfg.compile), model_name=built.name,
        optimizer=optimizer, scheduler=scheduler, scaler=scaler, precision=precision, lr=lr,
        iters_per_epoch=iters_per_epoch, total_iters=total_iters, run=run)
    training.writer = open_writer(work_dir, dist, cfg.tensorboard, task.tensorboard_run,
                                  dataclasses.asdict(cfg), task.metric_tags, run.iteration,
                                  hparams=task.writer_hparams(training))
    task.begin(training)
    training.train_model.train()
    return training



def _hardware_decisions(run: RunState, model: nn.Module, decisions: HardwareDecisions,
                        device: torch.device, precision: torch.dtype | None) -> None:
    """The hardware decisions the run trains with, the same on every process and across a
    resume: those of the checkpoint resumed where it recorded them, else the main
    process's; applied to ``model`` and recorded in every checkpoint (``hardware``)."""
    restored = run.restored_hardware
    hardware = broadcast_object({**decisions.record(), **restored})
    apply_recorded(model, hardware)
    run.record["hardware"] = hardware
    if run.dist.is_main and precision is not None and device.type == "cpu":
        for choice in decisions.choices:
            line = (f"{choice.what}: {hardware[choice.what]} (recorded by the checkpoint "
                    "resumed)" if choice.what in restored else choice.line())
            print(f"hardware: {line}")
