"""One writer per folder: an advisory lock held for a run's lifetime.

``segnest train`` and ``pretrain`` lock their work folder before they read or write
anything in it, so a second run started in the same folder stops with one line naming the
run that holds it instead of interleaving checkpoints with it. The lock is the operating
system's (``flock`` on POSIX, ``msvcrt.locking`` on Windows) on a hidden file in the folder:
it is released when the process ends, however it ends, so a killed run never leaves a stale
lock behind. The file itself stays (deleting a lock file races with the next locker) and
holds who locked it, for the message.
"""

from __future__ import annotations

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


def _holder(path: Path) -> str:
    """Who holds the lock, as recorded in the file (best effort)."""
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
        started = time.strftime("%Y-%m-%d %H:%M", time.localtime(info["started"]))
        return f"pid {info['pid']} on {info['host']}, since {started}: {info['command']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


class FolderLock:
    """``with FolderLock(folder, what="work folder"):`` holds ``folder``'s lock or raises
    one line saying who holds it."""

    def __init__(self, folder: str | os.PathLike, what: str = "work folder") -> None:
        self.folder, self.what = Path(folder), what
        self.path = self.folder / LOCK_NAME
        self._descriptor: int | None = None

    def acquire(self) -> FolderLock:
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as err:
            raise SegnestError(f"cannot use {self.what} {self.folder} ({err.strerror or err}); "
                               "choose a folder you can write to") from err
        if not _try_lock(descriptor):
            os.close(descriptor)
            raise SegnestError(
                f"{self.what} {self.folder} is in use by another segnest run "
                f"({_holder(self.path)}); wait for it to end, or give this run another "
                "--work-dir")
        self._descriptor = descriptor
        self._record(descriptor)
        return self

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

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()
