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
validation metric improves; with ``--keep-checkpoints K`` the K newest periodic ones are
also kept as ``iter_<N>.pt``. Weights that are not finite are never written.

The work folder belongs to one run (:func:`run_folder`): it is locked while the run lives,
a new run refuses a folder that holds an earlier run's checkpoints (``--resume`` continues
it, ``--overwrite`` replaces it), and what the console shows is also appended to
``train.log`` / ``pretrain.log`` there. TensorBoard events go to ``tb/train`` /
``tb/pretrain`` in it (:mod:`segnest.inference.tensorboard`).

What ``--resume`` takes from the checkpoint: the weights, the optimizer's momentum buffers,
the grad scaler, the iteration and sample position, the best metric and every rank's random
generators. What it takes from the command line: everything else, so the learning-rate
schedule is rebuilt for the length, learning rate and schedule flags given now and continues
from the stored iteration (``--iters 6`` after a 2-iteration run trains iterations 3-6 of a
6-iteration schedule). Changes that cannot continue the run exactly are refused: another
model, batch size, seed, number of processes or training set size.

Exit codes of an interrupted run (:data:`segnest.errors.STOP_EXIT_CODES`): 130 after
Ctrl-C (SIGINT), 143 after SIGTERM (SLURM, Kubernetes); both save ``last.pt`` first.
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
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

import segnest
from segnest.errors import SegnestError
from segnest.inference.tensorboard import (
    TB_FOLDER,
    hparams_of,
    log_config,
    log_hparams,
    run_dir,
    session_name,
    training_tag,
)
from segnest.models.factory import canonical_model_kwargs
from segnest.runtime.checkpoint import load_checkpoint, save_checkpoint
from segnest.runtime.compiling import compile_model
from segnest.runtime.console import ConsoleLog, console_streams, is_terminal
from segnest.runtime.distributed import (
    DistInfo,
    agree,
    cleanup_distributed,
    init_distributed,
)
from segnest.runtime.lock import FolderLock
from segnest.runtime.precision import requested_precision, resolve_precision
from segnest.runtime.threads import threads_beside_workers

LAST_CHECKPOINT_NAME = "last.pt"
BEST_CHECKPOINT_NAME = "best.pt"
_PERIODIC_NAME = re.compile(r"^iter_(\d+)\.pt$")
_EVENTS_PREFIX = "events.out.tfevents."


def periodic_checkpoint_name(iteration: int) -> str:
    """File name of the periodic checkpoint kept at ``iteration`` (``iter_<N>.pt``)."""
    return f"iter_{iteration}.pt"


# ---------------------------------------------------------------------------- process


@contextmanager
def training_process(device: str | None, workers: int) -> Iterator[DistInfo]:
    """Join torchrun's process group (if any) and pick the device; undo both on exit.

    On a CPU, the compute threads leave the data workers their cores
    (:func:`segnest.runtime.threads.threads_beside_workers`, as ``segnest eval`` does).
    """
    dist = init_distributed(device)
    if dist.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    try:
        with threads_beside_workers(dist.device, workers):
            yield dist
    finally:
        cleanup_distributed()


def check_run_flags(cfg: Any, device: torch.device) -> None:
    """What the training commands' shared flags need beyond their own ranges: a
    ``--precision`` (or ``--amp``) that ``device`` runs natively, ``--resume`` and
    ``--overwrite`` not both."""
    training_precision(cfg, device)
    if cfg.overwrite and cfg.resume is not None:
        raise SegnestError("--overwrite starts a new run and --resume continues one; give "
                           "one of them")


def training_precision(cfg: Any, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of a training command's ``--precision``/``--amp`` on ``device``
    (None: float32), or the one-line refusal of :func:`resolve_precision`."""
    return resolve_precision(requested_precision(cfg), device, amp=cfg.amp)


# ---------------------------------------------------------------------------- work folder


def _checkpoints_in(work_dir: Path) -> list[Path]:
    if not work_dir.is_dir():
        return []
    return sorted(entry for entry in work_dir.iterdir() if entry.is_file() and (
        entry.name in (LAST_CHECKPOINT_NAME, BEST_CHECKPOINT_NAME)
        or _PERIODIC_NAME.match(entry.name)))


def _run_files(work_dir: Path, log_name: str) -> list[Path]:
    """The files of an earlier run in ``work_dir``: checkpoints, log, TensorBoard events
    (every run under ``tb/``, the evaluations of its checkpoints included, and those that
    segnest 0.1 wrote into the folder itself)."""
    others = [entry for entry in work_dir.iterdir() if entry.is_file() and (
        entry.name == log_name or entry.name.startswith(_EVENTS_PREFIX))]
    events = [entry for entry in (work_dir / TB_FOLDER).rglob(f"{_EVENTS_PREFIX}*")
              if entry.is_file()]
    return _checkpoints_in(work_dir) + sorted(others) + sorted(events)


def _remove_empty_folders(root: Path) -> None:
    if not root.is_dir():
        return
    for folder in sorted((p for p in root.rglob("*") if p.is_dir()), reverse=True):
        if not any(folder.iterdir()):
            folder.rmdir()


def check_work_dir(work_dir: Path, *, resume: str | None, overwrite: bool, log_name: str) -> None:
    """Refuse to start a new run over an earlier one; with ``overwrite``, remove the
    earlier run's files first. A run that resumes from a checkpoint outside ``work_dir``
    counts as a new run here: it would replace ``work_dir``'s checkpoints."""
    earlier = _checkpoints_in(work_dir)
    continuing = resume == "auto" or (
        resume is not None and Path(resume).resolve().parent == work_dir.resolve())
    if not earlier or continuing:
        return
    if not overwrite:
        names = ", ".join(path.name for path in earlier[:3]) + ("..." if len(earlier) > 3 else "")
        raise SegnestError(
            f"work folder {work_dir} holds an earlier run ({names}); continue it with "
            "--resume auto, start a new run with another --work-dir, or replace it with "
            "--overwrite")
    removed = _run_files(work_dir, log_name)
    for path in removed:
        path.unlink(missing_ok=True)
    _remove_empty_folders(work_dir / TB_FOLDER)
    print(f"--overwrite: removed the earlier run's {len(removed)} file(s) from {work_dir}")


@contextmanager
def run_folder(work_dir: Path, dist: DistInfo, *, resume: str | None, overwrite: bool,
               log_name: str) -> Iterator[None]:
    """Own ``work_dir`` for the run: lock it, check it may be written (see
    :func:`check_work_dir`) and copy the console to ``work_dir/log_name``, all on rank 0;
    every rank raises if rank 0 refused."""
    lock = FolderLock(work_dir)
    log = ConsoleLog(work_dir / log_name)
    # A run refused before it started (bad data, bad settings) leaves the folder as it was.
    log_path = work_dir / log_name
    folder_existed, log_existed = work_dir.exists(), log_path.exists()
    log_size = log_path.stat().st_size if log_existed else 0
    files_before = set(_run_files(work_dir, log_name)) if folder_existed else set()
    refusal: SegnestError | None = None
    if dist.is_main:
        try:
            lock.acquire()
            check_work_dir(work_dir, resume=resume, overwrite=overwrite, log_name=log_name)
            log.open()
        except SegnestError as err:
            lock.release()
            refusal = err
    if agree(refusal is not None, dist.device) and refusal is None:
        refusal = SegnestError(f"rank 0 could not use the work folder {work_dir}")
    if refusal is not None:
        raise refusal
    refused_before_start = False
    try:
        yield
    except SegnestError as err:
        started = set(_run_files(work_dir, log_name)) - files_before - {work_dir / log_name}
        refused_before_start = dist.is_main and not started
        if not refused_before_start:
            log.note(f"segnest: error: {err}")
        raise
    finally:
        log.close()
        if refused_before_start and not folder_existed:
            lock.path.unlink(missing_ok=True)  # still held: the folder is this run's own
        lock.release()
        if refused_before_start:
            if log_existed:  # the earlier run's log, without this attempt's lines
                os.truncate(log_path, log_size)
            else:
                log_path.unlink(missing_ok=True)
            if not folder_existed:
                _remove_empty_folders(work_dir)
                with suppress(OSError):
                    work_dir.rmdir()


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


def open_writer(work_dir: Path, dist: DistInfo, enabled: bool, run: str,
                config: Mapping[str, Any], metric_tags: Sequence[str],
                iteration: int, hparams: Mapping[str, Any] | None = None) -> Any | None:
    """A TensorBoard writer of run ``run`` (``<work_dir>/tb/<run>``) on rank 0, None
    elsewhere or when switched off. It starts with the run's settings as text and its
    HParams session (``hparams``, default the settings of ``config`` that shape the result,
    as hyperparameters; ``metric_tags`` as metrics); see
    :mod:`segnest.inference.tensorboard`."""
    if not (enabled and dist.is_main):
        return None
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(run_dir(work_dir, run)))
    log_config(writer, config, iteration)
    log_hparams(writer, hparams_of(config) if hparams is None else hparams, metric_tags,
                end=False, name=session_name(run, work_dir.resolve()))
    return writer


def close_writer(writer: Any | None, finished: bool) -> None:
    """Close the run's writer; a run that got to its end is marked finished in HParams."""
    if writer is None:
        return
    if finished:
        log_hparams(writer, {}, (), start=False)
    writer.close()


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
    """First Ctrl-C or SIGTERM: finish the current iteration, save, exit. A second one:
    stop at once.

    SIGTERM is what SLURM, Kubernetes and ``kill`` send before they kill a job, so it is
    handled like Ctrl-C. In a distributed run the ranks must stop at the same iteration
    (the save gathers every rank's RNG state), so :meth:`agreed` combines the ranks' flags
    with an all-reduce once per iteration. Under torchrun a terminal's Ctrl-C reaches each
    worker twice: directly and forwarded by the torchrun agent, which waits 30 s before
    killing them; a repeat within ``REPEAT_GRACE_S`` is taken for that copy, not for a
    second Ctrl-C. ``signal_name`` says which signal stopped the run.
    """

    REPEAT_GRACE_S = 3.0
    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, world_size: int = 1, device: torch.device | None = None) -> None:
        self.world_size, self.device = world_size, device
        self.signum = 0
        self._first = 0.0
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum != 0

    @property
    def signal_name(self) -> str | None:
        return signal.Signals(self.signum).name if self.signum else None

    def __enter__(self) -> StopRequest:
        for signum in self.SIGNALS:
            try:
                self._previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread (e.g. called from a test harness)
                pass
        return self

    def _handle(self, signum, frame) -> None:
        if not self.requested:
            self.signum, self._first = int(signum), time.monotonic()
        elif self.world_size == 1 or time.monotonic() - self._first > self.REPEAT_GRACE_S:
            raise KeyboardInterrupt

    def agreed(self) -> bool:
        """Whether any rank was asked to stop; call it on every rank at the same point."""
        if self.world_size > 1:
            self.signum = agree(self.signum, self.device)
        return self.requested

    def __exit__(self, *exc) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()


# ---------------------------------------------------------------------------- resume


def find_resume_checkpoint(work_dir: str | os.PathLike) -> Path | None:
    """The newest intact checkpoint in ``work_dir`` for ``--resume auto``, or None when the
    folder holds no checkpoint.

    Candidates are ``last.pt``, ``iter_<N>.pt`` and ``best.pt`` (it holds the full training
    state too), ordered by the iteration stored inside (else the number in the name), then
    ``best.pt`` after the others at the same iteration, then by modification time; they are
    read lazily (memory-mapped, unverified) to order them, and the newest is then verified
    in full (its checksum included). Unreadable or corrupt files of any kind are skipped
    with a warning, and the next newest is taken. Resuming from ``best.pt`` is said in a
    warning (the iterations after it are trained again), and a folder whose checkpoints
    are all damaged is refused: starting a new run would replace them, ``best.pt`` first.
    """
    work_dir = Path(work_dir)
    if not work_dir.is_dir():
        return None
    candidates: list[tuple[tuple[float, int, float], Path]] = []
    found: list[Path] = []
    for candidate in work_dir.iterdir():
        if not (candidate.is_file() and (candidate.name in (LAST_CHECKPOINT_NAME,
                                                            BEST_CHECKPOINT_NAME)
                                         or _PERIODIC_NAME.match(candidate.name))):
            continue
        found.append(candidate)
        try:
            state = load_checkpoint(candidate, mmap=True, verify=False)
            key = (_stored_iteration(candidate, state),
                   int(candidate.name != BEST_CHECKPOINT_NAME), candidate.stat().st_mtime)
        except (SegnestError, OSError) as error:
            warnings.warn(f"skipping checkpoint for resume: {error}", stacklevel=2)
            continue
        candidates.append((key, candidate))
    for key, candidate in sorted(candidates, key=lambda item: item[0], reverse=True):
        try:
            load_checkpoint(candidate, mmap=True)
        except SegnestError as error:
            warnings.warn(f"skipping checkpoint for resume: {error}", stacklevel=2)
            continue
        if candidate.name == BEST_CHECKPOINT_NAME:
            warnings.warn(
                f"--resume auto: no intact {LAST_CHECKPOINT_NAME} or iter_<N>.pt in "
                f"{work_dir}; resuming from {BEST_CHECKPOINT_NAME} (iteration "
                f"{key[0]:.0f}), the newest intact checkpoint, so the iterations after it "
                "are trained again", stacklevel=2)
        return candidate
    if found:
        names = ", ".join(sorted(path.name for path in found))
        raise SegnestError(
            f"--resume auto: every checkpoint in {work_dir} ({names}) is damaged or "
            "unreadable (see the warnings above), and a new run would replace them; pass "
            "--resume with a checkpoint you trust, or start a new run in another --work-dir "
            "(or there with --overwrite instead of --resume)")
    return None


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
    position, the best validation metric (stored under ``best_key``) and every rank's random
    generators; the schedule continues from the stored iteration with the settings given
    now (see the module's docstring). ``record`` holds what a later command reads from the
    checkpoint (classes, palette, dataset, the command's configuration as ``config``, ...).

    ``iteration`` counts optimizer steps, ``position`` the batches drawn: a batch skipped
    for bad samples advances the position but not the iteration.
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
        self.position = 0
        self.best = -math.inf
        self.best_iteration: int | None = None
        self.saved_iteration: int | None = None
        self.metrics: dict[str, Any] = {}
        self.stopped_by: str | None = None

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
        state = load_checkpoint(path)
        self._check_compatible(path, state)
        self.model.load_state_dict(state["model"])
        self._restore_optimizer(path, state["optimizer"])
        if state["scaler"] or not self.scaler.is_enabled():
            # A run trained without a scaler (fp32, bf16) stored an empty one; fp16 starts one.
            self.scaler.load_state_dict(state["scaler"])
        self.iteration = int(state["iteration"])
        self.position = int(state.get("position", self.iteration))
        self.scheduler.resume_at(self.iteration)
        self.best = float(state.get(self.best_key, -math.inf))
        if self.best_key == "best_miou" and state.get("metric_unit") != "percent":
            self.best *= 100.0  # segnest 0.1 stored mIoU as a fraction
        self.best_iteration = state.get("best_iteration")
        if path.resolve() == (self.work_dir / LAST_CHECKPOINT_NAME).resolve():
            self.saved_iteration = self.iteration
        self.metrics = dict(state.get("metrics") or {})
        restore_rng_state(state["rng"][self.dist.rank])
        if self.dist.is_main:
            print(f"resumed from {path} at iteration {self.iteration}")
            stored_precision = state.get("precision", "fp32")
            if "precision" in self.record and stored_precision != self.record["precision"]:
                print(f"precision: the checkpoint was trained in {stored_precision}, this run "
                      f"continues in {self.record['precision']} (the fp32 weights carry over)")
            changed = self._changed_settings(state.get("config") or {})
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
        stored_config, config = state.get("config") or {}, self.record.get("config") or {}
        for key in _FIXED_ON_RESUME:
            if key in stored_config and key in config and stored_config[key] != config[key]:
                flag = "--" + key.replace("_", "-")
                raise SegnestError(
                    f"--resume {path} was trained with {flag} {stored_config[key]}, this run "
                    f"has {config[key]}; the run cannot continue exactly with another {flag}: "
                    f"resume with {flag} {stored_config[key]}, or start a new --work-dir")
        for key in _RECORD_FIXED_ON_RESUME:
            if key in self.record and state.get(key) != self.record[key]:
                raise SegnestError(
                    f"--resume {path} was trained with {key.replace('_', ' ')} "
                    f"{state.get(key)}, this run has {self.record[key]}; the run cannot continue "
                    f"exactly: resume with the same --{key.replace('_', '-')} and training data "
                    "(the work folder's class_weights.txt holds the stored ones), or start a "
                    "new --work-dir")
        stored_epoch = state.get("iters_per_epoch", self.iters_per_epoch)
        if stored_epoch != self.iters_per_epoch:
            raise SegnestError(
                f"--resume {path} was written by a run of {stored_epoch} iterations per epoch, "
                f"this one has {self.iters_per_epoch}: the training set or the batch size "
                "changed; resume on the same data with the same --batch-size")

    def payload(self, rng: list[dict]) -> dict[str, Any]:
        return {
            **self.record, **self.identity,
            "model": self.model.state_dict(),
            "iteration": self.iteration,
            "position": self.position,
            "epoch": self.epoch,  # completed epochs
            "iters_per_epoch": self.iters_per_epoch,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rng,
            self.best_key: self.best,
            "best_iteration": self.best_iteration,
            "metrics": self.metrics,
            "metric_unit": "percent",
            "segnest_version": segnest.__version__,
        }

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


# ---------------------------------------------------------------------------- loop


class Progress:
    """The console side of a run on rank 0 (silent elsewhere): on a terminal a progress bar
    with lines that must stay (validation results, warnings) printed above it; elsewhere
    (a log file, a batch job) one plain line every ``log_interval`` iterations instead of a
    bar redrawn hundreds of times. The run's log gets the plain lines either way (the bar
    draws on the terminal alone, see :func:`segnest.runtime.console.console_streams`)."""

    def __init__(self, total: int, initial: int, enabled: bool, log_interval: int) -> None:
        self.enabled, self.total, self.log_interval = enabled, total, log_interval
        self.terminal = enabled and is_terminal()
        self._screen, self._log = console_streams()
        self.bar = tqdm(total=total, initial=initial, disable=not self.terminal, desc="train",
                        dynamic_ncols=True, file=self._screen)
        self._started, self._initial = time.perf_counter(), initial

    def update(self, iteration: int, scalars: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        if self.terminal:
            self.bar.update(1)
            self.bar.set_postfix({k: f"{v:.3g}" for k, v in scalars.items()})
        if iteration % self.log_interval and iteration != self.total:
            return
        done = iteration - self._initial
        remaining = (time.perf_counter() - self._started) / max(done, 1) * (self.total - iteration)
        values = "  ".join(f"{k} {v:.4g}" for k, v in scalars.items())
        line = f"iter {iteration}/{self.total}  {values}  eta {_duration(remaining)}"
        if not self.terminal:
            print(line, flush=True)
        elif self._log is not None:
            self._log.write(line + "\n")
            self._log.flush()

    def write(self, line: str) -> None:
        if not self.enabled:
            return
        if not self.terminal:
            print(line, flush=True)
            return
        self.bar.write(line, file=self._screen)
        if self._log is not None:
            self._log.write(line + "\n")
            self._log.flush()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"


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
    task: str,
) -> bool:
    """Train ``run`` up to ``total_iters``; True when it got there, False when asked to stop
    (after saving ``last.pt``; ``run.stopped_by`` names the signal).

    ``batches(epoch, start_batch)`` yields the epoch's batches from ``start_batch`` on;
    ``step(batch)`` trains on one and returns its scalars (``loss`` first), or None for a
    batch it skipped (every rank must agree on that); ``validate`` returns the metric that
    ``best.pt`` follows and runs at every iteration where ``validate_due`` says so and at
    the last. ``task`` names the TensorBoard namespace of the training scalars.
    """
    progress = Progress(total_iters, run.iteration, run.dist.is_main, log_interval)
    if run.iteration >= total_iters and run.dist.is_main:
        print(f"the run is already at iteration {run.iteration} of the {total_iters} asked "
              "for; nothing to train (give a larger --iters/--epochs to train on)")
    stopping = False
    started = time.perf_counter()
    with StopRequest(run.dist.world_size, run.dist.device) as stop, progress:
        while run.iteration < total_iters and not stopping:
            epoch, start_batch = divmod(run.position, run.iters_per_epoch)
            stepped = False
            for batch in batches(epoch, start_batch):
                run.position += 1
                scalars = step(batch)
                if scalars is None:
                    continue
                stepped = True
                _check_finite(scalars["loss"], run, lr_hint)
                run.iteration += 1
                now = time.perf_counter()
                scalars["lr"] = run.scheduler.get_last_lr()[0]
                scalars["images_per_s"] = images_per_step / max(now - started, 1e-9)
                started = now
                progress.update(run.iteration, scalars)
                if writer is not None and (run.iteration % log_interval == 0
                                           or run.iteration == total_iters):
                    for key, value in scalars.items():
                        writer.add_scalar(training_tag(task, key), value, run.iteration)
                validating = validate_due(run.iteration) or run.iteration == total_iters
                periodic = checkpoint_interval > 0 and run.iteration % checkpoint_interval == 0
                stopping = stop.agreed()
                if validating or periodic or stopping:
                    _checkpoint(run, validate if validating else None, progress,
                                keep=keep_checkpoints if periodic else 0)
                    started = time.perf_counter()
                if stopping or run.iteration >= total_iters:
                    break
            if not stepped and start_batch == 0:
                raise SegnestError(
                    f"no batch of epoch {epoch} could be used: every one held unreadable "
                    "samples (see the warnings above); fix or remove those files")
    run.stopped_by = stop.signal_name if stopping else None
    return not stopping


def _check_finite(loss: float, run: RunState, lr_hint: str) -> None:
    if math.isfinite(loss):
        return
    if run.saved_iteration is not None:
        kept = (f"the last checkpoint, {run.work_dir / LAST_CHECKPOINT_NAME} (iteration "
                f"{run.saved_iteration}), has finite weights")
    else:
        kept = "no checkpoint was written yet"
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
            run.best, run.best_iteration = metric, run.iteration
    run.save(rng, best=best, keep=keep)
    restore_rng_state(rng[run.dist.rank])


def stopped_message(run: RunState, total_iters: int) -> str:
    return (f"stopped by {run.stopped_by or 'request'} at iteration {run.iteration}/"
            f"{total_iters}; checkpoint saved to {run.work_dir / LAST_CHECKPOINT_NAME}. "
            "Resume with the same command plus --resume")
