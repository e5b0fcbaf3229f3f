"""The TensorBoard writer of a run (rank 0 only): opened with the run's settings and HParams
session, closed with the session marked finished when the run got to its end."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from segnest.inference.tensorboard import (
    hparams_of,
    log_config,
    log_hparams,
    run_dir,
    session_name,
)
from segnest.runtime.distributed import (
    DistInfo,
)


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
