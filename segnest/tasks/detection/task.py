"""``segnest train --model faster_rcnn|mask_rcnn|cascade_rcnn|cascade_mask_rcnn``:
detection and instance segmentation on the shared engine.

The recipe is the authors' (their detectron2 configs, see
:mod:`segnest.models.detection.rcnn`): SGD with momentum 0.9, lr 0.02 for 16 images
(scaled linearly with the total batch), weight decay 1e-4 (none on norm layers),
linear warmup over 1000 iterations from 0.001 x lr, and the lr divided by 10 at 2/3 and
8/9 of the run (1x: 90k iterations, steps at 60k and 80k). Images are flipped
horizontally at random; the model draws the short side from 640-800 itself. Validation
is COCO AP through pycocotools on the validation annotation file; ``bbox_AP`` picks
``best.pt``.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader

from segnest.data.coco import CocoDetection, check_coco, coco_source, collate_detection
from segnest.data.mini import ensure_mini_detection
from segnest.data.sampling import EpochSampler, SeededSamples, init_train_worker
from segnest.engine.loop import Progress, stopped_message
from segnest.engine.optim import build_param_groups
from segnest.engine.process import check_run_flags, optimizer_step
from segnest.engine.schedule import WarmupStepLR
from segnest.engine.state import BestMetric
from segnest.engine.task import BuiltModel, Training
from segnest.engine.trainer import fit
from segnest.engine.workdir import BEST_CHECKPOINT_NAME, LAST_CHECKPOINT_NAME
from segnest.errors import SegnestError
from segnest.inference.coco import format_table
from segnest.models import create_model
from segnest.models.detection.rcnn import ARCHITECTURES
from segnest.runtime.distributed import DistInfo
from segnest.runtime.files import write_text_atomic
from segnest.runtime.precision import autocast, precision_name
from segnest.tasks.detection.evaluate import evaluate_detection

DATASETS = ("coco", "mini")
LOG_NAME = "train.log"
TENSORBOARD_RUN = "detection"
# 1x: lr steps at 60k and 80k of 90k iterations.
LR_STEPS = (2 / 3, 8 / 9)
WARMUP_ITERS, WARMUP_RATIO = 1000, 0.001
BASE_LR, BASE_BATCH = 0.02, 16


def is_detection_model(model: str | None) -> bool:
    return model in ARCHITECTURES


def _sizes(text: str | None) -> tuple[int, ...] | None:
    if not text:
        return None
    try:
        return tuple(int(part) for part in str(text).split(","))
    except ValueError as error:
        raise SegnestError(f"--train-min-size '{text}': give sizes like 640,800") from error


def detection_sources(cfg: Any):
    """(train, val) CocoSources of ``--dataset`` or of the own-data flags."""
    own = any(getattr(cfg, name) for name in ("train_ann", "train_images", "val_ann",
                                              "val_images"))
    if own:
        return (coco_source(annotations=cfg.train_ann, images=cfg.train_images),
                coco_source(annotations=cfg.val_ann, images=cfg.val_images))
    if cfg.dataset not in DATASETS:
        raise SegnestError(f"--model {cfg.model} trains on --dataset coco (with --data-root) "
                           "or mini, or on own COCO-format data with --train-ann, "
                           f"--train-images, --val-ann and --val-images; got --dataset "
                           f"{cfg.dataset}")
    root = ensure_mini_detection() if cfg.dataset == "mini" else cfg.data_root
    return coco_source(root, "train"), coco_source(root, "val")


def detection_model_kwargs(cfg: Any, num_classes: int) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"num_classes": num_classes, "stage_width": cfg.stage_width}
    sizes = _sizes(cfg.train_min_size)
    if sizes is not None:
        kwargs["train_min_size"] = list(sizes)
        kwargs["train_size_sampling"] = "range" if len(sizes) == 2 else "choice"
    if cfg.test_min_size:
        kwargs["test_min_size"] = cfg.test_min_size
    if cfg.max_size:
        kwargs["max_size"] = cfg.max_size
    return kwargs


def train_one_step(model: nn.Module, batch: tuple[list, list], training: Training
                   ) -> dict[str, float]:
    """One SGD step on a batch of (images, targets): the sum of the model's loss terms."""
    device = training.device
    images = [image.to(device, non_blocking=True) for image in batch[0]]
    targets = [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in batch[1]]
    with autocast(device, training.precision):
        losses = model(images, targets)
    loss = sum(value.float() for value in losses.values())
    optimizer_step(loss, training.optimizer, training.scheduler, training.scaler)
    return {"loss": loss.item(), **{name: value.item() for name, value in losses.items()}}


def default_work_dir(cfg: Any) -> Path:
    return Path(cfg.work_dir or f"runs/{cfg.dataset}_{cfg.model}_{cfg.backbone}")


def run_detection(cfg: Any) -> dict[str, Any]:
    """Train a detection model; the iteration reached, whether interrupted, the best and
    last validation metrics and the work folder."""
    return fit(DetectionTask(), cfg)


class DetectionTask:
    """Faster/Mask/Cascade (Mask) R-CNN on the engine (see the module docstring)."""

    name = "detection"
    log_name = LOG_NAME
    tensorboard_run = TENSORBOARD_RUN
    metric_tags = ("val/bbox_AP", "val/segm_AP")
    best_metric = BestMetric("bbox_AP", "best_bbox_ap", higher_is_better=True)

    def __init__(self) -> None:
        self.started = time.perf_counter()

    def check(self, cfg: Any, dist: DistInfo) -> Any:
        if not is_detection_model(cfg.model):
            raise SegnestError(f"--model {cfg.model}: detection models are "
                               f"{', '.join(ARCHITECTURES)}")
        if cfg.batch_size < 2 and not dist.distributed:
            raise SegnestError("--batch-size 1 on a single device cannot train: the "
                               "BatchNorm after Split-Attention's global pooling needs at "
                               "least 2 images; use --batch-size 2 or more")
        _sizes(cfg.train_min_size)
        check_run_flags(cfg, dist.device)
        self.cfg = cfg
        return cfg

    def work_dir(self) -> Path:
        return default_work_dir(self.cfg)

    def prepare_data(self, dist: DistInfo) -> int:
        cfg = self.cfg
        has_masks = ARCHITECTURES[cfg.model][0]
        train_source, val_source = detection_sources(cfg)
        for source in (train_source, val_source):
            check = check_coco(source, masks=has_masks and source is train_source)
            check.raise_errors()
            for note in check.notes if dist.is_main else ():
                print(f"note: {source.annotations.name}: {note}")
        self.plain_train_set = CocoDetection(train_source, train=True, masks=has_masks,
                                             check=False)
        self.train_set = SeededSamples(self.plain_train_set, cfg.seed)
        self.val_set = CocoDetection(val_source, check=False)
        if self.val_set.category_ids != self.plain_train_set.category_ids:
            raise SegnestError(f"{train_source.annotations} and {val_source.annotations} have "
                               "different categories; give both the same 'categories'")
        iters_per_epoch = len(self.train_set) // (cfg.batch_size * dist.world_size)
        if iters_per_epoch == 0:
            raise SegnestError(f"{len(self.train_set)} training images with annotations are "
                               f"fewer than one batch ({cfg.batch_size} x {dist.world_size} "
                               "devices); lower --batch-size")
        return iters_per_epoch

    def total_iters(self, iters_per_epoch: int) -> int:
        return self.cfg.iters or self.cfg.epochs * iters_per_epoch

    def build_model(self, dist: DistInfo) -> BuiltModel:
        cfg = self.cfg
        name = f"{cfg.model}_{cfg.backbone}"
        kwargs = detection_model_kwargs(cfg, self.plain_train_set.num_classes)
        # The pretrained trunk is loaded while building (before its first stages freeze);
        # the checkpoint's kwargs leave the path out: its weights are in the checkpoint.
        model = create_model(name, **kwargs, **({"pretrained_backbone": cfg.pretrained}
                                                if cfg.pretrained else {}))
        if cfg.pretrained and dist.is_main:
            print(f"loaded the {cfg.backbone} backbone from {cfg.pretrained}")
        return BuiltModel(model, name, kwargs)

    def default_lr(self, world_size: int) -> float:
        return BASE_LR * self.cfg.batch_size * world_size / BASE_BATCH

    def param_groups(self, model: nn.Module, lr: float) -> list[dict[str, Any]]:
        return build_param_groups(model, lr, self.cfg.weight_decay, no_decay_norm=True)

    def schedule(self, optimizer: torch.optim.Optimizer, total_iters: int,
                 iters_per_epoch: int) -> WarmupStepLR:
        steps = [int(total_iters * fraction) for fraction in LR_STEPS]
        warmup = min(self.cfg.warmup_iters or WARMUP_ITERS, total_iters)
        return WarmupStepLR(optimizer, total_iters, steps, gamma=0.1, warmup_iters=warmup,
                            warmup_ratio=WARMUP_RATIO)

    def record(self) -> dict[str, Any]:
        return {"dataset": self.cfg.dataset, "classes": list(self.plain_train_set.classes),
                "category_ids": list(self.plain_train_set.category_ids),
                "val_annotations": str(self.val_set.source.annotations),
                "val_images": str(self.val_set.source.images)}

    def writer_hparams(self, training: Training) -> None:
        return None

    def begin(self, training: Training) -> None:
        cfg, dist = self.cfg, training.dist
        self.val_interval = cfg.val_interval or max(1, training.total_iters // 10)
        if not dist.is_main:
            return
        write_text_atomic(training.work_dir / "config.yaml",
                          yaml.safe_dump(dataclasses.asdict(cfg)))
        print(f"training {training.model_name} on {cfg.dataset} ({len(self.train_set)} "
              f"images, {self.plain_train_set.num_classes} classes) for "
              f"{training.total_iters} iterations, {dist.world_size} x {training.device}, "
              f"batch {cfg.batch_size}/device, lr {training.lr:g}, "
              f"{precision_name(training.precision)}; logs and checkpoints in "
              f"{training.work_dir}")

    def batches(self, training: Training, epoch: int, start_batch: int) -> DataLoader:
        cfg, dist = self.cfg, training.dist
        self.train_set.set_epoch(epoch)
        sampler = EpochSampler(len(self.train_set), cfg.seed, epoch, dist.rank,
                               dist.world_size, start=start_batch * cfg.batch_size)
        return DataLoader(self.train_set, batch_size=cfg.batch_size, sampler=sampler,
                          num_workers=cfg.workers, collate_fn=collate_detection,
                          drop_last=True, worker_init_fn=init_train_worker,
                          pin_memory=dist.device.type == "cuda",
                          generator=torch.Generator().manual_seed(cfg.seed * 7919 + epoch))

    def step(self, training: Training, batch: tuple[list, list]) -> dict[str, float]:
        return train_one_step(training.train_model, batch, training)

    def validate_due(self, iteration: int) -> bool:
        return iteration % self.val_interval == 0

    def validate(self, training: Training, progress: Progress) -> dict[str, Any]:
        run = training.run
        progress.bar.clear()
        metrics, _ = evaluate_detection(training.model, self.val_set, training.device,
                                        training.dist, self.cfg.val_samples)
        shown = ", ".join(f"{key} {value:.2f}" for key, value in metrics.items()
                          if key.endswith("_AP") and value is not None)
        progress.write(f"iter {run.iteration}: val {shown}")
        writer = training.writer
        if writer is not None:
            for key in ("bbox_AP", "segm_AP"):
                if metrics.get(key) is not None:
                    writer.add_scalar(f"val/{key}", metrics[key], run.iteration)
            writer.flush()
        return metrics

    def lr_hint(self, training: Training) -> str:
        return f"Lower --lr (now {training.lr:g}) or lengthen the warmup (--warmup-iters)"

    def finish(self, training: Training, finished: bool) -> dict[str, Any]:
        run, work_dir = training.run, training.work_dir
        if training.dist.is_main:
            if not finished:
                print(stopped_message(run, training.total_iters))
            elif run.metrics:
                per_type = {k: v for k, v in run.metrics.items() if k in ("bbox", "segm")}
                best = work_dir / BEST_CHECKPOINT_NAME
                chosen = best if best.is_file() else work_dir / LAST_CHECKPOINT_NAME
                print("\n".join([
                    f"last validation (iteration {run.iteration}):", format_table(per_type),
                    f"best bbox AP {run.best:.2f} at iteration {run.best_iteration}: {chosen}",
                    "next:", f"  segnest eval --checkpoint {chosen} --save-pred results.json"]))
        return {"iteration": run.iteration, "interrupted": not finished,
                "signal": run.stopped_by, "best_bbox_ap": run.best, "metrics": run.metrics,
                "work_dir": str(work_dir)}
