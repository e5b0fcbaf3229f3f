"""Atomic writes: every file segnest writes appears whole under its final name or not at all.

The bytes go to a hidden temporary file in the target's folder, are flushed to disk and
renamed onto the target, so a crash at any moment leaves either the old file or the new one,
never a mix. A write that the system refuses (disk full, quota, read-only file system, no
permission, a folder where the file should be) raises one :class:`SegnestError` naming the
target; the previous file stays as it was and no temporary file is left.

Temporary names carry their writer: ``.<name>.<host>.<pid>.<random>.partial``. Two writers
may share a folder (two runs, or a run and an export), so a temp file is only ever removed by
:func:`remove_stale_temp_files` when its writer is known to be gone: a process of this host
that no longer exists, this process itself when no write of its own is using the file, or any
writer at all when the file has not changed for :data:`STALE_AFTER_S` (no checkpoint takes a
day to write; this also covers names without a writer, written by earlier segnest versions,
and writers on other hosts sharing the folder over a network file system, whose processes
cannot be seen from here).
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO

from segnest.errors import SegnestError

TEMP_SUFFIX = ".partial"
TEMP_NAME = re.compile(r"^\..+\.partial$")
_WRITER_TEMP_NAME = re.compile(
    r"^\.(?P<name>.+)\.(?P<host>[^.]+)\.(?P<pid>\d+)\.[0-9a-f]{16}\.partial$")
STALE_AFTER_S = 24 * 3600
_O_BINARY = getattr(os, "O_BINARY", 0)  # Windows needs it; elsewhere it does not exist

# Temp files this process is writing right now (any thread); never removed as leftovers.
_ACTIVE_TEMPS: set[Path] = set()
_ACTIVE_LOCK = threading.Lock()

# Below this much free space a failed write is taken for a full disk.
FULL_DISK_BYTES = 1 << 20

# errno -> what it means for the user and what to do about it
_WRITE_FAILURES = {
    errno.ENOSPC: ("no space left on the device",
                   "free some space or choose another location (--work-dir / --out / --export)"),
    errno.EFBIG: ("the file is larger than this file system or the file-size limit "
                  "(ulimit -f) allows",
                  "raise the limit or choose another location (--work-dir / --out / --export)"),
    errno.EROFS: ("the file system is read-only",
                  "choose a writable location (--work-dir / --out / --export)"),
    errno.EACCES: ("permission denied",
                   "choose a location you can write to (--work-dir / --out / --export) "
                   "or fix the folder's permissions"),
    errno.EPERM: ("operation not permitted",
                  "choose a location you can write to (--work-dir / --out / --export) "
                  "or fix the folder's permissions"),
    errno.EISDIR: ("a folder of that name is in the way",
                   "give a file name, or move the folder away"),
    errno.ENOTDIR: ("a part of the path is a file, not a folder",
                    "choose another location (--work-dir / --out / --export)"),
    errno.EEXIST: ("a part of the path is a file, not a folder",
                   "choose another location (--work-dir / --out / --export)"),
    errno.ENAMETOOLONG: ("the path is too long", "choose a shorter path"),
}
if hasattr(errno, "EDQUOT"):  # not on Windows
    _WRITE_FAILURES[errno.EDQUOT] = (
        "the disk quota is exceeded",
        "free some space or choose another location (--work-dir / --out / --export)")


def default_cache_dir() -> Path:
    """segnest's cache folder (generated data, hardware measurements): ``$SEGNEST_CACHE``
    or ``~/.cache/segnest``."""
    env = os.environ.get("SEGNEST_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "segnest"


def write_error(target: Path, error: OSError) -> SegnestError | None:
    """The user error for an ``OSError`` met while writing ``target``; None when the errno
    says nothing a user can act on (then the original error is the better report)."""
    failure = _WRITE_FAILURES.get(error.errno)
    if failure is None:
        return None
    what, fix = failure
    return SegnestError(f"cannot write {target}: {what}; {fix}. "
                        "Nothing was written and any previous file there is unchanged")


def _disk_full(folder: Path) -> bool:
    """Whether ``folder``'s file system has (almost) no space left."""
    try:
        return shutil.disk_usage(folder).free < FULL_DISK_BYTES
    except OSError:
        return False


def _write_refusal(temp: Path) -> OSError | None:
    """The error the file system gives for one more byte appended to ``temp`` (the file a
    writer failed on), when it is one a user can act on; None when the write would pass
    (then the writer failed for a reason of its own). A nearly full disk counts as full."""
    try:
        with open(temp, "ab") as handle:
            handle.write(b"\0")
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as error:
        if error.errno in _WRITE_FAILURES:
            return error
    if _disk_full(temp.parent):
        return OSError(errno.ENOSPC, "no space left on the device")
    return None


def _host_label() -> str:
    # Host names may contain dots, which separate the parts of a temp name; '_' never
    # occurs in a valid host name, so the label stays unambiguous.
    return socket.gethostname().replace(".", "_") or "localhost"


def temp_path_for(target: Path) -> Path:
    """A fresh temporary name beside ``target`` that records this process as its writer."""
    return target.parent / (f".{target.name}.{_host_label()}.{os.getpid()}."
                            f"{secrets.token_hex(8)}{TEMP_SUFFIX}")


@contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside ``target`` for a writer that wants a file name (ONNX,
    torch.jit); renamed onto ``target`` when the block succeeds, removed when it fails."""
    target = Path(target)
    temp = temp_path_for(target)
    with _ACTIVE_LOCK:
        _ACTIVE_TEMPS.add(temp)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        yield temp
        _fsync_file(temp)
        os.replace(temp, target)
    except OSError as error:
        user_error = write_error(target, error)
        if user_error is None:
            raise
        raise user_error from error
    except Exception as error:
        # Some writers report a refused write in their own words (torch.save raises
        # RuntimeError "unexpected pos" for a full disk, a file-size limit or a quota);
        # the file system says what happened: ask it with one more byte on the temp file.
        refusal = _write_refusal(temp)
        if refusal is None:
            raise
        raise write_error(target, refusal) from error
    finally:
        with suppress(OSError):
            temp.unlink(missing_ok=True)
        with _ACTIVE_LOCK:
            _ACTIVE_TEMPS.discard(temp)
    _fsync_directory(target.parent)


@contextmanager
def atomic_open(target: str | os.PathLike, mode: str = "wb",
                encoding: str | None = None) -> Iterator[IO]:
    """``open(target, mode)`` whose result appears atomically when the block succeeds."""
    with atomic_path(target) as temp:
        # Not tempfile.mkstemp: its 0600 mode would make outputs unreadable to the group;
        # os.open with 0o666 honours the user's umask like any other file they write.
        descriptor = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_BINARY, 0o666)
        with os.fdopen(descriptor, mode, encoding=encoding) as handle:
            yield handle
            handle.flush()


def write_text_atomic(target: str | os.PathLike, text: str) -> None:
    with atomic_open(target, "w", encoding="utf-8") as handle:
        handle.write(text)


def remove_stale_temp_files(directory: str | os.PathLike) -> list[Path]:
    """Delete the temp files in ``directory`` whose writers are gone (see the module
    docstring); return them. Temp files of live writers are never touched."""
    removed = []
    for entry in Path(directory).iterdir():
        if TEMP_NAME.match(entry.name) and _writer_is_gone(entry):
            with suppress(OSError):
                entry.unlink()
                removed.append(entry)
    return removed


def _writer_is_gone(temp: Path) -> bool:
    try:
        if not temp.is_file():
            return False
        if time.time() - temp.stat().st_mtime > STALE_AFTER_S:
            return True
    except OSError:  # vanished meanwhile: its writer renamed or removed it
        return False
    match = _WRITER_TEMP_NAME.match(temp.name)
    if match is None or match["host"] != _host_label():
        return False
    pid = int(match["pid"])
    if pid == os.getpid():
        with _ACTIVE_LOCK:
            return temp not in _ACTIVE_TEMPS
    return not _process_exists(pid)


def _process_exists(pid: int) -> bool:
    if os.name != "posix":  # os.kill(pid, 0) would terminate the process on Windows
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):  # another user's process, or no way to tell
        return True
    return True


def _fsync_file(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY | _O_BINARY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


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
