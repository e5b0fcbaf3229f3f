"""Checkpoints that survive crashes and never execute code.

A checkpoint is a plain dict of tensors and Python primitives written with ``torch.save``.
Saving is atomic: the bytes go to a temporary file in the target's directory, are flushed
to disk and then renamed onto the target, so a crash at any moment leaves either the old
checkpoint or the new one. Loading always uses ``torch.load(weights_only=True)``: a file
that needs arbitrary unpickling is refused with an explanation, never loaded unsafely.

Training loops store their progress under ``ITERATION_KEY`` (classification pretraining,
which counts epochs, under ``EPOCH_KEY``); ``find_resume_checkpoint`` orders candidates by
it. Periodic checkpoints are named ``iter_<N>.pt`` and the most recent one ``last.pt``.
"""

from __future__ import annotations

import os
import pickle
import random
import re
import secrets
import signal
import time
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from segnest.errors import SegnestError

ITERATION_KEY = "iteration"
EPOCH_KEY = "epoch"
LAST_CHECKPOINT_NAME = "last.pt"

_PERIODIC_NAME = re.compile(r"^iter_(\d+)\.pt$")
# Temporary files are hidden and end in ".partial" (".last.pt.<random>.partial"), so the
# finder never matches them.
_TEMP_SUFFIX = ".partial"
_TEMP_NAME = re.compile(r"^\..+\.partial$")
_O_BINARY = getattr(os, "O_BINARY", 0)  # Windows needs it; elsewhere it does not exist
_REFUSED_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


def periodic_checkpoint_name(iteration: int) -> str:
    """File name of the checkpoint saved at ``iteration`` (``iter_<N>.pt``)."""
    return f"iter_{iteration}.pt"


def save_checkpoint(state: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Write ``state`` to ``path`` atomically, creating the directory if needed.

    Temporary files left behind by a writer that was killed mid-save are removed first.
    """
    target = Path(path)
    directory = target.parent
    directory.mkdir(parents=True, exist_ok=True)
    _remove_stale_temp_files(directory)

    # Not tempfile.mkstemp: its 0600 mode would make checkpoints unreadable to the group;
    # os.open with 0o666 honours the user's umask like any other file they write.
    temp_path = directory / f".{target.name}.{secrets.token_hex(8)}{_TEMP_SUFFIX}"
    descriptor = os.open(temp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_BINARY, 0o666)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            torch.save(dict(state), handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp_path, target)
    except BaseException:
        temp_path.unlink(missing_ok=True)
        raise
    _fsync_directory(directory)


def load_checkpoint(
    path: str | os.PathLike, map_location: str | torch.device = "cpu", mmap: bool = False
) -> dict[str, Any]:
    """Load a checkpoint dict with ``weights_only=True``, turning every failure into one line.

    ``mmap=True`` maps tensor storage lazily instead of reading it, which makes checking
    many large checkpoints cheap.
    """
    path = Path(path)
    if not path.is_file():
        raise SegnestError(
            f"checkpoint {path} does not exist or is not a file; "
            "check the path given to --checkpoint / --resume"
        )
    # A truncated zip lacks its central directory, which torch cannot map; such a file is
    # read normally so that it fails with the ordinary corruption error below.
    use_mmap = mmap and zipfile.is_zipfile(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True, mmap=use_mmap)
    except pickle.UnpicklingError as error:
        refused = _REFUSED_GLOBAL.search(str(error))
        if refused is None and "global" not in str(error).lower():
            raise _corrupt_error(path, error) from error
        what = refused.group(1) if refused else "a Python object"
        raise SegnestError(
            f"checkpoint {path} contains pickled Python code or objects ({what}); segnest "
            "loads only weights (torch.load with weights_only=True) and never unpickles code; "
            "re-save it from trusted code with plain tensors, e.g. "
            "torch.save({'model': model.state_dict()}, path)"
        ) from error
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as error:
        raise _corrupt_error(path, error) from error
    if not isinstance(state, Mapping):
        raise SegnestError(
            f"checkpoint {path} holds a {type(state).__name__}, not a dict; "
            "save checkpoints as a dict such as {'model': model.state_dict()}"
        )
    return dict(state)


def find_resume_checkpoint(work_dir: str | os.PathLike) -> Path | None:
    """The newest loadable checkpoint in ``work_dir`` for ``--resume auto``, or None.

    Candidates are ``last.pt`` and ``iter_<N>.pt``, ordered by the progress stored inside
    (``ITERATION_KEY``, else ``EPOCH_KEY``, else the number in the name) and then by
    modification time. Corrupt candidates are skipped with a warning.
    """
    work_dir = Path(work_dir)
    if not work_dir.is_dir():
        return None
    candidates = [
        entry
        for entry in work_dir.iterdir()
        if entry.is_file()
        and (entry.name == LAST_CHECKPOINT_NAME or _PERIODIC_NAME.match(entry.name))
    ]
    best_path: Path | None = None
    best_key: tuple[float, float] | None = None
    for candidate in candidates:
        try:
            state = load_checkpoint(candidate, mmap=True)
        except SegnestError as error:
            warnings.warn(f"skipping checkpoint for resume: {error}", stacklevel=2)
            continue
        key = (_stored_progress(candidate, state), candidate.stat().st_mtime)
        if best_key is None or key > best_key:
            best_path, best_key = candidate, key
    return best_path


def prune_checkpoints(work_dir: str | os.PathLike, keep: int) -> list[Path]:
    """Delete all but the ``keep`` highest-numbered ``iter_<N>.pt`` files; return the deleted.

    ``last.pt`` is never touched, so ``keep=0`` still leaves a checkpoint to resume from.
    """
    if keep < 0:
        raise ValueError(f"keep must be >= 0, got {keep}")
    work_dir = Path(work_dir)
    if not work_dir.is_dir():
        return []
    periodic = []
    for entry in work_dir.iterdir():
        match = _PERIODIC_NAME.match(entry.name)
        if match and entry.is_file():
            periodic.append((int(match.group(1)), entry))
    periodic.sort(reverse=True)
    removed = [entry for _, entry in periodic[keep:]]
    for entry in removed:
        entry.unlink(missing_ok=True)
    return removed


def capture_rng_state() -> dict[str, Any]:
    """Snapshot of the Python, NumPy, torch CPU and CUDA generators.

    Everything is a tensor or a Python primitive, so the snapshot can be stored in a
    checkpoint and read back with ``weights_only=True``.
    """
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
    np.random.set_state(
        (
            numpy_state["bit_generator"],
            numpy_state["key"].cpu().numpy().astype(np.uint32),
            numpy_state["pos"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"].cpu())
    cuda_states = state.get("cuda")
    if cuda_states and torch.cuda.is_available():
        for device_index in range(min(len(cuda_states), torch.cuda.device_count())):
            torch.cuda.set_rng_state(cuda_states[device_index].cpu(), device_index)


def _corrupt_error(path: Path, error: BaseException) -> SegnestError:
    reason = str(error).splitlines()[0] if str(error) else type(error).__name__
    return SegnestError(
        f"checkpoint {path} is corrupt or truncated ({reason}); use an earlier one or --resume auto"
    )


def _stored_progress(path: Path, state: Mapping[str, Any]) -> float:
    for key in (ITERATION_KEY, EPOCH_KEY):
        value = state.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    match = _PERIODIC_NAME.match(path.name)
    return float(match.group(1)) if match else -1.0


def _remove_stale_temp_files(directory: Path) -> None:
    """Delete temp files of earlier writers that were killed mid-save.

    A work directory has one writer at a time (rank 0 of one run), so any temp file
    present before a save starts is an orphan.
    """
    for entry in directory.iterdir():
        if _TEMP_NAME.match(entry.name) and entry.is_file():
            entry.unlink(missing_ok=True)


def _fsync_directory(directory: Path) -> None:
    """Make the rename durable; platforms that cannot open directories skip this."""
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


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
