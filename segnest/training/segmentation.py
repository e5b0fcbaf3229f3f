"""``segnest train``: DeepLabV3 on a ResNeSt backbone, the paper's recipe.

Reads top to bottom: :func:`check_config` refuses settings that cannot work,
:func:`run_train` builds data, model, optimizer and schedule, then hands them to the
training protocol that ``segnest pretrain`` shares (:mod:`segnest.training.run_state`:
resume, checkpoints, Ctrl-C, logging), with :func:`train_one_step` as its step and
single-scale evaluation of the validation split as its validation.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader, Dataset, default_collate
from tqdm import tqdm

from segnest.config import TrainConfig, validate_config
from segnest.data import SegEvalTransform, SegTrainTransform, build_dataset
from segnest.data.census import check_train_labels
from segnest.data.sampling import EpochSampler, init_train_worker
from segnest.data.transforms import IGNORE_INDEX, channel_statistics
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
from segnest.models.pixelwise import fuses_upsampling
from segnest.models.weights import NAMED_WEIGHTS, resolve_pretrained
from segnest.runtime.distributed import (
    DistInfo,
    agree,
    convert_sync_batchnorm,
    seed_everything,
)
from segnest.runtime.files import write_text_atomic
from segnest.runtime.precision import autocast, for_training, grad_scaler, precision_name
from segnest.training.class_weights import class_weights_for, summary, write_class_weights
from segnest.training.losses import Ohem, segmentation_loss
from segnest.training.optim import build_param_groups
from segnest.training.run_state import (
    BEST_CHECKPOINT_NAME,
    LAST_CHECKPOINT_NAME,
    Progress,
    RunState,
    check_run_flags,
    close_writer,
    open_writer,
    optimizer_step,
    run_folder,
    run_loop,
    stopped_message,
    training_precision,
    training_process,
    wrap_for_training,
)
from segnest.training.schedule import PolyLR


class GuardedSamples(Dataset):
    """The training set with loading errors returned as data instead of raised.

    A worker that raises dies with a multi-line traceback; returning the error lets the
    main process stop with the dataset's one-line message, or skip the sample with
    ``--skip-bad-samples``.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        try:
            return self.dataset[index]
        except SegnestError as err:
            return {"error": str(err)}


def collate_guarded(items: list[dict]) -> tuple[dict | None, list[str]]:
    """(batch of the good samples or None, error messages of the bad ones)."""
    errors = [item["error"] for item in items if "error" in item]
    good = [item for item in items if "error" not in item]
    return (default_collate(good) if good else None), errors


def check_config(cfg: TrainConfig, dist: DistInfo) -> TrainConfig:
    """Catch settings that cannot work before any data is read or weight is built: every
    flag's own rules (:func:`segnest.config.validate_config`, as the command line applies
    them, for callers from Python) and those that depend on the processes."""
    cfg = validate_config(cfg)
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
    return 0.01 * cfg.batch_size * world_size / 16


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
                   precision: torch.dtype | None = None) -> dict[str, float]:
    """One SGD step with the loss of ``cfg`` (``--loss``, ``--ohem-*``) and
    ``class_weights``; returns the loss (and auxiliary loss). A non-finite loss is returned
    without updating anything. The forward runs under autocast to ``precision`` (None:
    float32); the model hands back float32 logits, so the loss is float32."""
    ohem = Ohem(cfg.ohem_thresh, cfg.ohem_min_kept) if cfg.loss == "ohem" else None
    image = batch["image"].to(device, non_blocking=True)
    target = batch["mask"].to(device, non_blocking=True)
    with autocast(device, precision):
        outputs = model(image, upsample=not fuses_upsampling(device))
    loss, aux = segmentation_loss(outputs, target, cfg.aux_weight, class_weights, ohem)
    optimizer_step(loss, optimizer, scheduler, scaler)
    scalars = {"loss": loss.item()}
    if aux is not None:
        scalars["aux_loss"] = aux.item()
    return scalars


LOG_NAME = "train.log"


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
    with training_process(cfg.device, cfg.workers) as dist:
        cfg = check_config(cfg, dist)
        if cfg.pretrained:  # fetched (or refused) before the work folder is touched
            resolve_pretrained(cfg.pretrained)
        with run_folder(default_work_dir(cfg), dist, resume=cfg.resume,
                        overwrite=cfg.overwrite, log_name=LOG_NAME):
            return _train(cfg, dist)


def _usable(batch: dict | None, dist: DistInfo) -> bool:
    """Whether every rank can train on its batch after bad samples were dropped: a batch
    emptied by them is not, nor one of a single sample on a single device (BatchNorm needs
    two; SyncBN pools them across devices)."""
    usable = batch is not None and (dist.distributed or batch["image"].shape[0] >= 2)
    return bool(agree(usable, dist.device, op="min"))


def _train(cfg: TrainConfig, dist: DistInfo) -> dict[str, Any]:
    device = dist.device
    seed_everything(cfg.seed, dist.rank)
    work_dir = default_work_dir(cfg)

    mean, std = channel_statistics(cfg.in_channels, cfg.mean, cfg.std)
    train_transform = SegTrainTransform(
        cfg.base_size, cfg.crop_size, (cfg.scale_min, cfg.scale_max), cfg.cat_max_ratio,
        photometric=cfg.photometric, ignore_index=IGNORE_INDEX, seed=cfg.seed,
        mean=mean, std=std)
    train_set = build_dataset(cfg.dataset, cfg.data_root, "train", train_transform,
                              cfg.label_map, cfg.in_channels)
    val_set = build_dataset(cfg.dataset, cfg.data_root, "val", SegEvalTransform(mean, std),
                            cfg.label_map, cfg.in_channels)
    census = check_train_labels(train_set, cfg.skip_bad_samples, verbose=dist.is_main)
    # Python floats: the checkpoint stores them, and a resumed run must find the same ones.
    weights = class_weights_for(cfg.class_weights, train_set.classes, census.train_id_counts)
    class_weights = (None if weights is None
                     else torch.tensor(weights, dtype=torch.float32, device=dist.device))
    iters_per_epoch = len(train_set) // (cfg.batch_size * dist.world_size)
    if iters_per_epoch == 0:
        raise SegnestError(
            f"the {cfg.dataset} train split has {len(train_set)} images, fewer than one batch "
            f"({cfg.batch_size} x {dist.world_size} devices); lower --batch-size")
    total_iters = cfg.iters or cfg.epochs * iters_per_epoch
    if cfg.warmup_iters > total_iters:
        raise SegnestError(f"--warmup-iters {cfg.warmup_iters} is longer than the run "
                           f"({total_iters} iterations: --epochs {cfg.epochs} of "
                           f"{iters_per_epoch}); lower --warmup-iters")

    model_name = f"deeplabv3_{cfg.backbone}"
    model = create_model(model_name, **model_kwargs_for(cfg, train_set.num_classes))
    model_kwargs = recorded_model_kwargs(model, model_kwargs_for(cfg, train_set.num_classes))
    if cfg.pretrained:
        report = load_pretrained(model, cfg.pretrained)
        if dist.is_main:
            where = "" if str(report.path) == cfg.pretrained else f" ({report.path})"
            print(f"loaded {report.loaded} backbone tensors from {cfg.pretrained}{where}")
    elif dist.is_main and (warning := from_scratch_warning(cfg)):
        print(warning)
    if cfg.checkpoint_activations:
        model.set_grad_checkpointing(True)
    model.to(device)
    if dist.distributed:
        model = convert_sync_batchnorm(model, device)
    lr = cfg.lr if cfg.lr is not None else default_lr(cfg, dist.world_size)
    lr_mults = {"head": cfg.head_lr_mult}
    if model.aux_head is not None:
        lr_mults["aux_head"] = cfg.head_lr_mult
    optimizer = torch.optim.SGD(
        build_param_groups(model, lr, cfg.weight_decay, cfg.no_decay_norm, lr_mults),
        lr=lr, momentum=cfg.momentum)
    scheduler = PolyLR(optimizer, total_iters, cfg.poly_power, cfg.min_lr, cfg.warmup_iters)
    precision = training_precision(cfg, device)
    scaler = grad_scaler(device, precision)
    for_training(model, device, precision)

    settings = InferenceSettings.for_training(cfg)
    run = RunState(
        work_dir=work_dir, dist=dist, model=model, optimizer=optimizer, scheduler=scheduler,
        scaler=scaler, iters_per_epoch=iters_per_epoch, best_key="best_miou",
        identity={"task": "segmentation", "model_name": model_name, "model_kwargs": model_kwargs},
        record={"dataset": cfg.dataset, "classes": list(train_set.classes),
                "precision": precision_name(precision),
                "palette": [list(map(int, c)) for c in train_set.palette],
                "inference": dataclasses.asdict(settings),
                "class_weights": weights, "config": dataclasses.asdict(cfg)})
    run.resume(cfg.resume)
    train_model = wrap_for_training(model, dist, cfg.compile)
    validation = {"checkpoint": str((work_dir / BEST_CHECKPOINT_NAME).resolve()),
                  "iteration": total_iters, "dataset": cfg.dataset, "split": "val",
                  "samples": cfg.val_samples, "inference": dataclasses.asdict(settings),
                  "device": str(device), "world_size": dist.world_size, "lr": lr,
                  "precision": precision_name(precision)}
    writer = open_writer(work_dir, dist, cfg.tensorboard, TRAIN_RUN, dataclasses.asdict(cfg),
                         METRIC_TAGS, run.iteration,
                         hparams=segmentation_hparams(dataclasses.asdict(cfg), validation))
    if dist.is_main:
        write_text_atomic(work_dir / "config.yaml", yaml.safe_dump(dataclasses.asdict(cfg)))
        if weights is not None:
            write_class_weights(work_dir, weights, train_set.classes)
            print(summary(weights, train_set.classes, cfg.class_weights))
        print(f"training {model_name} on {cfg.dataset} ({len(train_set)} images, "
              f"{train_set.num_classes} classes) for {total_iters} iterations, "
              f"{dist.world_size} x {device}, batch {cfg.batch_size}/device, lr {lr:g}, "
              f"{precision_name(precision)}"
              f"; logs and checkpoints in {work_dir}")

    skipped: list[str] = []
    warned_samples: set[str] = set()

    def step(item: tuple[dict | None, list[str]]) -> dict[str, float] | None:
        batch, errors = item
        if errors:
            if not cfg.skip_bad_samples:
                raise SegnestError(f"{errors[0]} (or pass --skip-bad-samples to skip "
                                   "unreadable samples with a warning)")
            skipped.extend(errors)
            for error in errors if dist.is_main else ():
                if error not in warned_samples:  # once per file, not once per epoch
                    warned_samples.add(error)
                    tqdm.write(f"warning: skipping a bad sample: {error}", file=sys.stderr)
        if cfg.skip_bad_samples and not _usable(batch, dist):
            return None
        return train_one_step(train_model, batch, optimizer, scheduler, scaler, cfg, device,
                              class_weights, precision)

    warned: list[str] = []

    def validate(progress: Progress) -> float:
        progress.bar.clear()
        if not progress.terminal:  # a log has no bar: say what the pause is
            count = len(val_set) if cfg.val_samples is None else min(cfg.val_samples,
                                                                      len(val_set))
            progress.write(f"iter {run.iteration}: validating on {count} images")
        results, panels = evaluate(model, val_set, settings, device, samples=cfg.val_samples,
                                   panels=cfg.panels if writer else 0,
                                   progress=dist.is_main and progress.terminal,
                                   keep_bar=False, skip_bad_samples=cfg.skip_bad_samples)
        run.metrics = results
        progress.write(f"iter {run.iteration}: val mIoU {percent(results['mIoU'])} "
                       f"pixAcc {percent(results['pixAcc'])} "
                       f"(best {percent(max(run.best, results['mIoU']))})")
        if not warned:  # the validation ground truth is the same each time: say it once
            warned.extend(metric_warnings(results, val_set.classes))
            for warning in warned:
                progress.write(f"warning: validation: {warning}")
        if writer is not None:
            log_segmentation_results(writer, results, train_set.classes, train_set.palette,
                                     panels, run.iteration)
        return results["mIoU"]

    val_interval = cfg.val_interval or max(1, total_iters // 10)
    train_model.train()
    finished = run_loop(
        run, total_iters=total_iters,
        batches=lambda epoch, start: make_loader(train_set, train_transform, cfg, dist,
                                                 epoch, start),
        step=step, validate_due=lambda it: it % val_interval == 0, validate=validate,
        images_per_step=cfg.batch_size * dist.world_size,
        checkpoint_interval=cfg.checkpoint_interval, keep_checkpoints=cfg.keep_checkpoints,
        writer=writer, log_interval=cfg.log_interval,
        task=SEGMENTATION, lr_hint=f"Lower --lr (now {lr:g}), check the labels, or train in fp32")
    close_writer(writer, finished)
    if dist.is_main and skipped:
        print(f"warning: {len(skipped)} bad training sample(s) were skipped "
              f"({len(warned_samples)} distinct file(s), named above)")
    if dist.is_main:
        print(stopped_message(run, total_iters) if not finished
              else _summary(run, train_set.classes))
    return {"iteration": run.iteration, "interrupted": not finished, "signal": run.stopped_by,
            "best_miou": run.best, "metrics": run.metrics, "work_dir": str(work_dir),
            "skipped_samples": len(skipped)}


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
             f"  segnest predict IMAGES_OR_FOLDER --checkpoint {chosen} --out predictions",
             f"  tensorboard --logdir {run.work_dir / TB_FOLDER}"]
    return "\n".join(lines)

