"""Atomic writes: every file segnest writes appears whole under its final name or not at all.

The bytes go to a hidden temporary file in the target's folder (``.<name>.<random>.partial``),
are flushed to disk and renamed onto the target, so a crash at any moment leaves either the
old file or the new one, never a mix.
"""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

TEMP_SUFFIX = ".partial"
TEMP_NAME = re.compile(r"^\..+\.partial$")
_O_BINARY = getattr(os, "O_BINARY", 0)  # Windows needs it; elsewhere it does not exist


@contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside ``target`` for a writer that wants a file name (ONNX,
    torch.jit); renamed onto ``target`` when the block succeeds, removed when it fails."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = target.parent / f".{target.name}.{secrets.token_hex(8)}{TEMP_SUFFIX}"
    try:
        yield temp
        _fsync_file(temp)
        os.replace(temp, target)
    finally:
        temp.unlink(missing_ok=True)
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
