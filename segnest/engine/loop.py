"""The loop every task trains in: steps, progress and logging, validation, checkpoints and
the stop request; the task supplies its batches, its step and its validation."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from tqdm import tqdm

from segnest.engine.process import StopRequest
from segnest.engine.rng import capture_all_rng_states, restore_rng_state
from segnest.engine.state import RunState, parameters_finite
from segnest.engine.workdir import LAST_CHECKPOINT_NAME
from segnest.errors import SegnestError
from segnest.inference.tensorboard import training_tag
from segnest.runtime.console import console_streams, is_terminal


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
    validate: Callable[[Progress], Mapping[str, Any]],
    images_per_step: int,
    checkpoint_interval: int,
    keep_checkpoints: int,
    writer: Any | None,
    log_interval: int,
    lr_hint: str,
    scalar_namespace: str,
) -> bool:
    """Train ``run`` up to ``total_iters``; True when it got there, False when asked to stop
    (after saving ``last.pt``; ``run.stopped_by`` names the signal).

    ``batches(epoch, start_batch)`` yields the epoch's batches from ``start_batch`` on;
    ``step(batch)`` trains on one and returns its scalars (``loss`` first), or None for a
    batch it skipped (every rank must agree on that); ``validate`` returns the named
    metrics (``run.best_metric`` among them, which decides ``best.pt``) and runs at every
    iteration where ``validate_due`` says so and at the last. ``scalar_namespace`` names
    the TensorBoard namespace of the training scalars.
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
                        writer.add_scalar(training_tag(scalar_namespace, key), value, run.iteration)
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


def _checkpoint(run: RunState, validate: Callable[[Progress], Mapping[str, Any]] | None,
                progress: Progress, keep: int) -> None:
    # Validation must not change what the run draws next: the generators are captured
    # before it and restored after, as a resumed run restores them from the file.
    rng = capture_all_rng_states(run.dist)
    best = False
    if validate is not None:
        run.metrics = dict(validate(progress))
        metric = float(run.metrics[run.best_metric.name])
        run.model.train()
        best = run.best_metric.improves(metric, run.best) and parameters_finite(run.model)
        if best:
            run.best, run.best_iteration = metric, run.iteration
    run.save(rng, best=best, keep=keep)
    restore_rng_state(rng[run.dist.rank])


def stopped_message(run: RunState, total_iters: int) -> str:
    return (f"stopped by {run.stopped_by or 'request'} at iteration {run.iteration}/"
            f"{total_iters}; checkpoint saved to {run.work_dir / LAST_CHECKPOINT_NAME}. "
            "Resume with the same command plus --resume")
