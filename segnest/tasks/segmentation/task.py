"""``segnest train``: DeepLabV3 on a ResNeSt backbone, the paper's recipe, as a task of the
training engine (:func:`segnest.engine.trainer.fit`).

Reads top to bottom: :func:`check_config` refuses settings that cannot work,
:class:`SegmentationTask` supplies the data, model, optimizer groups and schedule, with
:func:`train_one_step` as its step and single-scale evaluation of the validation split as
its validation (mIoU decides ``best.pt``); the engine does the rest (resume, checkpoints,
Ctrl-C, logging).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader

from segnest.data import SegEvalTransform, SegTrainTransform, build_dataset
from segnest.data.bad_samples import (
    BadSample,
    BadSamplePolicy,
    GuardedSamples,
    batch_usable,
    collate_guarded,
)
from segnest.data.census import check_train_labels
from segnest.data.sampling import EpochSampler, init_train_worker
from segnest.data.transforms import IGNORE_INDEX, channel_statistics
from segnest.engine.config import linear_lr
from segnest.engine.loop import Progress, stopped_message
from segnest.engine.optim import build_param_groups
from segnest.engine.process import check_run_flags, optimizer_step
from segnest.engine.schedule import PolyLR
from segnest.engine.state import BestMetric, RunState
from segnest.engine.task import BuiltModel, Training
from segnest.engine.trainer import fit
from segnest.engine.workdir import BEST_CHECKPOINT_NAME, LAST_CHECKPOINT_NAME
from segnest.errors import SegnestError
from segnest.inference.evaluate import evaluate
from segnest.inference.metrics import format_table, metric_warnings, percent
from segnest.inference.settings import InferenceSettings
from segnest.inference.tensorboard import (
    METRIC_TAGS,
    SEGMENTATION,
    TB_FOLDER,
    TRAIN_RUN,
    log_segmentation_results,
    segmentation_hparams,
)
from segnest.models import DeepLabV3, create_model, load_pretrained
from segnest.models.pixelwise import (
    FULL_SIZE,
    LOSS_UPSAMPLING,
    fuses_upsampling,
    loss_upsampling,
)
from segnest.models.registry import model_name
from segnest.models.weights import NAMED_WEIGHTS, resolve_pretrained
from segnest.runtime.distributed import DistInfo, broadcast_object
from segnest.runtime.files import write_text_atomic
from segnest.runtime.precision import autocast, precision_name
from segnest.runtime.tuning import Choice
from segnest.schema import FlagNames, validate
from segnest.tasks.segmentation.class_weights import class_weights_for, summary, write_class_weights
from segnest.tasks.segmentation.config import TRAIN_LR_RULE, TrainConfig
from segnest.tasks.segmentation.losses import Ohem, segmentation_loss


def check_config(cfg: TrainConfig, dist: DistInfo) -> TrainConfig:
    """Catch settings that cannot work before any data is read or weight is built: every
    flag's own rules (:func:`segnest.schema.validate` worded as flags, as the command line
    applies them, for callers from Python) and those that depend on the processes."""
    cfg = validate(cfg, FlagNames())
    if cfg.batch_size == 1 and not dist.distributed:
        raise SegnestError(
            "--batch-size 1 on a single device cannot train: the BatchNorm after the global "
            "pooling in Split-Attention (and in the ASPP image branch) needs at least 2 "
            "samples; use --batch-size 2 or more, or several devices with torchrun (SyncBN "
            "pools the statistics across them)")
    check_run_flags(cfg, dist.device)
    channel_statistics(cfg.in_channels, cfg.mean, cfg.std)
    if cfg.photometric and cfg.in_channels != 3:
        raise SegnestError(f"--photometric works on RGB images only; drop it for "
                           f"--in-channels {cfg.in_channels}")
    if cfg.data_root:  # stored absolute: eval and predict read it from other folders
        cfg = dataclasses.replace(cfg, data_root=str(Path(cfg.data_root).expanduser().resolve()))
    return cfg


def default_lr(cfg: TrainConfig, world_size: int) -> float:
    """0.01 for a total batch of 16 (the authors' distributed script), scaled linearly."""
    return linear_lr(TRAIN_LR_RULE, cfg.batch_size * world_size)


def model_kwargs_for(cfg: TrainConfig, num_classes: int) -> dict[str, Any]:
    """``create_model`` arguments of the segmentation model from the flags; what is not
    given keeps the model's own default."""
    kwargs: dict[str, Any] = dict(num_classes=num_classes, aux=cfg.aux,
                                  stage_width=cfg.stage_width)
    for name in ("output_stride", "head_channels", "stem_width"):
        if getattr(cfg, name) is not None:
            kwargs[name] = getattr(cfg, name)
    if cfg.in_channels != 3:
        kwargs["in_chans"] = cfg.in_channels
    return kwargs


def recorded_model_kwargs(model: DeepLabV3, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` with the defaults the model filled in made explicit: checkpoints store
    these, so a model rebuilds the same even if a default changes later."""
    return {**kwargs, "output_stride": model.backbone.output_stride,
            "head_channels": model.head_channels}


def make_loader(dataset, transform: SegTrainTransform, cfg: TrainConfig, dist: DistInfo,
                epoch: int, start_batch: int) -> DataLoader:
    """This rank's batches of ``epoch``, from batch ``start_batch`` on (a resumed run)."""
    transform.set_epoch(epoch)
    sampler = EpochSampler(len(dataset), cfg.seed, epoch, dist.rank, dist.world_size,
                           start=start_batch * cfg.batch_size)
    return DataLoader(
        GuardedSamples(dataset), batch_size=cfg.batch_size, sampler=sampler,
        num_workers=cfg.workers, collate_fn=collate_guarded, drop_last=True,
        pin_memory=dist.device.type == "cuda", worker_init_fn=init_train_worker,
        generator=torch.Generator().manual_seed(cfg.seed * 7919 + epoch),
    )


def train_one_step(model: nn.Module, batch: dict, optimizer: torch.optim.Optimizer,
                   scheduler: PolyLR, scaler: torch.amp.GradScaler, cfg: TrainConfig,
                   device: torch.device, class_weights: torch.Tensor | None = None,
                   precision: torch.dtype | None = None, upsample: bool | None = None
                   ) -> dict[str, float]:
    """One SGD step with the loss of ``cfg`` (``--loss``, ``--ohem-*``) and
    ``class_weights``; returns the loss (and auxiliary loss). A non-finite loss is returned
    without updating anything. The forward runs under autocast to ``precision`` (None:
    float32); the model hands back float32 logits, so the loss is float32. ``upsample``:
    whether the model upsamples its logits before the loss (else the loss upsamples them
    in bands; None: :func:`fuses_upsampling`'s default for the device)."""
    ohem = Ohem(cfg.ohem_thresh, cfg.ohem_min_kept) if cfg.loss == "ohem" else None
    image = batch["image"].to(device, non_blocking=True)
    target = batch["mask"].to(device, non_blocking=True)
    with autocast(device, precision):
        if upsample is None:
            upsample = not fuses_upsampling(device)
        outputs = model(image, upsample=upsample)
    loss, aux = segmentation_loss(outputs, target, cfg.aux_weight, class_weights, ohem)
    optimizer_step(loss, optimizer, scheduler, scaler)
    scalars = {"loss": loss.item()}
    if aux is not None:
        scalars["aux_loss"] = aux.item()
    return scalars


LOG_NAME = "train.log"
# The head segnest train puts on --backbone (segnest.models.registry): the paper's.
HEAD = "deeplabv3"


def default_work_dir(cfg: TrainConfig) -> Path:
    return Path(cfg.work_dir or f"runs/{cfg.dataset}_{cfg.backbone}")


def from_scratch_warning(cfg: TrainConfig) -> str | None:
    """The line that warns a new run on real data that its backbone starts from random
    weights: the paper's numbers assume ImageNet-pretrained backbones. Not for the mini set,
    whose demo pretrains its own backbone, nor for a resumed run."""
    if cfg.pretrained or cfg.resume or cfg.dataset == "mini":
        return None
    # Named weights fit their backbone at its published widths only.
    published = cfg.stage_width == TrainConfig.stage_width and cfg.stem_width is None
    named = [name for name, weights in NAMED_WEIGHTS.items()
             if weights.backbone == cfg.backbone and published]
    how = (f"pass --pretrained {' or '.join(named)} (ImageNet weights, fetched once into "
           "their cache; see docs/recipes.md)" if named
           else "pass --pretrained with a backbone from 'segnest pretrain --export'")
    return (f"warning: training {cfg.backbone} from scratch (no --pretrained): the paper's "
            "numbers assume an ImageNet-pretrained backbone; expect a far lower mIoU; " + how)


def run_train(cfg: TrainConfig) -> dict[str, Any]:
    """Train; returns the iteration reached, whether the run was interrupted (and by which
    signal), the best and last validation metrics and the work folder."""
    return fit(SegmentationTask(), cfg)


class SegmentationTask:
    """``segnest train`` on the engine: a DeepLabV3 model, the poly schedule, the
    segmentation loss, and mIoU on the validation split deciding ``best.pt``."""

    name = "segmentation"
    log_name = LOG_NAME
    tensorboard_run = TRAIN_RUN
    metric_tags = METRIC_TAGS
    scalar_namespace = SEGMENTATION
    # segnest 0.1 stored the best mIoU as a fraction; it is a percentage now.
    best_metric = BestMetric("mIoU", "best_miou", higher_is_better=True, fraction_scale=100.0)

    def __init__(self) -> None:
        self.warned_metrics: list[str] = []

    def check(self, cfg: TrainConfig, dist: DistInfo) -> TrainConfig:
        self.cfg = check_config(cfg, dist)
        self.bad_samples = BadSamplePolicy(self.cfg.skip_bad_samples, "training sample(s)",
                                           show=dist.is_main)
        if self.cfg.pretrained:  # fetched (or refused) before the work folder is touched
            resolve_pretrained(self.cfg.pretrained)
        return self.cfg

    def work_dir(self) -> Path:
        return default_work_dir(self.cfg)

    def prepare_data(self, dist: DistInfo) -> int:
        cfg = self.cfg
        mean, std = channel_statistics(cfg.in_channels, cfg.mean, cfg.std)
        self.train_transform = SegTrainTransform(
            cfg.base_size, cfg.crop_size, (cfg.scale_min, cfg.scale_max), cfg.cat_max_ratio,
            photometric=cfg.photometric, ignore_index=IGNORE_INDEX, seed=cfg.seed,
            mean=mean, std=std)
        self.train_set = build_dataset(cfg.dataset, cfg.data_root, "train",
                                       self.train_transform, cfg.label_map, cfg.in_channels)
        self.val_set = build_dataset(cfg.dataset, cfg.data_root, "val",
                                     SegEvalTransform(mean, std), cfg.label_map,
                                     cfg.in_channels)
        census = check_train_labels(self.train_set, cfg.skip_bad_samples, verbose=dist.is_main)
        # Python floats: the checkpoint stores them, and a resumed run must find the same.
        self.weights = class_weights_for(cfg.class_weights, self.train_set.classes,
                                         census.train_id_counts)
        self.class_weights = (None if self.weights is None else torch.tensor(
            self.weights, dtype=torch.float32, device=dist.device))
        iters_per_epoch = len(self.train_set) // (cfg.batch_size * dist.world_size)
        if iters_per_epoch == 0:
            raise SegnestError(
                f"the {cfg.dataset} train split has {len(self.train_set)} images, fewer than "
                f"one batch ({cfg.batch_size} x {dist.world_size} devices); lower --batch-size")
        return iters_per_epoch

    def total_iters(self, iters_per_epoch: int) -> int:
        cfg = self.cfg
        total_iters = cfg.iters or cfg.epochs * iters_per_epoch
        if cfg.warmup_iters > total_iters:
            raise SegnestError(f"--warmup-iters {cfg.warmup_iters} is longer than the run "
                               f"({total_iters} iterations: --epochs {cfg.epochs} of "
                               f"{iters_per_epoch}); lower --warmup-iters")
        return total_iters

    def build_model(self, dist: DistInfo) -> BuiltModel:
        cfg = self.cfg
        name = model_name(HEAD, cfg.backbone)
        kwargs = model_kwargs_for(cfg, self.train_set.num_classes)
        model = create_model(name, **kwargs)
        if cfg.pretrained:
            report = load_pretrained(model, cfg.pretrained)
            if dist.is_main:
                where = "" if str(report.path) == cfg.pretrained else f" ({report.path})"
                print(f"loaded {report.loaded} backbone tensors from {cfg.pretrained}{where}")
        elif dist.is_main and (warning := from_scratch_warning(cfg)):
            print(warning)
        if cfg.checkpoint_activations:
            model.set_grad_checkpointing(True)
        return BuiltModel(model, name, recorded_model_kwargs(model, kwargs))

    def default_lr(self, world_size: int) -> float:
        return default_lr(self.cfg, world_size)

    def param_groups(self, model: nn.Module, lr: float) -> list[dict[str, Any]]:
        cfg = self.cfg
        lr_mults = {"head": cfg.head_lr_mult}
        if model.aux_head is not None:
            lr_mults["aux_head"] = cfg.head_lr_mult
        return build_param_groups(model, lr, cfg.weight_decay, cfg.no_decay_norm, lr_mults)

    def schedule(self, optimizer: torch.optim.Optimizer, total_iters: int,
                 iters_per_epoch: int) -> PolyLR:
        cfg = self.cfg
        return PolyLR(optimizer, total_iters, cfg.poly_power, cfg.min_lr, cfg.warmup_iters)

    def record(self) -> dict[str, Any]:
        self.settings = InferenceSettings.for_training(self.cfg)
        return {"dataset": self.cfg.dataset, "classes": list(self.train_set.classes),
                "palette": [list(map(int, c)) for c in self.train_set.palette],
                "inference": dataclasses.asdict(self.settings),
                "class_weights": self.weights}

    def writer_hparams(self, training: Training) -> dict[str, Any]:
        cfg = self.cfg
        validation = {
            "checkpoint": str((training.work_dir / BEST_CHECKPOINT_NAME).resolve()),
            "iteration": training.total_iters, "dataset": cfg.dataset, "split": "val",
            "samples": cfg.val_samples, "inference": dataclasses.asdict(self.settings),
            "device": str(training.device), "world_size": training.dist.world_size,
            "lr": training.lr, "precision": precision_name(training.precision)}
        return segmentation_hparams(dataclasses.asdict(cfg), validation)

    def begin(self, training: Training) -> None:
        cfg, dist, work_dir = self.cfg, training.dist, training.work_dir
        self.val_interval = cfg.val_interval or max(1, training.total_iters // 10)
        self.loss_path = self._loss_path(training)
        if not dist.is_main:
            return
        if training.device.type == "cpu":
            print(f"hardware: {self.loss_path.line()}")
        write_text_atomic(work_dir / "config.yaml", yaml.safe_dump(dataclasses.asdict(cfg)))
        if self.weights is not None:
            write_class_weights(work_dir, self.weights, self.train_set.classes)
            print(summary(self.weights, self.train_set.classes, cfg.class_weights))
        print(f"training {training.model_name} on {cfg.dataset} ({len(self.train_set)} "
              f"images, {self.train_set.num_classes} classes) for {training.total_iters} "
              f"iterations, {dist.world_size} x {training.device}, batch "
              f"{cfg.batch_size}/device, lr {training.lr:g}, "
              f"{precision_name(training.precision)}; logs and checkpoints in {work_dir}")

    def _loss_path(self, training: Training) -> Choice:
        """How the loss takes the logits to full size (:func:`loss_upsampling`): as the
        checkpoint resumed recorded it, else measured on the main process; the same on
        every process, and recorded in the checkpoints (a resumed run continues exactly)."""
        cfg, run = self.cfg, training.run
        recorded = run.record["hardware"].get(LOSS_UPSAMPLING)
        if recorded is not None:
            return Choice(LOSS_UPSAMPLING, recorded, "recorded by the checkpoint resumed")
        choice = None
        if training.dist.is_main:
            choice = loss_upsampling(training.device, cfg.batch_size,
                                     self.train_set.num_classes, (cfg.crop_size, cfg.crop_size),
                                     align_corners=DeepLabV3.ALIGN_CORNERS)
        choice = broadcast_object(choice)
        run.record["hardware"] = {**run.record["hardware"], LOSS_UPSAMPLING: choice.chosen}
        return choice

    def batches(self, training: Training, epoch: int, start_batch: int) -> DataLoader:
        return make_loader(self.train_set, self.train_transform, self.cfg, training.dist,
                           epoch, start_batch)

    def step(self, training: Training, item: tuple[dict | None, list[BadSample]]
             ) -> dict[str, float] | None:
        cfg, dist = self.cfg, training.dist
        batch, bad = item
        self.bad_samples.check_all(bad)
        size = 0 if batch is None else batch["image"].shape[0]
        if cfg.skip_bad_samples and not batch_usable(size, dist.device, dist.distributed):
            return None
        return train_one_step(training.train_model, batch, training.optimizer,
                              training.scheduler, training.scaler, cfg, training.device,
                              self.class_weights, training.precision,
                              upsample=self.loss_path.chosen == FULL_SIZE)

    def validate_due(self, iteration: int) -> bool:
        return iteration % self.val_interval == 0

    def validate(self, training: Training, progress: Progress) -> dict[str, Any]:
        cfg, run, val_set = self.cfg, training.run, self.val_set
        progress.bar.clear()
        if not progress.terminal:  # a log has no bar: say what the pause is
            count = len(val_set) if cfg.val_samples is None else min(cfg.val_samples,
                                                                      len(val_set))
            progress.write(f"iter {run.iteration}: validating on {count} images")
        results, panels = evaluate(training.model, val_set, self.settings, training.device,
                                   samples=cfg.val_samples,
                                   panels=cfg.panels if training.writer else 0,
                                   progress=training.dist.is_main and progress.terminal,
                                   keep_bar=False, skip_bad_samples=cfg.skip_bad_samples)
        progress.write(f"iter {run.iteration}: val mIoU {percent(results['mIoU'])} "
                       f"pixAcc {percent(results['pixAcc'])} "
                       f"(best {percent(max(run.best, results['mIoU']))})")
        if not self.warned_metrics:  # the validation ground truth is the same each time
            self.warned_metrics.extend(metric_warnings(results, val_set.classes))
            for warning in self.warned_metrics:
                progress.write(f"warning: validation: {warning}")
        if training.writer is not None:
            log_segmentation_results(training.writer, results, self.train_set.classes,
                                     self.train_set.palette, panels, run.iteration)
        return results

    def lr_hint(self, training: Training) -> str:
        return f"Lower --lr (now {training.lr:g}), check the labels, or train in fp32"

    def finish(self, training: Training, finished: bool) -> dict[str, Any]:
        run = training.run
        skipped = self.bad_samples.total(training.device)
        if training.dist.is_main and (warning := self.bad_samples.summary(skipped)):
            print(warning)
        if training.dist.is_main:
            print(stopped_message(run, training.total_iters) if not finished
                  else _summary(run, self.train_set.classes))
        return {"iteration": run.iteration, "interrupted": not finished,
                "signal": run.stopped_by, "best_miou": run.best, "metrics": run.metrics,
                "work_dir": str(training.work_dir), "skipped_samples": skipped}


def _summary(run: RunState, classes: list[str]) -> str:
    """The end of a finished run: its best and last validation, and what to run next."""
    if not run.metrics:
        return f"finished at iteration {run.iteration}; checkpoints in {run.work_dir}"
    best = run.work_dir / BEST_CHECKPOINT_NAME
    chosen = best if best.is_file() else run.work_dir / LAST_CHECKPOINT_NAME
    lines = [f"last validation (iteration {run.iteration}, single scale):",
             format_table(run.metrics, classes),
             f"best val mIoU {percent(run.best)} at iteration {run.best_iteration}: {best}"
             if best.is_file() else f"no best.pt: no validation had finite weights; {chosen}",
             "next:",
             f"  segnest eval --checkpoint {chosen} --multi-scale --flip",
             f"  segnest predict IMAGES_OR_FOLDER --checkpoint {chosen} --out predictions"]
    if (run.work_dir / TB_FOLDER).is_dir():  # not after --no-tensorboard
        lines.append(f"  tensorboard --logdir {run.work_dir / TB_FOLDER}")
    return "\n".join(lines)

