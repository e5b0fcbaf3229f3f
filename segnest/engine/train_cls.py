"""Classification pretraining of a ResNeSt backbone (``segnest pretrain``).

The recipe is the paper's (REFERENCE.md): SGD with momentum 0.9, lr 0.1 x total batch /
256, warmup + cosine stepped every iteration, no weight decay on norm layers and biases,
zero-initialised last BN gamma per block, label smoothing, mixup/cutmix and AutoAugment.
The loop reads top to bottom: :func:`train_one_epoch`, :func:`evaluate`,
:func:`run_pretrain`.

Checkpoints: ``last.pt`` at every epoch end, every ``--checkpoint-interval`` iterations
within an epoch and on Ctrl-C (the first one finishes the iteration and saves; a second
stops at once); ``best.pt`` by top-1 at epoch ends. Everything a resumed run needs is
stored — model, optimizer, scheduler, grad scaler, every rank's random generators, the
iteration counter and the best top-1 — and the data side depends only on (seed, epoch,
index): the epoch's order is a seeded permutation that a resumed run enters where it
stopped, and each sample's augmentation is seeded by its index
(:mod:`segnest.data.sampling`). So on a CPU a run resumed mid-epoch ends with the same
weights as an uninterrupted one. ``--export`` writes the final backbone weights in the
official ResNeSt key layout (no ``fc.*``), which ``segnest.load_pretrained`` loads into a
segmentation model.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision import transforms as T
from torchvision.transforms import v2
from tqdm import tqdm

import segnest
from segnest.config import PretrainConfig
from segnest.data.classification import build_classification_dataset
from segnest.data.mini import ensure_mini_classification
from segnest.data.sampling import EpochSampler, SeededSamples, init_train_worker
from segnest.data.transforms import MEAN, STD
from segnest.engine.checkpoint import (
    StopRequest,
    find_resume_checkpoint,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from segnest.engine.compiling import compile_model
from segnest.engine.distributed import (
    DistInfo,
    all_reduce_sum,
    barrier,
    capture_all_rng_states,
    cleanup_distributed,
    convert_sync_batchnorm,
    init_distributed,
    seed_everything,
)
from segnest.engine.optim import build_param_groups
from segnest.engine.schedule import WarmupCosineLR
from segnest.engine.visualize import denormalize
from segnest.errors import SegnestError
from segnest.models import create_model

BatchMixer = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]

# RandomResizedCrop area range: ImageNet's, and a mild one for the 64 px mini images
# whose shapes must stay in view.
IMAGENET_CROP_SCALE = (0.08, 1.0)
MINI_CROP_SCALE = (0.5, 1.0)
VAL_SAMPLE_IMAGES = 16
DATASETS = ("imagenet", "mini")
AUTO_AUGMENT = ("autoaugment", "randaugment", "none")


def build_transforms(crop_size: int, crop_pct: float, auto_augment: str,
                     crop_scale: tuple[float, float]) -> tuple[T.Compose, T.Compose]:
    """Train: RandomResizedCrop, flip, AutoAugment/RandAugment/none, normalise.
    Eval: resize the short side to ``crop_size / crop_pct``, centre crop."""
    if auto_augment not in AUTO_AUGMENT:
        raise SegnestError(
            f"unknown --auto-augment '{auto_augment}'; use autoaugment, randaugment or none"
        )
    steps: list[Any] = [T.RandomResizedCrop(crop_size, scale=crop_scale),
                        T.RandomHorizontalFlip()]
    if auto_augment == "autoaugment":
        steps.append(T.AutoAugment(T.AutoAugmentPolicy.IMAGENET))
    elif auto_augment == "randaugment":
        steps.append(T.RandAugment())
    steps += [T.ToTensor(), T.Normalize(MEAN, STD)]
    eval_transform = T.Compose([
        T.Resize(int(round(crop_size / crop_pct))),
        T.CenterCrop(crop_size),
        T.ToTensor(),
        T.Normalize(MEAN, STD),
    ])
    return T.Compose(steps), eval_transform


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


def train_one_epoch(
    model: nn.Module,
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: WarmupCosineLR,
    scaler: torch.amp.GradScaler,
    loader: DataLoader,
    mixer: BatchMixer | None,
    device: torch.device,
    epoch: int,
    iteration: int,
    amp: bool,
    writer: Any | None = None,
    log_interval: int = 10,
    show_progress: bool = True,
    after_step: Callable[[int], bool] | None = None,
) -> tuple[int, float]:
    """One pass over ``loader``, stepping the schedule every iteration.

    ``after_step(iteration)`` runs after each step (checkpoints, Ctrl-C); when it returns
    True the epoch ends there. Returns the global iteration count and the mean training
    loss of the steps taken.
    """
    model.train()
    total_loss, steps = 0.0, 0
    bar = tqdm(loader, desc=f"epoch {epoch + 1}", disable=not show_progress,
               dynamic_ncols=True, leave=False)
    for images, targets in bar:
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        if mixer is not None:
            images, targets = mixer(images, targets)
        with torch.autocast(device.type, enabled=amp):
            loss = criterion(model(images), targets)
        loss_value = loss.item()
        if not math.isfinite(loss_value):
            raise SegnestError(
                f"training loss became {loss_value} at iteration {iteration}; lower --lr "
                "or check the data"
            )
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        iteration += 1
        total_loss += loss_value
        steps += 1
        lr = optimizer.param_groups[0]["lr"]
        bar.set_postfix(loss=f"{loss_value:.3f}", lr=f"{lr:.4g}")
        if writer is not None and iteration % log_interval == 0:
            writer.add_scalar("train/loss", loss_value, iteration)
            writer.add_scalar("train/lr", lr, iteration)
        if after_step is not None and after_step(iteration):
            break
    bar.close()
    return iteration, total_loss / max(steps, 1)


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device, num_classes: int,
             amp: bool = False) -> dict[str, float]:
    """Top-1 and top-5 accuracy in percent (top-5 becomes top-K when there are fewer than
    5 classes), summed over all processes."""
    model.eval()
    ks = (1, min(5, num_classes))
    counts = torch.zeros(3, dtype=torch.float64, device=device)
    for images, targets in loader:
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        with torch.autocast(device.type, enabled=amp):
            logits = model(images)
        top1, topk = topk_correct(logits.float(), targets, ks)
        counts += torch.tensor([top1, topk, targets.numel()], dtype=torch.float64,
                               device=device)
    correct1, correctk, total = all_reduce_sum(counts).tolist()
    total = max(total, 1.0)
    return {"top1": 100.0 * correct1 / total, "top5": 100.0 * correctk / total}


@torch.no_grad()
def log_val_samples(writer: Any, model: nn.Module, dataset: Dataset, classes: list[str],
                    device: torch.device, epoch: int) -> None:
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
    writer.add_images("val/samples", pictures, epoch)
    lines = [f"{i}: predicted **{classes[p]}**, true {classes[t]}"
             + ("" if p == t else " (wrong)")
             for i, (p, (_, t)) in enumerate(zip(predictions, samples, strict=True))]
    writer.add_text("val/sample_labels", "  \n".join(lines), epoch)


def _datasets(cfg: PretrainConfig) -> tuple[Dataset, Dataset, list[str]]:
    if cfg.dataset not in DATASETS:
        raise SegnestError(f"unknown --dataset '{cfg.dataset}'; use imagenet (with --data) or mini")
    if cfg.dataset == "mini":
        root = ensure_mini_classification()
        crop_scale = MINI_CROP_SCALE
    else:
        if not cfg.data:
            raise SegnestError(
                "--dataset imagenet needs --data: a folder with train/<class>/ and "
                "val/<class>/ image folders (ImageNet layout)"
            )
        root, crop_scale = Path(cfg.data), IMAGENET_CROP_SCALE
    train_transform, eval_transform = build_transforms(
        cfg.crop_size, cfg.crop_pct, cfg.auto_augment, crop_scale)
    train_set = build_classification_dataset(root, "train", train_transform)
    val_set = build_classification_dataset(root, "val", eval_transform)
    if train_set.classes != val_set.classes:
        raise SegnestError(
            f"{root}: train/ and val/ hold different class folders; give both the same "
            "class sub-folders"
        )
    return train_set, val_set, list(train_set.classes)


def _val_loader(cfg: PretrainConfig, val_set: Dataset, dist_info: DistInfo) -> DataLoader:
    # Each process evaluates a disjoint slice, without the padding DistributedSampler adds,
    # so the summed counts cover every validation image exactly once.
    val_indices = range(dist_info.rank, len(val_set), dist_info.world_size)  # type: ignore[arg-type]
    return DataLoader(Subset(val_set, val_indices), batch_size=cfg.batch_size, shuffle=False,
                      num_workers=cfg.workers, pin_memory=dist_info.device.type == "cuda")


def _train_loader(cfg: PretrainConfig, train_set: SeededSamples, dist_info: DistInfo,
                  epoch: int, start_batch: int) -> DataLoader:
    """This rank's batches of ``epoch``, from batch ``start_batch`` on (a resumed run)."""
    train_set.set_epoch(epoch)
    sampler = EpochSampler(len(train_set), cfg.seed, epoch, dist_info.rank,
                           dist_info.world_size, start=start_batch * cfg.batch_size)
    return DataLoader(train_set, batch_size=cfg.batch_size, sampler=sampler,
                      num_workers=cfg.workers, pin_memory=dist_info.device.type == "cuda",
                      drop_last=True, worker_init_fn=init_train_worker,
                      generator=torch.Generator().manual_seed(
                          cfg.seed * 1_000_003 + epoch * 1_009 + dist_info.rank))


def model_kwargs(cfg: PretrainConfig, num_classes: int) -> dict[str, Any]:
    """``create_model`` arguments of the classifier; stored in checkpoints as
    ``model_kwargs`` so that the model can be rebuilt from the file alone."""
    kwargs: dict[str, Any] = dict(num_classes=num_classes, base_width=cfg.base_width,
                                  last_gamma=cfg.last_gamma, dropblock_prob=cfg.dropblock_prob,
                                  final_drop=cfg.final_drop)
    if cfg.stem_width is not None:
        kwargs["stem_width"] = cfg.stem_width
    return kwargs


def build_optimizer(model: nn.Module, lr: float, momentum: float, weight_decay: float
                    ) -> torch.optim.SGD:
    """SGD with weight decay on every parameter except norm layers and biases."""
    groups = build_param_groups(model, lr=lr, weight_decay=weight_decay, no_decay_norm=True)
    return torch.optim.SGD(groups, lr=lr, momentum=momentum)


def backbone_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The classifier's weights without ``fc.*``: the official ResNeSt key layout that a
    feature backbone or ``deeplabv3_<backbone>`` loads."""
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()
            if not k.startswith("fc.")}


def _resume_path(cfg: PretrainConfig, work_dir: Path) -> Path | None:
    if cfg.resume is None:
        return None
    if cfg.resume == "auto":
        return find_resume_checkpoint(work_dir)
    return Path(cfg.resume)


def run_pretrain(cfg: PretrainConfig) -> dict[str, Any]:
    """Pretrain ``cfg.backbone`` as a classifier; return the final metrics and file paths.

    The returned dict holds ``top1``, ``top5`` (last epoch), ``best_top1``, ``epochs``,
    ``iterations``, ``seconds`` and the paths ``work_dir``, ``last``, ``best`` and
    ``export`` (None without ``--export``).
    """
    dist_info = init_distributed(cfg.device)
    threads = torch.get_num_threads()
    try:
        return _run(cfg, dist_info)
    finally:
        torch.set_num_threads(threads)
        cleanup_distributed()


def _run(cfg: PretrainConfig, dist_info: DistInfo) -> dict[str, Any]:
    device = dist_info.device
    if cfg.amp and device.type != "cuda":
        raise SegnestError(
            f"--amp needs a CUDA GPU but this run is on {device}; drop --amp or use "
            "--device cuda on a machine with a GPU"
        )
    if cfg.epochs <= 0:
        raise SegnestError(f"--epochs {cfg.epochs}: give a positive number of epochs")
    seed_everything(cfg.seed, dist_info.rank)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    elif cfg.workers > 0:
        # Leave the data workers their cores: OpenMP threads that share a core with a busy
        # worker spin-wait, and a 2-core machine then trains several times slower.
        torch.set_num_threads(max(1, torch.get_num_threads() - cfg.workers))
    work_dir = Path(cfg.work_dir or f"runs/pretrain_{cfg.dataset}_{cfg.backbone}")

    plain_train_set, val_set, classes = _datasets(cfg)
    num_classes = len(classes)
    train_set = SeededSamples(plain_train_set, cfg.seed)
    per_rank = len(train_set) // dist_info.world_size
    if per_rank < cfg.batch_size:
        raise SegnestError(
            f"--batch-size {cfg.batch_size} is larger than the {per_rank} training images "
            "per process; lower --batch-size"
        )
    if cfg.checkpoint_interval < 0:
        raise SegnestError(f"--checkpoint-interval must be 0 or more, got "
                           f"{cfg.checkpoint_interval}")
    val_loader = _val_loader(cfg, val_set, dist_info)

    kwargs = model_kwargs(cfg, num_classes)
    model = create_model(cfg.backbone, **kwargs).to(device)
    if dist_info.distributed:
        model = convert_sync_batchnorm(model, device)
    model_without_ddp = model
    total_batch = cfg.batch_size * dist_info.world_size
    lr = cfg.lr if cfg.lr is not None else 0.1 * total_batch / 256
    optimizer = build_optimizer(model, lr, cfg.momentum, cfg.weight_decay)
    iters_per_epoch = per_rank // cfg.batch_size
    total_iters = cfg.epochs * iters_per_epoch
    warmup_iters = min(int(round(cfg.warmup_epochs * iters_per_epoch)), total_iters)
    scheduler = WarmupCosineLR(optimizer, total_iters=total_iters, warmup_iters=warmup_iters)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp)
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    mixer = build_batch_mixer(cfg.mixup, cfg.cutmix, num_classes)

    iteration, best_top1 = 0, -1.0
    resume_from = _resume_path(cfg, work_dir)
    if resume_from is not None:
        checkpoint = load_checkpoint(resume_from, map_location="cpu")
        task, name = checkpoint.get("task"), checkpoint.get("model_name")
        if task != "classification" or name != cfg.backbone:
            raise SegnestError(
                f"--resume {resume_from} is not a pretraining checkpoint of {cfg.backbone} "
                f"(task {task}, model {name}); "
                "resume with the same --backbone and a checkpoint from segnest pretrain"
            )
        stored = checkpoint.get("iters_per_epoch", iters_per_epoch)
        if stored != iters_per_epoch or checkpoint["scheduler"].get("total_iters") != total_iters:
            raise SegnestError(
                f"--resume {resume_from} was written by a run of {stored} iterations per epoch "
                f"and {checkpoint['scheduler'].get('total_iters')} in all, this one has "
                f"{iters_per_epoch} and {total_iters}; resume with the same --batch-size, "
                "--epochs and number of processes"
            )
        model_without_ddp.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        scaler.load_state_dict(checkpoint["scaler"])
        iteration = checkpoint["iteration"]
        best_top1 = checkpoint["best_top1"]
        rng_states = checkpoint["rng"]
        if isinstance(rng_states, dict):  # written by one process before 0.1's per-rank list
            rng_states = [rng_states]
        if len(rng_states) != dist_info.world_size:
            raise SegnestError(
                f"--resume {resume_from} was written by {len(rng_states)} process(es), this "
                f"run has {dist_info.world_size}; resume with the same number of processes"
            )
        restore_rng_state(rng_states[dist_info.rank])
    start_epoch, start_batch = divmod(iteration, iters_per_epoch)

    if dist_info.distributed:
        model = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        model = compile_model(model)

    writer = None
    if dist_info.is_main and cfg.tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(work_dir))
    if dist_info.is_main:
        where = ""
        if resume_from and iteration >= total_iters:
            where = f", {resume_from} has already finished all {total_iters} iterations"
        elif resume_from:
            where = f", resuming {resume_from} at epoch {start_epoch + 1} iteration {iteration}"
        print(f"segnest pretrain: {cfg.backbone} on {cfg.dataset} ({len(train_set)} train / "
              f"{len(val_set)} val images, {num_classes} classes), {cfg.epochs} epochs x "
              f"{iters_per_epoch} iterations, batch {total_batch}, lr {lr:g}, device "
              f"{device}{where}; logs in {work_dir}")

    def checkpoint_state(rng: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "model": model_without_ddp.state_dict(),
            "model_name": cfg.backbone,
            "model_kwargs": kwargs,
            "task": "classification",
            "classes": classes,
            "epoch": iteration // iters_per_epoch,  # completed epochs
            "iteration": iteration,
            "iters_per_epoch": iters_per_epoch,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            "rng": rng,
            "best_top1": best_top1,
            "config": dataclasses.asdict(cfg),
            "segnest_version": segnest.__version__,
        }

    last_path, best_path = work_dir / "last.pt", work_dir / "best.pt"
    metrics: dict[str, float] = {}
    started = time.perf_counter()

    def after_step(step: int) -> bool:
        """Mid-epoch saves (periodic and on Ctrl-C); True ends the epoch early."""
        nonlocal iteration
        iteration = step
        periodic = cfg.checkpoint_interval and step % cfg.checkpoint_interval == 0
        stopping = stop.agreed()
        if (periodic or stopping) and step % iters_per_epoch:  # epoch ends save anyway
            state = checkpoint_state(capture_all_rng_states(dist_info))
            if dist_info.is_main:
                save_checkpoint(state, last_path)
        return stopping

    with StopRequest(dist_info.world_size, device) as stop:
        for epoch in range(start_epoch, cfg.epochs):
            train_loader = _train_loader(cfg, train_set, dist_info, epoch,
                                         start_batch if epoch == start_epoch else 0)
            iteration, train_loss = train_one_epoch(
                model, criterion, optimizer, scheduler, scaler, train_loader, mixer, device,
                epoch=epoch, iteration=iteration, amp=cfg.amp, writer=writer,
                log_interval=cfg.log_interval, show_progress=dist_info.is_main,
                after_step=after_step)
            if iteration % iters_per_epoch:  # stopped by Ctrl-C, checkpoint written
                break
            metrics = evaluate(model, val_loader, device, num_classes, cfg.amp)
            is_best = metrics["top1"] > best_top1
            best_top1 = max(best_top1, metrics["top1"])
            rng = capture_all_rng_states(dist_info)
            if dist_info.is_main:
                print(f"epoch {epoch + 1}/{cfg.epochs}: train loss {train_loss:.4f}, "
                      f"val top1 {metrics['top1']:.2f}%, top{min(5, num_classes)} "
                      f"{metrics['top5']:.2f}%, {time.perf_counter() - started:.0f}s")
                if writer is not None:
                    writer.add_scalar("val/top1", metrics["top1"], epoch + 1)
                    writer.add_scalar("val/top5", metrics["top5"], epoch + 1)
                    writer.add_scalar("train/epoch_loss", train_loss, epoch + 1)
                    log_val_samples(writer, model_without_ddp, val_set, classes, device,
                                    epoch + 1)
                    writer.flush()
                state = checkpoint_state(rng)
                save_checkpoint(state, last_path)
                if is_best:
                    save_checkpoint(state, best_path)
            barrier()
            if stop.agreed():
                break
    if iteration < total_iters:
        if writer is not None:
            writer.close()
        if dist_info.is_main:
            print(f"stopped at iteration {iteration}/{total_iters}; checkpoint saved to "
                  f"{last_path}. Resume with the same command plus --resume auto")
        return {"iterations": iteration, "interrupted": True, "work_dir": str(work_dir),
                "last": str(last_path)}
    if not metrics:
        metrics = evaluate(model, val_loader, device, num_classes, cfg.amp)

    if cfg.export and dist_info.is_main:
        save_checkpoint(backbone_state_dict(model_without_ddp), cfg.export)
        print(f"exported backbone weights to {cfg.export}")
    if writer is not None:
        writer.close()
    barrier()
    return {
        "top1": metrics["top1"],
        "top5": metrics["top5"],
        "best_top1": best_top1,
        "epochs": cfg.epochs,
        "iterations": iteration,
        "seconds": time.perf_counter() - started,
        "work_dir": str(work_dir),
        "last": str(last_path),
        "best": str(best_path),
        "export": cfg.export,
        "interrupted": False,
    }


__all__ = [
    "backbone_state_dict",
    "build_batch_mixer",
    "build_optimizer",
    "build_transforms",
    "evaluate",
    "model_kwargs",
    "run_pretrain",
    "topk_correct",
    "train_one_epoch",
]
