"""Where ``predict``, ``eval`` and ``export`` may write: never onto what they read.

The commands check their outputs before any work and refuse, with one line, an output that
would replace or mix with an input:

- an output file that is an input file or the checkpoint, compared by resolved path and by
  file identity (``os.stat``: device and inode, as ``os.path.samefile``), so symbolic and
  hard links are seen through;
- an output folder that is, lies inside or contains a folder the command reads: the
  dataset's image and ground-truth trees (eval), the input folders (predict). ``predict``
  may write into a sub-folder of an input folder, because it never reads below ``--out``
  (see ``segnest.inference.predict.collect_images``).

An output folder is created and a probe file written and removed in it, so that a folder
that cannot be written fails now and not after an hour of inference.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from segnest.errors import SegnestError


def resolved(path: str | os.PathLike) -> Path:
    """The absolute path with symbolic links resolved (the file need not exist)."""
    return Path(path).expanduser().resolve()


def is_within(path: Path, folder: Path) -> bool:
    """Whether resolved ``path`` is ``folder`` or lies below it."""
    return path == folder or folder in path.parents


def file_identity(path: str | os.PathLike) -> tuple[int, int] | None:
    """(device, inode) of an existing file, the same for every name it has; else None."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_dev, stat.st_ino


def identities(files: Mapping[str | os.PathLike, str]) -> dict[tuple[int, int], str]:
    """File identity -> description (e.g. "the checkpoint") for the existing ``files``."""
    found = {}
    for path, what in files.items():
        identity = file_identity(path)
        if identity is not None:
            found[identity] = what
    return found


def refuse_input_file(output: Path, inputs: Mapping[tuple[int, int], str], flag: str) -> None:
    """Refuse an output file that already exists as one of ``inputs`` (see ``identities``)."""
    what = inputs.get(file_identity(output)) if inputs else None
    if what is not None:
        raise SegnestError(f"{flag} would write {output}, which is {what}; choose an output "
                           "that is not an input")


def refuse_overlap(folder: Path, protected: Mapping[Path, str], flag: str) -> None:
    """Refuse an output ``folder`` that is, lies inside or contains a protected folder
    (resolved path -> description such as "the dataset's ground-truth folder")."""
    for other, what in protected.items():
        if is_within(folder, other):
            where = "is" if folder == other else "lies inside"
            raise SegnestError(f"{flag} {folder} {where} {what} {other}; choose a folder "
                               "outside it")
        if is_within(other, folder):
            raise SegnestError(f"{flag} {folder} contains {what} {other}; choose a folder "
                               "that does not contain it")


def dataset_folders(dataset: Any) -> dict[Path, str]:
    """The folders holding the dataset's images and ground truth, resolved.

    A sample file below the dataset root is protected by the root's child that holds it
    (``gtFine``, ``annotations``, ``images``...), so that an output can go neither into the
    ground truth of another split nor beside it; a file elsewhere by its own folder.
    """
    root = resolved(dataset.root) if hasattr(dataset, "root") else None
    folders: dict[Path, str] = {}
    parents: dict[Path, str] = {}
    for sample in getattr(dataset, "samples", ()):
        image, mask = sample[0], sample[1]
        parents.setdefault(Path(image).parent, "the dataset's image folder")
        if mask is not None:
            parents[Path(mask).parent] = "the dataset's ground-truth folder"
    for parent, what in parents.items():
        folder = resolved(parent)
        if root is not None and folder != root and root in folder.parents:
            folder = root / folder.relative_to(root).parts[0]
        if folders.get(folder) != "the dataset's ground-truth folder":
            folders[folder] = what
    return folders


def prepare_folder(folder: Path, flag: str) -> Path:
    """Create ``folder`` (and its parents) and prove it writable; returns it."""
    if folder.exists() and not folder.is_dir():
        raise SegnestError(f"{flag} {folder} is a file, not a folder; choose a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise SegnestError(f"{flag} {folder} cannot be created ({_reason(err)}); choose a "
                           "folder you can write to") from None
    try:
        with tempfile.TemporaryFile(dir=folder, prefix=".segnest-probe-"):
            pass
    except OSError as err:
        raise SegnestError(f"{flag} {folder} cannot be written ({_reason(err)}); choose a "
                           "folder you can write to") from None
    return folder


def _reason(err: OSError) -> str:
    return err.strerror or type(err).__name__
