"""``segnest train --model faster_rcnn|mask_rcnn|cascade_rcnn|cascade_mask_rcnn``:
detection and instance segmentation as a task of the training engine
(:func:`segnest.engine.trainer.fit`: resume, checkpoints, signals, logs, precision, DDP).

The recipe is the authors' (their detectron2 configs, see
:mod:`segnest.models.detection.rcnn` for the model's side): SGD with momentum 0.9, lr 0.02
for 16 images scaled linearly with the total batch, weight decay 1e-4 except on norm
layers (detectron2's ``WEIGHT_DECAY_NORM: 0``; biases keep it), linear warmup from
0.001 x lr, the lr divided by 10 at 2/3 and 8/9 of the run (1x: 90k iterations, steps at
60k and 80k). Images are flipped horizontally at random; the model draws the short side
itself. Validation is COCO AP through pycocotools on the validation annotation file;
``bbox_AP`` picks ``best.pt``.

DDP runs without ``find_unused_parameters``: every trainable parameter takes part in every
step's loss, also on a rank whose images give no positive proposal (the box and mask
losses are then sums over empty selections, zero gradients that DDP still reduces), so no
rank waits for a gradient another never sends (tests/test_detection_train.py checks both).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader

from segnest.data.coco import CocoDetection, CocoSource, check_coco, coco_source, collate_detection
from segnest.data.mini import ensure_mini_detection
from segnest.data.sampling import EpochSampler, SeededSamples, init_train_worker
from segnest.engine.config import linear_lr
from segnest.engine.loop import Progress, stopped_message
from segnest.engine.optim import NORM_TYPES
from segnest.engine.process import check_run_flags, optimizer_step
from segnest.engine.schedule import WarmupStepLR
from segnest.engine.state import BestMetric
from segnest.engine.task import BuiltModel, Training
from segnest.engine.trainer import fit
from segnest.engine.workdir import BEST_CHECKPOINT_NAME, LAST_CHECKPOINT_NAME
from segnest.errors import SegnestError
from segnest.inference.coco import format_table
from segnest.inference.detection import DetectionPredictor, draw_ground_truth
from segnest.inference.tensorboard import (
    DETECTION,
    DETECTION_RUN,
    DETECTION_TAGS,
    TB_FOLDER,
    log_detection_results,
)
from segnest.models import create_model
from segnest.models.detection.rcnn import ARCHITECTURES
from segnest.models.weights import resolve_pretrained
from segnest.runtime.distributed import DistInfo
from segnest.runtime.files import write_text_atomic
from segnest.runtime.precision import autocast, precision_name
from segnest.schema import FlagNames, validate
from segnest.tasks.detection.config import DETECTION_LR_RULE, DetectionConfig, parse_min_sizes
from segnest.tasks.detection.evaluate import evaluate_detection

LOG_NAME = "train.log"
# The authors' 1x (lr: DETECTION_LR_RULE): steps at 60k and 80k of 90k iterations, warmup
# from 0.001 x lr.
LR_STEPS = (2 / 3, 8 / 9)
LR_GAMMA, WARMUP_RATIO = 0.1, 0.001
# The box head's fc is 4x the FPN width (1024 for the published 256).
FC_PER_CHANNEL = 4


def detection_sources(cfg: DetectionConfig) -> tuple[CocoSource, CocoSource]:
    """(train, val) of the own-data flags, of ``--dataset coco`` under ``--data-root`` or of
    the bundled mini set."""
    if cfg.train_ann:
        return (coco_source(annotations=cfg.train_ann, images=cfg.train_images),
                coco_source(annotations=cfg.val_ann, images=cfg.val_images))
    root = ensure_mini_detection() if cfg.dataset == "mini" else cfg.data_root
    return coco_source(root, "train"), coco_source(root, "val")


def detection_model_kwargs(cfg: DetectionConfig, num_classes: int) -> dict[str, Any]:
    """``create_model`` arguments of the detector from the flags; the checkpoint stores
    them (without the pretrained path: its weights are in the checkpoint)."""
    kwargs: dict[str, Any] = {"num_classes": num_classes}
    if cfg.backbone != "resnet50":
        kwargs["stage_width"] = cfg.stage_width
    if cfg.train_min_size is not None:
        sizes, sampling = parse_min_sizes(cfg.train_min_size)
        kwargs.update(train_min_size=list(sizes), train_size_sampling=sampling)
    for name in ("test_min_size", "max_size"):
        if getattr(cfg, name) is not None:
            kwargs[name] = getattr(cfg, name)
    if cfg.detector_width is not None:
        kwargs.update(fpn_channels=cfg.detector_width, head_channels=cfg.detector_width,
                      box_fc_channels=FC_PER_CHANNEL * cfg.detector_width)
    if cfg.roi_batch_size is not None:
        kwargs["roi_batch_size_per_image"] = cfg.roi_batch_size
    return kwargs


def detection_param_groups(model: nn.Module, lr: float, weight_decay: float
                           ) -> list[dict[str, Any]]:
    """SGD groups: no weight decay on norm layers, weight decay on everything else (biases
    included), as detectron2's ``WEIGHT_DECAY_NORM: 0`` with ``WEIGHT_DECAY_BIAS`` unset."""
    norm = {id(p) for module in model.modules() if isinstance(module, NORM_TYPES)
            for p in module.parameters(recurse=False)}
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in trainable if id(p) not in norm], "weight_decay": weight_decay},
              {"params": [p for p in trainable if id(p) in norm], "weight_decay": 0.0}]
    return [dict(group, lr=lr, lr_mult=1.0) for group in groups if group["params"]]


def train_one_step(training: Training, batch: tuple[list, list]) -> dict[str, float]:
    """One SGD step on (images, targets): the sum of the model's loss terms; returns it as
    ``loss`` and each term under its own name."""
    device = training.device
    images = [image.to(device, non_blocking=True) for image in batch[0]]
    targets = [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in batch[1]]
    with autocast(device, training.precision):
        losses = training.train_model(images, targets)
    loss = sum(value.float() for value in losses.values())
    optimizer_step(loss, training.optimizer, training.scheduler, training.scaler)
    return {"loss": loss.item(), **{name: value.item() for name, value in losses.items()}}


def default_work_dir(cfg: DetectionConfig) -> Path:
    data = "own" if cfg.train_ann else cfg.dataset
    return Path(cfg.work_dir or f"runs/{data}_{cfg.model}_{cfg.backbone}")


def check_config(cfg: DetectionConfig, dist: DistInfo) -> DetectionConfig:
    """Every flag's own rules (:func:`segnest.schema.validate` worded as flags) and those that
    depend on the processes; data paths made absolute (eval and predict read them from
    the checkpoint, from other folders)."""
    cfg = validate(cfg, FlagNames())
    if cfg.model not in ARCHITECTURES:
        raise SegnestError(f"--model {cfg.model} is not a detection model; use one of "
                           f"{', '.join(ARCHITECTURES)}")
    if cfg.batch_size < 2 and not dist.distributed:
        raise SegnestError(
            "--batch-size 1 on a single device cannot train: the BatchNorm after "
            "Split-Attention's global pooling needs at least 2 images; use --batch-size 2 or "
            "more, or several devices with torchrun (SyncBN pools them across devices)")
    check_run_flags(cfg, dist.device)
    paths = {name: str(Path(value).expanduser().resolve()) for name in
             ("data_root", "train_ann", "train_images", "val_ann", "val_images")
             if (value := getattr(cfg, name))}
    return dataclasses.replace(cfg, **paths)


def run_detection(cfg: DetectionConfig) -> dict[str, Any]:
    """Train a detector; returns the iteration reached, whether the run was interrupted
    (and by which signal), the best box AP, the last validation metrics and the work
    folder."""
    return fit(DetectionTask(), cfg)


class DetectionTask:
    """Faster/Mask/Cascade (Mask) R-CNN on the engine (see the module docstring)."""

    name = "detection"
    log_name = LOG_NAME
    tensorboard_run = DETECTION_RUN
    metric_tags = DETECTION_TAGS
    scalar_namespace = DETECTION
    best_metric = BestMetric("bbox_AP", "best_bbox_ap", higher_is_better=True)

    def __init__(self) -> None:
        self.started = time.perf_counter()

    def check(self, cfg: DetectionConfig, dist: DistInfo) -> DetectionConfig:
        self.cfg = check_config(cfg, dist)
        if self.cfg.pretrained:  # fetched (or refused) before the work folder is touched
            resolve_pretrained(self.cfg.pretrained)
        return self.cfg

    def work_dir(self) -> Path:
        return default_work_dir(self.cfg)

    def prepare_data(self, dist: DistInfo) -> int:
        cfg = self.cfg
        has_masks = ARCHITECTURES[cfg.model][0]
        train_source, val_source = detection_sources(cfg)
        # A mask model's validation needs ground-truth masks too: segm AP is computed on them.
        for source, masks in ((train_source, has_masks), (val_source, has_masks)):
            check = check_coco(source, masks=masks)
            check.raise_errors()
            for note in check.notes if dist.is_main else ():
                print(f"note: {source.annotations}: {note}")
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
        cfg = self.cfg
        total = cfg.iters or cfg.epochs * iters_per_epoch
        if cfg.warmup_iters > total:
            raise SegnestError(f"--warmup-iters {cfg.warmup_iters} is longer than the run "
                               f"({total} iterations); lower --warmup-iters")
        return total

    def build_model(self, dist: DistInfo) -> BuiltModel:
        cfg = self.cfg
        name = f"{cfg.model}_{cfg.backbone}"
        kwargs = detection_model_kwargs(cfg, self.plain_train_set.num_classes)
        # The trunk's weights load while it is built, before its first stages freeze.
        extra = {"pretrained_backbone": cfg.pretrained} if cfg.pretrained else {}
        model = create_model(name, **kwargs, **extra)
        if dist.is_main and cfg.pretrained:
            print(f"loaded the {cfg.backbone} backbone from {cfg.pretrained}")
        elif dist.is_main and cfg.dataset != "mini" and not cfg.resume:
            print(f"warning: training {cfg.backbone} from scratch (no --pretrained): the "
                  "paper's numbers start from ImageNet weights; expect a far lower AP")
        return BuiltModel(model, name, kwargs)

    def default_lr(self, world_size: int) -> float:
        return linear_lr(DETECTION_LR_RULE, self.cfg.batch_size * world_size)

    def param_groups(self, model: nn.Module, lr: float) -> list[dict[str, Any]]:
        return detection_param_groups(model, lr, self.cfg.weight_decay)

    def schedule(self, optimizer: torch.optim.Optimizer, total_iters: int,
                 iters_per_epoch: int) -> WarmupStepLR:
        steps = [max(1, int(total_iters * fraction)) for fraction in LR_STEPS]
        return WarmupStepLR(optimizer, total_iters, steps, LR_GAMMA, self.cfg.warmup_iters,
                            WARMUP_RATIO)

    def record(self) -> dict[str, Any]:
        train, val = self.plain_train_set, self.val_set
        return {"dataset": self.cfg.dataset, "classes": list(train.classes),
                "category_ids": list(train.category_ids),
                "val_annotations": str(val.source.annotations),
                "val_images": str(val.source.images)}

    def writer_hparams(self, training: Training) -> dict[str, Any]:
        cfg = self.cfg
        return {"model": cfg.model, "backbone": cfg.backbone, "iters": training.total_iters,
                "lr": training.lr, "batch": training.images_per_step,
                "train_min_size": cfg.train_min_size or "default",
                "pretrained": cfg.pretrained or "none",
                "precision": precision_name(training.precision)}

    def begin(self, training: Training) -> None:
        cfg, dist = self.cfg, training.dist
        self.val_interval = cfg.val_interval or max(1, training.total_iters // 10)
        if not dist.is_main:
            return
        write_text_atomic(training.work_dir / "config.yaml",
                          yaml.safe_dump(dataclasses.asdict(cfg)))
        data = cfg.train_ann or cfg.dataset
        print(f"training {training.model_name} on {data} ({len(self.train_set)} images, "
              f"{self.plain_train_set.num_classes} classes) for {training.total_iters} "
              f"iterations, {dist.world_size} x {training.device}, batch "
              f"{cfg.batch_size}/device, lr {training.lr:g}, "
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
        return train_one_step(training, batch)

    def validate_due(self, iteration: int) -> bool:
        return iteration % self.val_interval == 0

    def validate(self, training: Training, progress: Progress) -> dict[str, Any]:
        run = training.run
        progress.bar.clear()
        metrics, _ = evaluate_detection(training.model, self.val_set, training.device,
                                        training.dist, self.cfg.val_samples)
        if metrics["bbox_AP"] is None:
            raise SegnestError(f"{self.val_set.source.annotations}: the validation images hold "
                               "no annotations, so box AP is undefined; give a validation set "
                               "with annotated objects")
        shown = ", ".join(f"{key} {metrics[key]:.2f}" for key in ("bbox_AP", "segm_AP")
                          if metrics.get(key) is not None)
        progress.write(f"iter {run.iteration}: val {shown} (best bbox AP "
                       f"{max(run.best, metrics['bbox_AP']):.2f})")
        if training.writer is not None:
            log_detection_results(training.writer, metrics, self._panels(training),
                                  run.iteration)
            training.writer.flush()
        return metrics

    def _panels(self, training: Training) -> list[np.ndarray]:
        """Ground truth | predictions (score >= 0.5) of the first ``--panels`` validation
        images, each instance labelled with its class (and score)."""
        count = min(self.cfg.panels, len(self.val_set))
        if not count:
            return []
        predictor = DetectionPredictor(training.model, self.val_set.classes, training.device)
        panels = []
        try:
            for index in range(count):
                image, target = self.val_set[index]
                pixels = (image.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
                truth = self._ground_truth(index, pixels)
                predicted = predictor.draw(pixels, predictor.predict(pixels))
                panels.append(np.concatenate([truth, predicted], axis=1))
        finally:
            training.model.train()
        return panels

    def _ground_truth(self, index: int, pixels: np.ndarray) -> np.ndarray:
        val = self.val_set
        boxes, annotations = val._boxes(val.images[index])
        labels = np.array([val.category_ids.index(a["category_id"]) + 1 for a in annotations],
                          np.int64)
        height, width = pixels.shape[:2]
        masks = None
        if ARCHITECTURES[self.cfg.model][0] and all("segmentation" in a for a in annotations):
            masks = np.stack([val.decode_mask(a, height, width) for a in annotations]
                             ) if annotations else None
        return draw_ground_truth(pixels, boxes, labels, val.classes, masks)

    def lr_hint(self, training: Training) -> str:
        return (f"Lower --lr (now {training.lr:g}) or lengthen the warmup (--warmup-iters, "
                f"now {self.cfg.warmup_iters})")

    def finish(self, training: Training, finished: bool) -> dict[str, Any]:
        run, work_dir = training.run, training.work_dir
        if training.dist.is_main:
            print(stopped_message(run, training.total_iters) if not finished
                  else _summary(run, work_dir))
        return {"iteration": run.iteration, "interrupted": not finished,
                "signal": run.stopped_by, "best_bbox_ap": run.best, "metrics": run.metrics,
                "work_dir": str(work_dir), "seconds": time.perf_counter() - self.started}


def _summary(run: Any, work_dir: Path) -> str:
    if not run.metrics:
        return f"finished at iteration {run.iteration}; checkpoints in {work_dir}"
    per_type = {k: v for k, v in run.metrics.items() if k in ("bbox", "segm")}
    best = work_dir / BEST_CHECKPOINT_NAME
    chosen = best if best.is_file() else work_dir / LAST_CHECKPOINT_NAME
    lines = [f"last validation (iteration {run.iteration}):", format_table(per_type),
             f"best bbox AP {run.best:.2f} at iteration {run.best_iteration}: {chosen}",
             "next:", f"  segnest eval --checkpoint {chosen} --save-pred results.json"]
    if (work_dir / TB_FOLDER).is_dir():  # not after --no-tensorboard
        lines.append(f"  tensorboard --logdir {work_dir / TB_FOLDER}")
    return "\n".join(lines)
