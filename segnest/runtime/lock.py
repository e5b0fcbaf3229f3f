"""One writer per folder: an advisory lock held for a run's lifetime.

``segnest train`` and ``pretrain`` lock their work folder before they read or write
anything in it, so a second run started in the same folder stops with one line naming the
run that holds it instead of interleaving checkpoints with it. The lock is the operating
system's (``flock`` on POSIX, ``msvcrt.locking`` on Windows), released when the process
ends, however it ends, so a killed run never leaves a stale lock behind. On POSIX it is
taken on the folder itself, so deleting or replacing a file in the folder cannot defeat it
(a second run would otherwise lock a fresh file of the same name); it is also taken on a
hidden file in the folder, which is what Windows and file systems that cannot lock a
folder (NFS maps flock to byte-range locks, which need a file open for writing) rely on.
The file stays (deleting a lock file races with the next locker) and holds who locked it,
for the message.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from segnest.errors import SegnestError

LOCK_NAME = ".segnest.lock"

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]
    import msvcrt


def _try_lock(descriptor: int) -> bool:
    try:
        if fcntl is not None:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        else:
            msvcrt.locking(descriptor, msvcrt.LK_NBLCK, 1)
    except OSError:
        return False
    return True


def _lock_folder(folder: Path) -> tuple[int | None, bool]:
    """``(descriptor, held_elsewhere)`` for an exclusive flock on ``folder`` itself: the
    descriptor when taken, ``held_elsewhere`` when another process holds it, neither where
    folders cannot be locked here (Windows, NFS: then the lock file alone decides)."""
    if fcntl is None:
        return None, False
    try:
        descriptor = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return None, False
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        os.close(descriptor)
        return None, err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)
    return descriptor, False


def _holder(path: Path) -> str:
    """Who holds the lock, as recorded in the file (best effort)."""
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
        started = time.strftime("%Y-%m-%d %H:%M", time.localtime(info["started"]))
        return f"pid {info['pid']} on {info['host']}, since {started}: {info['command']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


def _close(descriptor: int | None) -> None:
    if descriptor is not None:
        os.close(descriptor)


class FolderLock:
    """``with FolderLock(folder, what="work folder"):`` holds ``folder``'s lock or raises
    one line saying who holds it."""

    def __init__(self, folder: str | os.PathLike, what: str = "work folder") -> None:
        self.folder, self.what = Path(folder), what
        self.path = self.folder / LOCK_NAME
        self._descriptor: int | None = None
        self._folder_descriptor: int | None = None

    def acquire(self) -> FolderLock:
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise SegnestError(f"cannot use {self.what} {self.folder} ({err.strerror or err}); "
                               "choose a folder you can write to") from err
        folder_descriptor, held = _lock_folder(self.folder)
        if held:
            raise self._in_use()
        try:
            descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as err:
            _close(folder_descriptor)
            raise SegnestError(f"cannot use {self.what} {self.folder} ({err.strerror or err}); "
                               "choose a folder you can write to") from err
        if not _try_lock(descriptor):
            os.close(descriptor)
            _close(folder_descriptor)
            raise self._in_use()
        self._descriptor, self._folder_descriptor = descriptor, folder_descriptor
        self._record(descriptor)
        return self

    def _in_use(self) -> SegnestError:
        return SegnestError(
            f"{self.what} {self.folder} is in use by another segnest run "
            f"({_holder(self.path)}); wait for it to end, or give this run another "
            "--work-dir")

    @staticmethod
    def _record(descriptor: int) -> None:
        info: dict[str, Any] = {"pid": os.getpid(), "host": socket.gethostname(),
                                "started": time.time(), "command": " ".join(sys.argv)}
        os.ftruncate(descriptor, 0)
        os.lseek(descriptor, 0, os.SEEK_SET)
        os.write(descriptor, json.dumps(info).encode("utf-8"))

    def release(self) -> None:
        if self._descriptor is None:
            return
        try:
            if fcntl is not None:
                fcntl.flock(self._descriptor, fcntl.LOCK_UN)
            else:
                os.lseek(self._descriptor, 0, os.SEEK_SET)
                msvcrt.locking(self._descriptor, msvcrt.LK_UNLCK, 1)
        finally:
            os.close(self._descriptor)
            self._descriptor = None
            _close(self._folder_descriptor)  # closing releases its flock
            self._folder_descriptor = None

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()
