"""The work folder of a run: its checkpoint files (``last.pt``, ``best.pt``, ``iter_<N>.pt``),
its lock, the refusal to start over an earlier run (or ``--overwrite`` removing it), the
console copy in its log, and ``--resume auto``'s choice of the newest intact checkpoint."""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from segnest.errors import SegnestError
from segnest.inference.tensorboard import (
    TB_FOLDER,
)
from segnest.runtime.checkpoint import load_checkpoint
from segnest.runtime.console import ConsoleLog
from segnest.runtime.distributed import (
    DistInfo,
    agree,
)
from segnest.runtime.lock import FolderLock
from segnest.runtime.record import CheckpointRecord

LAST_CHECKPOINT_NAME = "last.pt"
BEST_CHECKPOINT_NAME = "best.pt"
_PERIODIC_NAME = re.compile(r"^iter_(\d+)\.pt$")
_EVENTS_PREFIX = "events.out.tfevents."


def periodic_checkpoint_name(iteration: int) -> str:
    """File name of the periodic checkpoint kept at ``iteration`` (``iter_<N>.pt``)."""
    return f"iter_{iteration}.pt"


# ---------------------------------------------------------------------------- process




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
    value = CheckpointRecord.read(state).iteration
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
