"""The console of a run, also kept in a log file.

:class:`ConsoleLog` copies what a command prints (stdout and stderr, warnings included)
into a log file while it still reaches the terminal. The log holds what the command would
print without a terminal, whatever the terminal shows: a progress bar draws on the terminal
alone (:func:`console_streams` gives it the stream behind the copy) while the log gets the
plain progress lines a log file would get (:class:`PlainProgress`), and any other line
reaches the log as the terminal finally shows it, without carriage-return redraws or colour
codes, so a log is plain text a person or ``grep`` reads.
"""

from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path
from typing import IO, Any

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def is_terminal(stream: Any = None) -> bool:
    """Whether ``stream`` (default stderr) is an interactive terminal."""
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


class _Tee:
    """A text stream writing to ``terminal`` and, line by line, to ``log``."""

    def __init__(self, terminal: IO[str], log: IO[str]) -> None:
        self.terminal, self.log = terminal, log
        self._pending = ""

    def write(self, text: str) -> int:
        written = self.terminal.write(text)
        self._pending += text
        *lines, self._pending = self._pending.split("\n")
        for line in lines:
            shown = _ANSI.sub("", line.rsplit("\r", 1)[-1]).rstrip()
            if shown:
                self.log.write(shown + "\n")
        self.log.flush()
        return written

    def flush(self) -> None:
        self.terminal.flush()
        self.log.flush()

    def isatty(self) -> bool:
        return is_terminal(self.terminal)

    def fileno(self) -> int:
        return self.terminal.fileno()

    @property
    def encoding(self) -> str:
        return getattr(self.terminal, "encoding", "utf-8")

    def __getattr__(self, name: str) -> Any:
        return getattr(self.terminal, name)


class ConsoleLog:
    """Append the console to ``path`` between :meth:`open` and :meth:`close` (a resumed run
    continues the same log). ``file_only`` writes to the log alone."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._file: IO[str] | None = None
        self._saved: tuple[Any, Any] | None = None

    def open(self) -> ConsoleLog:
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close)
        self._saved = (sys.stdout, sys.stderr)
        sys.stdout = _Tee(sys.stdout, self._file)
        sys.stderr = _Tee(sys.stderr, self._file)
        return self

    def note(self, line: str) -> None:
        """Write ``line`` to the log only (e.g. the error the command line prints later)."""
        if self._file is not None:
            self._file.write(line + "\n")
            self._file.flush()

    def close(self) -> None:
        if self._saved is not None:
            sys.stdout, sys.stderr = self._saved
            self._saved = None
        if self._file is not None:
            self._file.close()
            self._file = None


# Without a terminal, progress lines come at most this often (and only for work that lasts).
PLAIN_PROGRESS_INTERVAL_S = 10.0


class PlainProgress:
    """What a progress bar says, for a log: a line at a tenth of the work when
    ``PLAIN_PROGRESS_INTERVAL_S`` passed since the last one (work that takes seconds
    prints nothing), and the end when anything was printed; to ``file`` (default stderr)."""

    def __init__(self, iterable: Any, desc: str, total: int | None, enabled: bool,
                 file: IO[str] | None = None) -> None:
        self.iterable, self.desc, self.enabled, self.file = iterable, desc, enabled, file
        self.total = total if total is not None else _length(iterable)
        self.count, self._shown, self._printed = 0, 0, False
        self._last = time.monotonic()

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update()

    def update(self, count: int = 1) -> None:
        self.count += count
        if not (self.enabled and self.total):
            return
        tenth = self.count * 10 // self.total
        if tenth <= self._shown:
            return
        self._shown = tenth
        now = time.monotonic()
        due = now - self._last >= PLAIN_PROGRESS_INTERVAL_S
        if due or (self._printed and self.count >= self.total):
            self._last, self._printed = now, True
            print(f"{self.desc}: {self.count}/{self.total} ({100 * self.count // self.total}%)",
                  file=self.file or sys.stderr, flush=True)

    def close(self) -> None:
        pass

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def console_streams(stream: Any = None) -> tuple[IO[str], IO[str] | None]:
    """(the terminal side of ``stream`` (default stderr), the log it is copied to or None):
    what a progress bar draws on, and where its plain lines go instead."""
    stream = sys.stderr if stream is None else stream
    if isinstance(stream, _Tee):
        return stream.terminal, stream.log
    return stream, None


class _BarWithLog:
    """A terminal bar, and the same progress as plain lines in the log."""

    def __init__(self, bar: Any, plain: PlainProgress, iterable: Any) -> None:
        self.bar, self.plain, self.iterable = bar, plain, iterable

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update()

    def update(self, count: int = 1) -> None:
        self.bar.update(count)
        self.plain.update(count)

    def close(self) -> None:
        self.bar.close()

    def __enter__(self) -> _BarWithLog:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _length(iterable: Any) -> int | None:
    try:
        return len(iterable)
    except TypeError:
        return None


def progress_bar(iterable: Any = None, *, desc: str, total: int | None = None,
                 unit: str = "it", enabled: bool = True, leave: bool = True) -> Any:
    """A tqdm bar on a terminal; elsewhere (a log file, a batch job) one plain line at every
    tenth of the work instead of a bar redrawn hundreds of times. A console copied to a log
    (:class:`ConsoleLog`) shows the bar and logs the plain lines."""
    if not is_terminal():
        return PlainProgress(iterable, desc, total, enabled)
    from tqdm import tqdm

    terminal, log = console_streams()
    total = total if total is not None else _length(iterable)
    bar = tqdm(iterable if log is None else None, desc=desc, total=total, unit=unit,
               disable=not enabled, leave=leave, dynamic_ncols=True, file=terminal)
    if log is None:
        return bar
    return _BarWithLog(bar, PlainProgress(None, desc, total, enabled, file=log), iterable)
