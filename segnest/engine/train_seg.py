"""``segnest train``: DeepLabV3 on a ResNeSt backbone, the paper's recipe.

Reads top to bottom: ``run_train`` checks the configuration, builds data, model,
optimizer and schedule, optionally resumes, then runs ``train_one_step`` per iteration
with validation, checkpoints and TensorBoard logging in between.

Exact resume: the sample order of an epoch is a function of (seed, epoch), the
augmentation of a sample a function of (seed, epoch, index), and the global RNG state
(dropout) is stored in every checkpoint, so a run that is stopped and resumed ends with the
same weights as one that was not.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader, Dataset, default_collate
from tqdm import tqdm

import segnest
from segnest.config import TrainConfig
from segnest.data import SegEvalTransform, SegTrainTransform, build_dataset
from segnest.data.sampling import EpochSampler, init_train_worker
from segnest.engine.checkpoint import (
    LAST_CHECKPOINT_NAME,
    StopRequest,
    find_resume_checkpoint,
    load_checkpoint,
    periodic_checkpoint_name,
    restore_rng_state,
    save_checkpoint,
)
from segnest.engine.compiling import compile_model
from segnest.engine.distributed import (
    DistInfo,
    capture_all_rng_states,
    convert_sync_batchnorm,
    init_distributed,
    seed_everything,
)
from segnest.engine.evaluate import evaluate
from segnest.engine.inference import InferenceConfig
from segnest.engine.optim import build_param_groups
from segnest.engine.pixelwise import fuses_upsampling, upsampled_cross_entropy
from segnest.engine.schedule import PolyLR
from segnest.errors import SegnestError
from segnest.models import RESNEST_VARIANTS, create_model
from segnest.models.deeplabv3 import DeepLabV3
from segnest.models.weights import load_pretrained

IGNORE_INDEX = 255
BEST_CHECKPOINT_NAME = "best.pt"


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


def segmentation_loss(outputs: dict[str, torch.Tensor], target: torch.Tensor,
                      aux_weight: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """CE on the main logits plus ``aux_weight`` x CE on the auxiliary logits, at the
    target's size: logits at a lower resolution (``model(x, upsample=False)``) are
    upsampled inside the loss, as the model would have done."""
    def criterion(logits: torch.Tensor) -> torch.Tensor:
        return upsampled_cross_entropy(logits, target, IGNORE_INDEX, DeepLabV3.ALIGN_CORNERS)

    loss = criterion(outputs["out"])
    aux = None
    if "aux" in outputs:
        aux = criterion(outputs["aux"])
        loss = loss + aux_weight * aux
    return loss, aux


def check_config(cfg: TrainConfig, dist: DistInfo) -> None:
    """Catch settings that cannot work before any data is read or weight is built."""
    if cfg.backbone not in RESNEST_VARIANTS:
        raise SegnestError(f"unknown --backbone '{cfg.backbone}'; choose one of: "
                           f"{', '.join(RESNEST_VARIANTS)}")
    if cfg.batch_size < 1:
        raise SegnestError(f"--batch-size must be at least 1, got {cfg.batch_size}")
    if cfg.batch_size == 1 and not dist.distributed:
        raise SegnestError(
            "--batch-size 1 on a single device cannot train: the BatchNorm after the global "
            "pooling in Split-Attention (and in the ASPP image branch) needs at least 2 "
            "samples; use --batch-size 2 or more, or several devices with torchrun (SyncBN "
            "pools the statistics across them)")
    if cfg.output_stride not in (8, 16, 32):
        raise SegnestError(f"--output-stride must be 8, 16 or 32, got {cfg.output_stride}")
    if cfg.iters is None and cfg.epochs is None:
        raise SegnestError("give the training length with --iters or --epochs")
    for flag, value in (("--iters", cfg.iters), ("--epochs", cfg.epochs)):
        if value is not None and value < 1:
            raise SegnestError(f"{flag} must be positive, got {value}")
    if not 0 < cfg.scale_min <= cfg.scale_max:
        raise SegnestError(f"--scale-min/--scale-max must satisfy 0 < min <= max, got "
                           f"{cfg.scale_min}, {cfg.scale_max}")
    if cfg.crop_size is None or cfg.base_size is None:
        raise SegnestError("--crop-size and --base-size are needed for this dataset")
    if cfg.base_size * cfg.scale_max < cfg.crop_size:
        raise SegnestError(
            f"--crop-size {cfg.crop_size} is larger than any scaled image (long side at most "
            f"--base-size {cfg.base_size} x --scale-max {cfg.scale_max}); every crop would be "
            "mostly padding: lower --crop-size or raise --base-size")
    if cfg.amp and dist.device.type != "cuda":
        raise SegnestError("--amp needs a CUDA device; drop --amp to train on the CPU")


def default_lr(cfg: TrainConfig, world_size: int) -> float:
    """0.01 for a total batch of 16 (the authors' distributed script), scaled linearly."""
    return 0.01 * cfg.batch_size * world_size / 16


def model_kwargs_for(cfg: TrainConfig, num_classes: int) -> dict[str, Any]:
    kwargs: dict[str, Any] = dict(num_classes=num_classes, aux=cfg.aux,
                                  head_channels=cfg.head_channels,
                                  output_stride=cfg.output_stride, base_width=cfg.base_width)
    if cfg.stem_width is not None:
        kwargs["stem_width"] = cfg.stem_width
    return kwargs


def make_loader(dataset, transform: SegTrainTransform, cfg: TrainConfig, dist: DistInfo,
                epoch: int, start_batch: int) -> DataLoader:
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
                   device: torch.device) -> tuple[float, float | None]:
    image = batch["image"].to(device, non_blocking=True)
    target = batch["mask"].to(device, non_blocking=True)
    with torch.autocast(device.type, enabled=cfg.amp):
        outputs = model(image, upsample=not fuses_upsampling(device))
        loss, aux = segmentation_loss(outputs, target, cfg.aux_weight)
    loss_value = loss.item()
    if not math.isfinite(loss_value):
        return loss_value, None
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()
    return loss_value, None if aux is None else aux.item()


def unwrap(model: nn.Module) -> nn.Module:
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def parameters_finite(model: nn.Module) -> bool:
    return all(torch.isfinite(p).all() for p in model.parameters())


def run_train(cfg: TrainConfig) -> dict[str, Any]:
    dist = init_distributed(cfg.device)
    check_config(cfg, dist)
    device = dist.device
    seed_everything(cfg.seed, dist.rank)
    work_dir = Path(cfg.work_dir or f"runs/{cfg.dataset}_{cfg.backbone}")

    # Data.
    train_transform = SegTrainTransform(
        cfg.base_size, cfg.crop_size, (cfg.scale_min, cfg.scale_max), cfg.cat_max_ratio,
        photometric=cfg.photometric, ignore_index=IGNORE_INDEX, seed=cfg.seed)
    train_set = build_dataset(cfg.dataset, cfg.data_root, "train", train_transform)
    val_set = build_dataset(cfg.dataset, cfg.data_root, "val", SegEvalTransform())
    iters_per_epoch = len(train_set) // (cfg.batch_size * dist.world_size)
    if iters_per_epoch == 0:
        raise SegnestError(
            f"the {cfg.dataset} train split has {len(train_set)} images, fewer than one batch "
            f"({cfg.batch_size} x {dist.world_size} devices); lower --batch-size")
    total_iters = cfg.iters or cfg.epochs * iters_per_epoch
    val_interval = cfg.val_interval or max(1, total_iters // 10)

    # Model, optimizer, schedule.
    model_name = f"deeplabv3_{cfg.backbone}"
    model_kwargs = model_kwargs_for(cfg, train_set.num_classes)
    model = create_model(model_name, **model_kwargs)
    if cfg.pretrained:
        report = load_pretrained(model, cfg.pretrained)
        if dist.is_main:
            print(f"loaded {report.loaded} backbone tensors from {cfg.pretrained}")
    if cfg.checkpoint_activations:
        model.set_grad_checkpointing(True)
    model.to(device)
    if dist.distributed:
        model = convert_sync_batchnorm(model, device)
    lr = cfg.lr if cfg.lr is not None else default_lr(cfg, dist.world_size)
    optimizer = torch.optim.SGD(
        build_param_groups(model, lr, cfg.weight_decay, cfg.no_decay_norm,
                           lr_mults={"head": cfg.head_lr_mult, "aux_head": cfg.head_lr_mult}),
        lr=lr, momentum=cfg.momentum)
    scheduler = PolyLR(optimizer, total_iters, cfg.poly_power, cfg.min_lr, cfg.warmup_iters)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp)

    # Resume.
    start_iter, best_miou = 0, -1.0
    resume_path = find_resume_checkpoint(work_dir) if cfg.resume == "auto" else cfg.resume
    if resume_path:
        state = load_checkpoint(resume_path)
        if state.get("model_name") != model_name or state.get("model_kwargs") != model_kwargs:
            raise SegnestError(
                f"--resume {resume_path} was trained as {state.get('model_name')} "
                f"{state.get('model_kwargs')}, not {model_name} {model_kwargs}; resume with the "
                "same --backbone, dataset and model flags, or start a new --work-dir")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        start_iter, best_miou = state["iteration"], state.get("best_miou", -1.0)
        rng_states = state["rng"]
        if len(rng_states) != dist.world_size:
            raise SegnestError(
                f"--resume {resume_path} was written by {len(rng_states)} process(es); resume "
                f"it with the same number (now {dist.world_size}) to continue exactly")
        restore_rng_state(rng_states[dist.rank])
        if dist.is_main:
            print(f"resumed from {resume_path} at iteration {start_iter}")
    elif cfg.resume == "auto" and dist.is_main:
        print(f"--resume auto: no checkpoint in {work_dir} yet; starting a new run")

    train_model: nn.Module = model
    if dist.distributed:
        ids = [device.index] if device.type == "cuda" else None
        train_model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
    if cfg.compile:
        train_model = compile_model(train_model)

    writer = None
    if dist.is_main:
        work_dir.mkdir(parents=True, exist_ok=True)
        (work_dir / "config.yaml").write_text(yaml.safe_dump(dataclasses.asdict(cfg)))
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(work_dir))
        print(f"training {model_name} on {cfg.dataset} ({len(train_set)} images, "
              f"{train_set.num_classes} classes) for {total_iters} iterations, "
              f"{dist.world_size} x {device}, batch {cfg.batch_size}/device, lr {lr:g}; "
              f"logs and checkpoints in {work_dir}")

    infer_cfg = InferenceConfig(mode="whole", scales=(1.0,), base_size=cfg.base_size)

    def checkpoint_state(iteration: int, rng: list[dict], metrics: dict | None) -> dict[str, Any]:
        return {
            "model": unwrap(model).state_dict(), "model_name": model_name,
            "model_kwargs": model_kwargs, "dataset": cfg.dataset,
            "classes": list(train_set.classes),
            "palette": [list(map(int, c)) for c in train_set.palette],
            "config": dataclasses.asdict(cfg), "iteration": iteration,
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(), "rng": rng, "best_miou": best_miou,
            "metrics": metrics or {}, "segnest_version": segnest.__version__,
        }

    def validate(iteration: int) -> dict:
        results, panels = evaluate(unwrap(model), val_set, infer_cfg, device,
                                   samples=cfg.val_samples, panels=cfg.panels if writer else 0,
                                   progress=False, skip_bad_samples=cfg.skip_bad_samples)
        if writer is not None:
            from segnest.engine.visualize import log_panels

            for key in ("pixAcc", "mIoU", "mAcc"):
                writer.add_scalar(f"val/{key}", results[key], iteration)
            for name, iou in zip(train_set.classes, results["IoU"], strict=True):
                if iou == iou:  # NaN: class absent from ground truth and prediction
                    writer.add_scalar(f"val_IoU/{name}", iou, iteration)
            log_panels(writer, "val/image_gt_pred", panels, iteration)
        return results

    last_metrics: dict = {}
    skipped_samples = 0
    iteration = start_iter
    bar = tqdm(total=total_iters, initial=start_iter, disable=not dist.is_main,
               desc="train", dynamic_ncols=True)
    train_model.train()
    step_start = time.perf_counter()
    stopping = False
    with StopRequest(dist.world_size, device) as stop, bar:
        while iteration < total_iters and not stopping:
            epoch, batch_in_epoch = divmod(iteration, iters_per_epoch)
            loader = make_loader(train_set, train_transform, cfg, dist, epoch, batch_in_epoch)
            for batch, errors in loader:
                if errors:
                    if not cfg.skip_bad_samples:
                        raise SegnestError(f"{errors[0]} (or pass --skip-bad-samples to "
                                           "skip unreadable samples with a warning)")
                    skipped_samples += len(errors)
                    for error in errors:
                        bar.write(f"warning: skipping a bad sample: {error}")
                    # BatchNorm needs two samples; a batch emptied by bad files is dropped.
                    if batch is None or batch["image"].shape[0] < 2:
                        continue
                loss, aux = train_one_step(train_model, batch, optimizer, scheduler, scaler,
                                           cfg, device)
                if not math.isfinite(loss):
                    last = work_dir / LAST_CHECKPOINT_NAME
                    kept = f"the last good checkpoint is {last}" if last.exists() else \
                        "no checkpoint was written yet"
                    raise SegnestError(
                        f"the loss became {loss} at iteration {iteration + 1}; training stopped "
                        f"and {kept}. Lower --lr (now {lr:g}), check the labels, or drop --amp")
                iteration += 1
                bar.update(1)
                now = time.perf_counter()
                images_per_s = cfg.batch_size * dist.world_size / max(now - step_start, 1e-9)
                step_start = now
                current_lr = scheduler.get_last_lr()[0]
                bar.set_postfix(loss=f"{loss:.3f}", lr=f"{current_lr:.2e}",
                                img_s=f"{images_per_s:.1f}")
                if writer is not None and (iteration % cfg.log_interval == 0
                                           or iteration == total_iters):
                    writer.add_scalar("train/loss", loss, iteration)
                    if aux is not None:
                        writer.add_scalar("train/aux_loss", aux, iteration)
                    writer.add_scalar("train/lr", current_lr, iteration)
                    writer.add_scalar("train/images_per_s", images_per_s, iteration)
                validate_now = iteration % val_interval == 0 or iteration == total_iters
                periodic = cfg.checkpoint_interval and iteration % cfg.checkpoint_interval == 0
                stopping = stop.agreed()
                if validate_now or periodic or stopping:
                    # Keep the RNG as the uninterrupted run has it: validation must not
                    # change what a resumed run would draw next.
                    rng = capture_all_rng_states(dist)
                    if validate_now:
                        last_metrics = validate(iteration)
                        train_model.train()
                        is_best = last_metrics["mIoU"] > best_miou and parameters_finite(model)
                        if is_best:
                            best_miou = last_metrics["mIoU"]
                        if dist.is_main:
                            bar.write(f"iter {iteration}: mIoU {last_metrics['mIoU']:.4f} "
                                      f"pixAcc {last_metrics['pixAcc']:.4f} "
                                      f"(best {best_miou:.4f})")
                            if is_best:
                                save_checkpoint(checkpoint_state(iteration, rng, last_metrics),
                                                work_dir / BEST_CHECKPOINT_NAME)
                    if dist.is_main:
                        state = checkpoint_state(iteration, rng, last_metrics)
                        save_checkpoint(state, work_dir / LAST_CHECKPOINT_NAME)
                        if periodic:
                            save_checkpoint(state, work_dir / periodic_checkpoint_name(iteration))
                    restore_rng_state(rng[dist.rank])
                    step_start = time.perf_counter()
                if iteration >= total_iters or stopping:
                    break
    bar.close()
    if writer is not None:
        writer.close()
    if skipped_samples and dist.is_main:
        print(f"warning: {skipped_samples} bad training sample(s) were skipped")
    if stopping and iteration < total_iters:
        if dist.is_main:
            print(f"stopped at iteration {iteration}/{total_iters}; checkpoint saved to "
                  f"{work_dir / LAST_CHECKPOINT_NAME}. Resume with the same command plus "
                  "--resume auto")
        return {"iteration": iteration, "interrupted": True, "work_dir": str(work_dir)}
    return {"iteration": iteration, "best_miou": best_miou, "metrics": last_metrics,
            "work_dir": str(work_dir), "interrupted": False, "skipped_samples": skipped_samples}
