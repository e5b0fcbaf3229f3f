"""The process a run trains in: torchrun's group and the device, the shared run flags
(precision, resume/overwrite), the DDP/compile wrapper, the optimizer step and the stop
request (Ctrl-C, SIGTERM) that every rank agrees on."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from segnest.errors import SegnestError
from segnest.runtime.compiling import compile_model
from segnest.runtime.distributed import (
    DistInfo,
    agree,
    cleanup_distributed,
    init_distributed,
)
from segnest.runtime.precision import requested_precision, resolve_precision
from segnest.runtime.threads import threads_beside_workers


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
