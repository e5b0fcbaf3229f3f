"""Checkpoint files: written atomically, loaded without ever executing code.

A checkpoint is a plain dict of tensors and Python primitives written with ``torch.save``
through :func:`segnest.runtime.files.atomic_open`, so a crash at any moment leaves either the
old checkpoint or the new one. Loading always uses ``torch.load(weights_only=True)``: a
file that needs arbitrary unpickling is refused with an explanation, never loaded unsafely.
What a training run stores in it, and how it resumes, is
:mod:`segnest.training.run_state`'s business.
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from segnest.errors import SegnestError
from segnest.runtime.files import TEMP_NAME, atomic_open

_REFUSED_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


def save_checkpoint(state: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Write ``state`` to ``path`` atomically, creating the directory if needed.

    Temporary files left behind by a writer that was killed mid-save are removed first.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temp_files(target.parent)
    with atomic_open(target, "wb") as handle:
        torch.save(dict(state), handle)


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


def _corrupt_error(path: Path, error: BaseException) -> SegnestError:
    reason = str(error).splitlines()[0] if str(error) else type(error).__name__
    return SegnestError(
        f"checkpoint {path} is corrupt or truncated ({reason}); use an earlier one or --resume auto"
    )


def _remove_stale_temp_files(directory: Path) -> None:
    """Delete temp files of earlier writers that were killed mid-save.

    A work directory has one writer at a time (rank 0 of one run), so any temp file
    present before a save starts is an orphan.
    """
    for entry in directory.iterdir():
        if TEMP_NAME.match(entry.name) and entry.is_file():
            entry.unlink(missing_ok=True)
