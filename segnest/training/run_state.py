"""The training protocol that ``segnest train`` and ``segnest pretrain`` share.

A run is a process set-up (:func:`training_process`), a model wrapped for it
(:func:`wrap_for_training`), a :class:`RunState` that saves and restores everything the run
needs to continue, and one loop (:func:`run_loop`) that steps, logs, validates, saves and
stops. The commands say only what differs: their data, model, loss and validation.

Exact resume: the sample order of an epoch is a function of (seed, epoch), a sample's
augmentation a function of (seed, epoch, index) (:mod:`segnest.data.sampling`), and every
rank's random generators are stored in each checkpoint, captured before validation and
restored after it, so validating never changes what the run draws next. A run stopped at any
iteration and resumed ends with the weights of one that never stopped.

Checkpoints in the work folder: ``last.pt`` at every validation, every
``--checkpoint-interval`` iterations and when the run is asked to stop; ``best.pt`` when the
validation metric improves (never with non-finite weights); with ``--keep-checkpoints K``
the K newest periodic ones are also kept as ``iter_<N>.pt``.
"""

from __future__ import annotations

import math
import os
import random
import re
import signal
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

import segnest
from segnest.errors import SegnestError
from segnest.models.factory import canonical_model_kwargs
from segnest.runtime.checkpoint import load_checkpoint, save_checkpoint
from segnest.runtime.compiling import compile_model
from segnest.runtime.distributed import DistInfo, cleanup_distributed, init_distributed

LAST_CHECKPOINT_NAME = "last.pt"
BEST_CHECKPOINT_NAME = "best.pt"
_PERIODIC_NAME = re.compile(r"^iter_(\d+)\.pt$")


def periodic_checkpoint_name(iteration: int) -> str:
    """File name of the periodic checkpoint kept at ``iteration`` (``iter_<N>.pt``)."""
    return f"iter_{iteration}.pt"


# ---------------------------------------------------------------------------- process


@contextmanager
def training_process(device: str | None, workers: int) -> Iterator[DistInfo]:
    """Join torchrun's process group (if any) and pick the device; undo both on exit.

    On a CPU, the compute threads leave the data workers their cores: OpenMP threads that
    share a core with a busy worker spin-wait, and a 2-core machine then trains several
    times slower.
    """
    dist = init_distributed(device)
    threads = torch.get_num_threads()
    if dist.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    elif workers > 0:
        torch.set_num_threads(max(1, threads - workers))
    try:
        yield dist
    finally:
        torch.set_num_threads(threads)
        cleanup_distributed()


def check_run_flags(cfg: Any, device: torch.device) -> None:
    """The flags both training commands share: ``--amp``, ``--checkpoint-interval`` and
    ``--keep-checkpoints``."""
    if cfg.amp and device.type != "cuda":
        raise SegnestError(f"--amp needs a CUDA GPU but this run is on {device}; drop --amp "
                           "or use --device cuda on a machine with a GPU")
    for flag, value in (("--checkpoint-interval", cfg.checkpoint_interval),
                        ("--keep-checkpoints", cfg.keep_checkpoints)):
        if value < 0:
            raise SegnestError(f"{flag} must be 0 or more, got {value}")


def optimizer_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, scheduler: Any,
                   scaler: torch.amp.GradScaler) -> None:
    """Backward, (scaled) SGD step and schedule step; a non-finite loss updates nothing
    (the loop stops the run on it)."""
    if not torch.isfinite(loss):
        return
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()


def wrap_for_training(model: nn.Module, dist: DistInfo, compile: bool) -> nn.Module:
    """``model`` in DDP under torchrun, then compiled with ``--compile``; the returned
    module trains, ``model`` itself keeps the weights and the state dict."""
    if dist.distributed:
        ids = [dist.device.index] if dist.device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
    return compile_model(model) if compile else model


def open_writer(work_dir: Path, dist: DistInfo, enabled: bool) -> Any | None:
    """A TensorBoard writer on rank 0 (None elsewhere or when switched off)."""
    if not (enabled and dist.is_main):
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(work_dir))


def parameters_finite(model: nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


# ---------------------------------------------------------------------------- RNG


def capture_rng_state() -> dict[str, Any]:
    """Snapshot of the Python, NumPy, torch CPU and CUDA generators, as tensors and
    primitives only, so a checkpoint holding it loads with ``weights_only=True``."""
    python_version, python_internal, python_gauss = random.getstate()
    bit_generator, numpy_key, numpy_pos, numpy_has_gauss, numpy_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": {
            "version": python_version,
            "internal": torch.tensor(python_internal, dtype=torch.int64),
            "gauss_next": python_gauss,
        },
        "numpy": {
            "bit_generator": bit_generator,
            "key": torch.from_numpy(numpy_key.astype(np.int64)),
            "pos": int(numpy_pos),
            "has_gauss": int(numpy_has_gauss),
            "cached_gaussian": float(numpy_gauss),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Restore generators from ``capture_rng_state``; CUDA states only for visible devices."""
    python = state["python"]
    random.setstate((python["version"], tuple(python["internal"].tolist()), python["gauss_next"]))
    numpy_state = state["numpy"]
    np.random.set_state((
        numpy_state["bit_generator"],
        numpy_state["key"].cpu().numpy().astype(np.uint32),
        numpy_state["pos"],
        numpy_state["has_gauss"],
        numpy_state["cached_gaussian"],
    ))
    torch.set_rng_state(state["torch"].cpu())
    cuda_states = state.get("cuda")
    if cuda_states and torch.cuda.is_available():
        for device_index in range(min(len(cuda_states), torch.cuda.device_count())):
            torch.cuda.set_rng_state(cuda_states[device_index].cpu(), device_index)


def capture_all_rng_states(dist: DistInfo) -> list[dict]:
    """Every rank's RNG state (ranks draw different dropout masks), indexed by rank."""
    state = capture_rng_state()
    if not dist.distributed:
        return [state]
    states: list = [None] * dist.world_size
    torch.distributed.all_gather_object(states, state)
    return states


# ---------------------------------------------------------------------------- stop request


class StopRequest:
    """First Ctrl-C: finish the current iteration, save, exit. Second: stop at once.

    In a distributed run the ranks must stop at the same iteration (the save gathers every
    rank's RNG state), so :meth:`agreed` combines the ranks' flags with an all-reduce once
    per iteration. Under torchrun a terminal's Ctrl-C reaches each worker twice: directly
    and forwarded by the torchrun agent, which waits 30 s before killing them; a repeat
    within ``REPEAT_GRACE_S`` is taken for that copy, not for a second Ctrl-C.
    """

    REPEAT_GRACE_S = 3.0

    def __init__(self, world_size: int = 1, device: torch.device | None = None) -> None:
        self.world_size, self.device = world_size, device
        self.requested = False
        self._first = 0.0
        self._previous = None

    def __enter__(self) -> StopRequest:
        try:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread (e.g. called from a test harness)
            self._previous = None
        return self

    def _handle(self, signum, frame) -> None:
        if not self.requested:
            self.requested, self._first = True, time.monotonic()
        elif self.world_size == 1 or time.monotonic() - self._first > self.REPEAT_GRACE_S:
            raise KeyboardInterrupt

    def agreed(self) -> bool:
        """Whether any rank was asked to stop; call it on every rank at the same point."""
        if self.world_size > 1:
            flag = torch.tensor([int(self.requested)], device=self.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            self.requested = bool(flag.item())
        return self.requested

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


# ---------------------------------------------------------------------------- resume


def find_resume_checkpoint(work_dir: str | os.PathLike) -> Path | None:
    """The newest loadable checkpoint in ``work_dir`` for ``--resume auto``, or None.

    Candidates are ``last.pt`` and ``iter_<N>.pt``, ordered by the iteration stored inside
    (else the number in the name) and then by modification time. Corrupt candidates are
    skipped with a warning.
    """
    work_dir = Path(work_dir)
    if not work_dir.is_dir():
        return None
    best_path: Path | None = None
    best_key: tuple[float, float] | None = None
    for candidate in work_dir.iterdir():
        if not (candidate.is_file() and (candidate.name == LAST_CHECKPOINT_NAME
                                         or _PERIODIC_NAME.match(candidate.name))):
            continue
        try:
            state = load_checkpoint(candidate, mmap=True)
        except SegnestError as error:
            warnings.warn(f"skipping checkpoint for resume: {error}", stacklevel=2)
            continue
        key = (_stored_iteration(candidate, state), candidate.stat().st_mtime)
        if best_key is None or key > best_key:
            best_path, best_key = candidate, key
    return best_path


def _stored_iteration(path: Path, state: Mapping[str, Any]) -> float:
    value = state.get("iteration")
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    match = _PERIODIC_NAME.match(path.name)
    return float(match.group(1)) if match else -1.0


def prune_periodic_checkpoints(work_dir: Path, keep: int) -> list[Path]:
    """Delete all but the ``keep`` highest-numbered ``iter_<N>.pt``; return the deleted.
    ``last.pt`` and ``best.pt`` are never touched."""
    periodic = sorted(((int(m.group(1)), entry) for entry in work_dir.iterdir()
                       if (m := _PERIODIC_NAME.match(entry.name)) and entry.is_file()),
                      reverse=True)
    removed = [entry for _, entry in periodic[keep:]]
    for entry in removed:
        entry.unlink(missing_ok=True)
    return removed


class RunState:
    """What a training run saves, restores and checks on resume.

    ``identity`` (task, model name and constructor arguments) must match on resume; the
    model, optimizer, schedule and grad scaler are restored with the iteration, the best
    validation metric (stored under ``best_key``) and every rank's random generators.
    ``record`` holds what a later command reads from the checkpoint (classes, palette,
    dataset, the command's configuration, ...).
    """

    def __init__(self, *, work_dir: Path, dist: DistInfo, model: nn.Module,
                 optimizer: torch.optim.Optimizer, scheduler: Any, scaler: torch.amp.GradScaler,
                 identity: dict[str, Any], iters_per_epoch: int, best_key: str,
                 record: dict[str, Any]) -> None:
        self.work_dir, self.dist, self.model = work_dir, dist, model
        self.optimizer, self.scheduler, self.scaler = optimizer, scheduler, scaler
        self.identity, self.iters_per_epoch = identity, iters_per_epoch
        self.best_key, self.record = best_key, record
        self.iteration = 0
        self.best = -math.inf
        self.metrics: dict[str, Any] = {}

    @property
    def epoch(self) -> int:
        return self.iteration // self.iters_per_epoch

    def resume(self, resume: str | None) -> Path | None:
        """Restore from ``--resume PATH`` or the newest checkpoint of ``--resume auto``;
        returns the file used (None for a fresh run)."""
        if resume is None:
            return None
        path = find_resume_checkpoint(self.work_dir) if resume == "auto" else Path(resume)
        if path is None:
            if self.dist.is_main:
                print(f"--resume auto: no checkpoint in {self.work_dir} yet; starting a new run")
            return None
        state = load_checkpoint(path)
        self._check_compatible(path, state)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.iteration = int(state["iteration"])
        self.best = float(state.get(self.best_key, -math.inf))
        self.metrics = dict(state.get("metrics") or {})
        restore_rng_state(state["rng"][self.dist.rank])
        if self.dist.is_main:
            print(f"resumed from {path} at iteration {self.iteration}")
        return path

    def _check_compatible(self, path: Path, state: Mapping[str, Any]) -> None:
        stored = {"task": state.get("task", "segmentation"),
                  "model_name": state.get("model_name"),
                  "model_kwargs": canonical_model_kwargs(state.get("model_kwargs") or {})}
        if stored != self.identity:
            raise SegnestError(
                f"--resume {path} was trained as {stored['task']} {stored['model_name']} "
                f"{stored['model_kwargs']}, not {self.identity['task']} "
                f"{self.identity['model_name']} {self.identity['model_kwargs']}; resume with the "
                "same backbone, dataset and model flags, or start a new --work-dir")
        ranks = len(state.get("rng") or ())
        if ranks != self.dist.world_size:
            raise SegnestError(
                f"--resume {path} was written by {ranks} process(es), this run has "
                f"{self.dist.world_size}; resume with the same number of processes to "
                "continue exactly")
        stored_epoch = state.get("iters_per_epoch", self.iters_per_epoch)
        total = state["scheduler"].get("total_iters")
        if stored_epoch != self.iters_per_epoch or total != self.scheduler.total_iters:
            raise SegnestError(
                f"--resume {path} was written by a run of {stored_epoch} iterations per epoch "
                f"and {total} in all, this one has {self.iters_per_epoch} and "
                f"{self.scheduler.total_iters}; resume with the same --batch-size, length "
                "(--iters/--epochs) and number of processes")

    def payload(self, rng: list[dict]) -> dict[str, Any]:
        return {
            **self.record, **self.identity,
            "model": self.model.state_dict(),
            "iteration": self.iteration,
            "epoch": self.epoch,  # completed epochs
            "iters_per_epoch": self.iters_per_epoch,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rng,
            self.best_key: self.best,
            "metrics": self.metrics,
            "segnest_version": segnest.__version__,
        }

    def save(self, rng: list[dict], *, best: bool, keep: int) -> None:
        """Write ``last.pt`` (and ``best.pt``, and a kept ``iter_<N>.pt``) on rank 0."""
        if not self.dist.is_main:
            return
        state = self.payload(rng)
        if best:
            save_checkpoint(state, self.work_dir / BEST_CHECKPOINT_NAME)
        save_checkpoint(state, self.work_dir / LAST_CHECKPOINT_NAME)
        if keep:
            save_checkpoint(state, self.work_dir / periodic_checkpoint_name(self.iteration))
            prune_periodic_checkpoints(self.work_dir, keep)


# ---------------------------------------------------------------------------- loop


class Progress:
    """The console side of a run: a progress bar on a terminal, and the lines that must
    stay (validation results, warnings) printed above it; silent on ranks other than 0."""

    def __init__(self, total: int, initial: int, enabled: bool) -> None:
        self.enabled = enabled
        self.bar = tqdm(total=total, initial=initial, disable=not enabled, desc="train",
                        dynamic_ncols=True, file=sys.stderr)

    def write(self, line: str) -> None:
        if self.enabled:
            self.bar.write(line)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()


def run_loop(
    run: RunState,
    *,
    total_iters: int,
    batches: Callable[[int, int], Iterable[Any]],
    step: Callable[[Any], dict[str, float] | None],
    validate_due: Callable[[int], bool],
    validate: Callable[[Progress], float],
    images_per_step: int,
    checkpoint_interval: int,
    keep_checkpoints: int,
    writer: Any | None,
    log_interval: int,
    lr_hint: str,
) -> bool:
    """Train ``run`` up to ``total_iters``; True when it got there, False when asked to stop
    (after saving ``last.pt``).

    ``batches(epoch, start_batch)`` yields the epoch's batches from ``start_batch`` on;
    ``step(batch)`` trains on one and returns its scalars (``loss`` first), or None for a
    batch it skipped; ``validate`` returns the metric that ``best.pt`` follows and runs at
    every iteration where ``validate_due`` says so and at the last.
    """
    progress = Progress(total_iters, run.iteration, run.dist.is_main)
    stopping = False
    started = time.perf_counter()
    with StopRequest(run.dist.world_size, run.dist.device) as stop, progress:
        while run.iteration < total_iters and not stopping:
            epoch, start_batch = divmod(run.iteration, run.iters_per_epoch)
            for batch in batches(epoch, start_batch):
                scalars = step(batch)
                if scalars is None:
                    continue
                _check_finite(scalars["loss"], run, lr_hint)
                run.iteration += 1
                now = time.perf_counter()
                scalars["lr"] = run.scheduler.get_last_lr()[0]
                scalars["images_per_s"] = images_per_step / max(now - started, 1e-9)
                started = now
                progress.bar.update(1)
                progress.bar.set_postfix({k: f"{v:.3g}" for k, v in scalars.items()})
                if writer is not None and (run.iteration % log_interval == 0
                                           or run.iteration == total_iters):
                    for key, value in scalars.items():
                        writer.add_scalar(f"train/{key}", value, run.iteration)
                validating = validate_due(run.iteration) or run.iteration == total_iters
                periodic = checkpoint_interval > 0 and run.iteration % checkpoint_interval == 0
                stopping = stop.agreed()
                if validating or periodic or stopping:
                    _checkpoint(run, validate if validating else None, progress,
                                keep=keep_checkpoints if periodic else 0)
                    started = time.perf_counter()
                if stopping or run.iteration >= total_iters:
                    break
    return not stopping


def _check_finite(loss: float, run: RunState, lr_hint: str) -> None:
    if math.isfinite(loss):
        return
    last = run.work_dir / LAST_CHECKPOINT_NAME
    kept = f"the last good checkpoint is {last}" if last.exists() else \
        "no checkpoint was written yet"
    raise SegnestError(f"the loss became {loss} at iteration {run.iteration + 1}; training "
                       f"stopped and {kept}. {lr_hint}")


def _checkpoint(run: RunState, validate: Callable[[Progress], float] | None,
                progress: Progress, keep: int) -> None:
    # Validation must not change what the run draws next: the generators are captured
    # before it and restored after, as a resumed run restores them from the file.
    rng = capture_all_rng_states(run.dist)
    best = False
    if validate is not None:
        metric = validate(progress)
        run.model.train()
        best = metric > run.best and parameters_finite(run.model)
        if best:
            run.best = metric
    run.save(rng, best=best, keep=keep)
    restore_rng_state(rng[run.dist.rank])


def stopped_message(run: RunState, total_iters: int) -> str:
    return (f"stopped at iteration {run.iteration}/{total_iters}; checkpoint saved to "
            f"{run.work_dir / LAST_CHECKPOINT_NAME}. Resume with the same command plus "
            "--resume auto")
