"""``segnest pretrain``: classification pretraining of a ResNeSt backbone.

The recipe is the paper's (REFERENCE.md): SGD with momentum 0.9, lr 0.1 x total batch /
256, warmup + cosine stepped every iteration, no weight decay on norm layers and biases,
zero-initialised last BN gamma per block, label smoothing, mixup/cutmix and AutoAugment.
Reads top to bottom: :func:`run_pretrain` builds data, model, optimizer and schedule and
hands them to the training engine that ``segnest train`` shares
(:func:`segnest.engine.trainer.fit`: resume, checkpoints, Ctrl-C, logging), with
:func:`train_one_step` as its step and :func:`evaluate` (top-1/top-5) at every epoch end.
``--export`` writes the final backbone weights in the official ResNeSt key layout (no
``fc.*``), which ``segnest.load_pretrained`` loads into a segmentation model.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision.transforms import v2

from segnest.data.bad_samples import (
    BadSample,
    BadSamplePolicy,
    GuardedSamples,
    batch_usable,
    collate_guarded,
)
from segnest.data.classification import build_classification_dataset, build_transforms
from segnest.data.mini import ensure_mini_classification
from segnest.data.sampling import EpochSampler, SeededSamples, init_train_worker
from segnest.engine.config import linear_lr
from segnest.engine.loop import Progress, stopped_message
from segnest.engine.optim import build_param_groups
from segnest.engine.process import check_run_flags, optimizer_step
from segnest.engine.schedule import WarmupCosineLR
from segnest.engine.state import BestMetric
from segnest.engine.task import BuiltModel, Training
from segnest.engine.trainer import fit
from segnest.engine.workdir import BEST_CHECKPOINT_NAME, LAST_CHECKPOINT_NAME
from segnest.errors import SegnestError
from segnest.inference.tensorboard import (
    PRETRAIN_RUN,
    PRETRAINING,
    PRETRAINING_METRICS,
    PRETRAINING_TAGS,
    TB_FOLDER,
    pretraining_hparams,
    training_tag,
)
from segnest.inference.visualize import denormalize
from segnest.models import create_model
from segnest.runtime.checkpoint import check_state_dict_target, save_checkpoint
from segnest.runtime.distributed import (
    DistInfo,
    all_reduce_sum,
    barrier,
)
from segnest.runtime.precision import autocast, precision_name
from segnest.schema import FlagNames, validate
from segnest.tasks.classification.config import PRETRAIN_LR_RULE, PretrainConfig

BatchMixer = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]

# RandomResizedCrop area range: ImageNet's, and a mild one for the 64 px mini images
# whose shapes must stay in view.
IMAGENET_CROP_SCALE = (0.08, 1.0)
MINI_CROP_SCALE = (0.5, 1.0)
VAL_SAMPLE_IMAGES = 16
DATASETS = ("imagenet", "mini")


def build_batch_mixer(mixup: float, cutmix: float, num_classes: int) -> BatchMixer | None:
    """MixUp and/or CutMix on whole batches (one picked at random per batch when both are
    on); returns soft targets of shape ``B x num_classes``. None when both alphas are 0."""
    if mixup < 0 or cutmix < 0:
        raise SegnestError(f"--mixup {mixup} / --cutmix {cutmix}: alphas must be >= 0")
    mixers: list[Any] = []
    if mixup > 0:
        mixers.append(v2.MixUp(alpha=mixup, num_classes=num_classes))
    if cutmix > 0:
        mixers.append(v2.CutMix(alpha=cutmix, num_classes=num_classes))
    if not mixers:
        return None
    return mixers[0] if len(mixers) == 1 else v2.RandomChoice(mixers)


def topk_correct(logits: torch.Tensor, targets: torch.Tensor, ks: tuple[int, ...]
                 ) -> list[int]:
    """Number of samples whose target is among the ``k`` highest logits, for each k."""
    top = logits.topk(max(ks), dim=1).indices
    hits = top.eq(targets.unsqueeze(1))
    return [int(hits[:, :k].any(dim=1).sum()) for k in ks]


def train_one_step(model: nn.Module, criterion: nn.Module, batch: tuple, mixer: BatchMixer | None,
                   optimizer: torch.optim.Optimizer, scheduler: WarmupCosineLR,
                   scaler: torch.amp.GradScaler, device: torch.device,
                   precision: torch.dtype | None = None) -> dict[str, float]:
    """One SGD step on a batch of (images, labels); a non-finite loss updates nothing.
    The forward runs under autocast to ``precision`` (None: float32), the loss in float32."""
    images, targets = (t.to(device, non_blocking=True) for t in batch)
    if mixer is not None:
        images, targets = mixer(images, targets)
    with autocast(device, precision):
        logits = model(images)
    loss = criterion(logits.float(), targets)
    optimizer_step(loss, optimizer, scheduler, scaler)
    return {"loss": loss.item()}


@torch.no_grad()
def count_hits(model: nn.Module, loader: DataLoader, device: torch.device, num_classes: int,
               precision: torch.dtype | None = None,
               bad_samples: BadSamplePolicy | None = None) -> torch.Tensor:
    """Per true class, summed over all processes: ``num_classes x 3`` counts of (top-1
    hits, top-K hits, samples), K = min(5, classes). ``loader`` yields
    :func:`~segnest.data.bad_samples.collate_guarded` batches; their bad samples go to
    ``bad_samples`` (default: stop at the first). The model (a DDP or compiled wrapper too)
    is left in the mode it came in, as :func:`segnest.inference.evaluate.evaluate` does."""
    bad_samples = bad_samples or BadSamplePolicy(skip=False)
    was_training = model.training
    model.eval()
    ks = (1, min(5, num_classes))
    counts = torch.zeros(num_classes, 3, dtype=torch.float64, device=device)
    try:
        for batch, bad in loader:
            bad_samples.check_all(bad)
            if batch is None:
                continue
            images, targets = (t.to(device, non_blocking=True) for t in batch)
            with autocast(device, precision):
                logits = model(images)
            for label in targets.unique().tolist():
                chosen = targets == label
                top1, topk = topk_correct(logits[chosen].float(), targets[chosen], ks)
                counts[label] += torch.tensor([top1, topk, int(chosen.sum())],
                                              dtype=torch.float64, device=device)
    finally:
        model.train(was_training)
    return all_reduce_sum(counts)


def accuracy(counts: torch.Tensor) -> dict[str, float]:
    """Top-1 and top-5 accuracy in percent (top-5 is top-K when there are fewer than 5
    classes) of :func:`count_hits`'s counts."""
    correct1, correctk, total = counts.sum(dim=0).tolist()
    total = max(total, 1.0)
    return {"top1": 100.0 * correct1 / total, "top5": 100.0 * correctk / total}


def evaluate(model: nn.Module, loader: DataLoader, device: torch.device, num_classes: int,
             precision: torch.dtype | None = None,
             bad_samples: BadSamplePolicy | None = None) -> dict[str, float]:
    """Top-1 and top-5 accuracy in percent over every process's share of ``loader``."""
    return accuracy(count_hits(model, loader, device, num_classes, precision, bad_samples))


@torch.no_grad()
def log_val_samples(writer: Any, model: nn.Module, dataset: Dataset, classes: list[str],
                    device: torch.device, step: int) -> None:
    """A grid of validation images, spread evenly over the (class-sorted) set, with their
    predicted and true labels."""
    model.eval()
    size = len(dataset)  # type: ignore[arg-type]
    count = min(VAL_SAMPLE_IMAGES, size)
    samples = [dataset[i * size // count] for i in range(count)]
    images = torch.stack([image for image, _ in samples])
    predictions = model(images.to(device)).argmax(dim=1).tolist()
    pictures = torch.stack([torch.from_numpy(denormalize(image)).permute(2, 0, 1)
                            for image in images])
    writer.add_images(f"{PRETRAINING}_images/samples", pictures, step)
    lines = [f"{i}: predicted **{classes[p]}**, true {classes[t]}"
             + ("" if p == t else " (wrong)")
             for i, (p, (_, t)) in enumerate(zip(predictions, samples, strict=True))]
    writer.add_text(training_tag(PRETRAINING, "sample_labels"), "  \n".join(lines), step)


def build_datasets(cfg: PretrainConfig) -> tuple[Dataset, Dataset, list[str]]:
    """(train, val, class names) of ``--dataset`` with the recipe's transforms."""
    if cfg.dataset not in DATASETS:
        raise SegnestError(f"unknown --dataset '{cfg.dataset}'; use imagenet (with "
                           "--data-root) or mini")
    if cfg.dataset == "mini":
        root, crop_scale = ensure_mini_classification(), MINI_CROP_SCALE
    else:
        if not cfg.data_root:
            raise SegnestError(
                "--dataset imagenet needs --data-root: a folder with train/<class>/ and "
                "val/<class>/ image folders (ImageNet layout)")
        root, crop_scale = Path(cfg.data_root), IMAGENET_CROP_SCALE
    train_transform, eval_transform = build_transforms(
        cfg.crop_size, cfg.crop_pct, cfg.auto_augment, crop_scale)
    train_set = build_classification_dataset(root, "train", train_transform)
    val_set = build_classification_dataset(root, "val", eval_transform)
    if train_set.classes != val_set.classes:
        raise SegnestError(f"{root}: train/ and val/ hold different class folders; give both "
                           "the same class sub-folders")
    return train_set, val_set, list(train_set.classes)


def make_val_loader(cfg: PretrainConfig, val_set: Dataset, dist: DistInfo) -> DataLoader:
    # Each process evaluates a disjoint slice, without the padding DistributedSampler adds,
    # so the summed counts cover every validation image exactly once.
    indices = range(dist.rank, len(val_set), dist.world_size)  # type: ignore[arg-type]
    return DataLoader(GuardedSamples(Subset(val_set, indices)), batch_size=cfg.batch_size,
                      shuffle=False, num_workers=cfg.workers, collate_fn=collate_guarded,
                      pin_memory=dist.device.type == "cuda")


def make_train_loader(cfg: PretrainConfig, train_set: SeededSamples, dist: DistInfo,
                      epoch: int, start_batch: int) -> DataLoader:
    """This rank's batches of ``epoch``, from batch ``start_batch`` on (a resumed run)."""
    train_set.set_epoch(epoch)
    sampler = EpochSampler(len(train_set), cfg.seed, epoch, dist.rank, dist.world_size,
                           start=start_batch * cfg.batch_size)
    return DataLoader(GuardedSamples(train_set), batch_size=cfg.batch_size, sampler=sampler,
                      num_workers=cfg.workers, pin_memory=dist.device.type == "cuda",
                      collate_fn=collate_guarded, drop_last=True,
                      worker_init_fn=init_train_worker,
                      generator=torch.Generator().manual_seed(
                          cfg.seed * 1_000_003 + epoch * 1_009 + dist.rank))


def model_kwargs(cfg: PretrainConfig, num_classes: int) -> dict[str, Any]:
    """``create_model`` arguments of the classifier; stored in checkpoints as
    ``model_kwargs`` so that the model can be rebuilt from the file alone."""
    kwargs: dict[str, Any] = dict(num_classes=num_classes, stage_width=cfg.stage_width,
                                  last_gamma=cfg.last_gamma, dropblock_prob=cfg.dropblock_prob,
                                  final_drop=cfg.final_drop)
    if cfg.stem_width is not None:
        kwargs["stem_width"] = cfg.stem_width
    return kwargs


def backbone_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The classifier's weights without ``fc.*``: the official ResNeSt key layout that a
    feature backbone or ``deeplabv3_<backbone>`` loads."""
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()
            if not k.startswith("fc.")}


def check_config(cfg: PretrainConfig, dist: DistInfo) -> PretrainConfig:
    """Catch settings that cannot work before any data is read or weight is built (every
    flag's own rules, :func:`segnest.schema.validate` worded as flags, for callers from
    Python too)."""
    cfg = validate(cfg, FlagNames())
    check_run_flags(cfg, dist.device)
    if cfg.export:
        # Checked now, not after the pretraining: --export naming a folder, a checkpoint
        # or this run's own files would otherwise fail or replace it at the very end.
        work_dir = default_work_dir(cfg).resolve()
        check_state_dict_target(cfg.export, "--export", {
            work_dir / name: f"this run's {name}"
            for name in (LAST_CHECKPOINT_NAME, BEST_CHECKPOINT_NAME)})
    return cfg


def run_pretrain(cfg: PretrainConfig) -> dict[str, Any]:
    """Pretrain ``cfg.backbone`` as a classifier; return the final metrics and file paths.

    The returned dict holds ``top1``, ``top5`` (last epoch), ``best_top1``, ``epochs``,
    ``iterations``, ``seconds``, ``interrupted`` and the paths ``work_dir``, ``last``,
    ``best`` and ``export`` (None without ``--export``).
    """
    return fit(ClassificationTask(), cfg)


LOG_NAME = "pretrain.log"


def default_work_dir(cfg: PretrainConfig) -> Path:
    return Path(cfg.work_dir or f"runs/pretrain_{cfg.dataset}_{cfg.backbone}")


class ClassificationTask:
    """``segnest pretrain`` on the engine: a ResNeSt classifier, warmup + cosine, label
    smoothing and mixing, top-1 on the validation set deciding ``best.pt``."""

    name = "classification"
    log_name = LOG_NAME
    tensorboard_run = PRETRAIN_RUN
    metric_tags = PRETRAINING_TAGS
    scalar_namespace = PRETRAINING
    best_metric = BestMetric("top1", "best_top1", higher_is_better=True)

    def __init__(self) -> None:
        self.epoch_losses: list[float] = []
        self.started = time.perf_counter()

    def check(self, cfg: PretrainConfig, dist: DistInfo) -> PretrainConfig:
        self.cfg = check_config(cfg, dist)
        self.bad_samples = BadSamplePolicy(self.cfg.skip_bad_samples, "sample(s)",
                                           show=dist.is_main)
        return self.cfg

    def prepare_data(self, dist: DistInfo) -> int:
        cfg = self.cfg
        plain_train_set, self.val_set, self.classes = build_datasets(cfg)
        self.train_set = SeededSamples(plain_train_set, cfg.seed)
        per_rank = len(self.train_set) // dist.world_size
        if per_rank < cfg.batch_size:
            raise SegnestError(f"--batch-size {cfg.batch_size} is larger than the {per_rank} "
                               "training images per process; lower --batch-size")
        self.val_loader = make_val_loader(cfg, self.val_set, dist)
        return per_rank // cfg.batch_size

    def work_dir(self) -> Path:
        return default_work_dir(self.cfg)

    def total_iters(self, iters_per_epoch: int) -> int:
        self.iters_per_epoch = iters_per_epoch
        return self.cfg.epochs * iters_per_epoch

    def build_model(self, dist: DistInfo) -> BuiltModel:
        kwargs = model_kwargs(self.cfg, len(self.classes))
        return BuiltModel(create_model(self.cfg.backbone, **kwargs), self.cfg.backbone, kwargs)

    def default_lr(self, world_size: int) -> float:
        return linear_lr(PRETRAIN_LR_RULE, self.cfg.batch_size * world_size)

    def param_groups(self, model: nn.Module, lr: float) -> list[dict[str, Any]]:
        return build_param_groups(model, lr, self.cfg.weight_decay, no_decay_norm=True)

    def schedule(self, optimizer: torch.optim.Optimizer, total_iters: int,
                 iters_per_epoch: int) -> WarmupCosineLR:
        warmup_iters = min(int(round(self.cfg.warmup_epochs * iters_per_epoch)), total_iters)
        return WarmupCosineLR(optimizer, total_iters=total_iters, warmup_iters=warmup_iters)

    def record(self) -> dict[str, Any]:
        return {"classes": self.classes}

    def writer_hparams(self, training: Training) -> dict[str, Any]:
        return pretraining_hparams(dataclasses.asdict(self.cfg), training.lr,
                                   training.images_per_step)

    def begin(self, training: Training) -> None:
        cfg = self.cfg
        self.criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
        self.mixer = build_batch_mixer(cfg.mixup, cfg.cutmix, len(self.classes))
        if training.dist.is_main:
            print(f"segnest pretrain: {cfg.backbone} on {cfg.dataset} ({len(self.train_set)} "
                  f"train / {len(self.val_set)} val images, {len(self.classes)} classes), "
                  f"{cfg.epochs} epochs x {training.iters_per_epoch} iterations, batch "
                  f"{training.images_per_step}, lr {training.lr:g}, device "
                  f"{training.device}, {precision_name(training.precision)}; logs in "
                  f"{training.work_dir}")

    def batches(self, training: Training, epoch: int, start_batch: int) -> DataLoader:
        return make_train_loader(self.cfg, self.train_set, training.dist, epoch, start_batch)

    def step(self, training: Training, item: tuple[Any, list[BadSample]]
             ) -> dict[str, float] | None:
        batch, bad = item
        self.bad_samples.check_all(bad)
        size = 0 if batch is None else len(batch[1])
        if self.cfg.skip_bad_samples and not batch_usable(size, training.device,
                                                          training.dist.distributed):
            return None
        scalars = train_one_step(training.train_model, self.criterion, batch, self.mixer,
                                 training.optimizer, training.scheduler, training.scaler,
                                 training.device, training.precision)
        self.epoch_losses.append(scalars["loss"])
        return scalars

    def validate_due(self, iteration: int) -> bool:
        return iteration % self.iters_per_epoch == 0

    def _evaluate(self, training: Training) -> dict[str, float]:
        return evaluate(training.train_model, self.val_loader, training.device,
                        len(self.classes), training.precision, self.bad_samples)

    def validate(self, training: Training, progress: Progress) -> dict[str, float]:
        writer, num_classes = training.writer, len(self.classes)
        metrics = self._evaluate(training)
        epoch = training.run.epoch
        loss = sum(self.epoch_losses) / max(len(self.epoch_losses), 1)
        self.epoch_losses.clear()
        progress.write(f"epoch {epoch}/{self.cfg.epochs}: train loss {loss:.4f}, val top1 "
                       f"{metrics['top1']:.2f}%, top{min(5, num_classes)} {metrics['top5']:.2f}%"
                       f", {time.perf_counter() - self.started:.0f}s")
        if writer is not None:
            # At the iteration, as every other chart of the run (not the epoch).
            step = training.run.iteration
            for key, tag in zip(PRETRAINING_METRICS, PRETRAINING_TAGS, strict=True):
                writer.add_scalar(tag, metrics[key], step)
            writer.add_scalar(training_tag(PRETRAINING, "epoch_loss"), loss, step)
            writer.add_scalar(training_tag(PRETRAINING, "epoch"), epoch, step)
            log_val_samples(writer, training.model, self.val_set, self.classes,
                            training.device, step)
            writer.flush()
        return metrics

    def lr_hint(self, training: Training) -> str:
        return f"Lower --lr (now {training.lr:g}) or check the data"

    def finish(self, training: Training, finished: bool) -> dict[str, Any]:
        cfg, run, work_dir, dist = self.cfg, training.run, training.work_dir, training.dist
        paths = {"work_dir": str(work_dir), "last": str(work_dir / LAST_CHECKPOINT_NAME),
                 "best": str(work_dir / BEST_CHECKPOINT_NAME), "export": cfg.export}
        skipped = self.bad_samples.total(training.device)
        if dist.is_main and (warning := self.bad_samples.summary(skipped)):
            print(warning)
        if not finished:
            if dist.is_main:
                print(stopped_message(run, training.total_iters))
            return {"iterations": run.iteration, "interrupted": True,
                    "signal": run.stopped_by, "skipped_samples": skipped, **paths}
        metrics = run.metrics or self._evaluate(training)
        if cfg.export and dist.is_main:
            save_checkpoint(backbone_state_dict(training.model), cfg.export)
            print(f"exported backbone weights to {cfg.export}")
        if dist.is_main:
            backbone = cfg.export or paths["best"]
            print(f"finished: val top-1 {metrics['top1']:.2f}% (best {run.best:.2f}% at "
                  f"iteration {run.best_iteration}, {paths['best']})\nnext:\n  segnest train "
                  f"--backbone {cfg.backbone} --pretrained {backbone} ...\n  tensorboard "
                  f"--logdir {work_dir / TB_FOLDER}")
        barrier()
        return {"top1": metrics["top1"], "top5": metrics["top5"], "best_top1": run.best,
                "epochs": cfg.epochs, "iterations": run.iteration, "interrupted": False,
                "seconds": time.perf_counter() - self.started, "skipped_samples": skipped,
                **paths}
