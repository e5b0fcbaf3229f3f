"""Samples that cannot be read: the one policy of every task, of eval and of predict.

A dataset (or an image reader) raises :class:`SegnestError` naming the file and what is
wrong with it. Without ``--skip-bad-samples`` the first such error stops the command with
that line plus how to go on; with it, every bad sample is skipped, named once per distinct
message (a training run meets the same file every epoch) and counted, and the count is
summed over the processes of a torchrun run.

A DataLoader worker that raises dies with a multi-line traceback, so
:class:`GuardedSamples` hands a loading error to the main process as data (a
:class:`BadSample`), where :class:`BadSamplePolicy` decides. A training batch from which
bad samples were dropped may be unusable (empty, or one sample where BatchNorm needs two);
:func:`batch_usable` answers that the same on every rank, so all skip it together.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import Dataset, default_collate

from segnest.errors import SegnestError
from segnest.runtime.distributed import agree, all_reduce_sum

SKIP_FLAG = "--skip-bad-samples"


@dataclass(frozen=True)
class BadSample:
    """What :class:`GuardedSamples` returns for a sample whose loading failed."""

    index: int
    error: str


class GuardedSamples(Dataset):
    """``dataset`` with loading errors (:class:`SegnestError`) returned as
    :class:`BadSample` items instead of raised."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        try:
            return self.dataset[index]
        except SegnestError as err:
            return BadSample(index, str(err))


def split_bad(items: Iterable[Any]) -> tuple[list[Any], list[BadSample]]:
    """(the good items, the bad samples) of a list drawn from :class:`GuardedSamples`."""
    good, bad = [], []
    for item in items:
        (bad if isinstance(item, BadSample) else good).append(item)
    return good, bad


def stop_message(error: str, what: str = "sample(s)") -> str:
    """The line that stops a command at a bad sample: the dataset's error (which file, why,
    how to fix it) and the other way on."""
    return f"{error} (or pass {SKIP_FLAG} to skip unreadable {what} with a warning)"


def collate_guarded(items: list[Any]) -> tuple[Any | None, list[BadSample]]:
    """A DataLoader ``collate_fn`` over :class:`GuardedSamples`: (the batch of the good
    items, or None when every one was bad; the bad samples)."""
    good, bad = split_bad(items)
    return (default_collate(good) if good else None), bad


def python_warning(message: str) -> None:
    """A ``UserWarning``: what the inference library (eval, predict) warns with, so that a
    Python caller can filter or record it."""
    warnings.warn(message, stacklevel=4)


def _to_stderr(message: str) -> None:
    # tqdm.write keeps a progress bar on the terminal intact.
    from tqdm import tqdm

    tqdm.write(f"warning: {message}", file=sys.stderr)


class BadSamplePolicy:
    """Stop at the first bad sample, or (``skip``) skip it with a warning and count it.

    ``what`` names the samples in the closing summary (``"image(s)"``); ``warn`` shows a
    warning line (default: stderr, beside the progress bar; the inference library passes
    :func:`python_warning`); ``show`` is False on the
    processes of a torchrun run other than the main one.
    """

    def __init__(self, skip: bool, what: str = "sample(s)",
                 warn: Callable[[str], None] | None = None, show: bool = True) -> None:
        self.skip = skip
        self.what = what
        self.warn = warn or _to_stderr
        self.show = show
        self.count = 0
        self.named: set[str] = set()

    def check(self, error: str, name: str = "a bad sample") -> None:
        """Apply the policy to one bad sample (``name`` says which in the warning)."""
        if not self.skip:
            raise SegnestError(stop_message(error, self.what))
        self.count += 1
        if error not in self.named:  # once per file, not once per epoch
            self.named.add(error)
            if self.show:
                self.warn(f"skipping {name}: {error}")

    def check_all(self, bad: Iterable[BadSample]) -> None:
        for sample in bad:
            self.check(sample.error)

    def total(self, device: torch.device | str = "cpu") -> int:
        """Samples skipped by every process together; every rank must call it."""
        counted = torch.tensor([self.count], dtype=torch.int64, device=device)
        return int(all_reduce_sum(counted)[0])

    def summary(self, total: int) -> str | None:
        """The closing warning for ``total`` skipped samples (None when there were none)."""
        return skipped_warning(total, self.what, len(self.named))


def skipped_warning(total: int, what: str = "sample(s)", distinct: int | None = None
                    ) -> str | None:
    """The closing line of a command that skipped ``total`` bad samples, ``distinct`` of
    them different files (a training run meets a file once per epoch); None for none."""
    if not total:
        return None
    files = "" if distinct is None or distinct == total else f", {distinct} distinct file(s)"
    return f"warning: {total} unreadable {what} skipped{files} (named above)"


def batch_usable(size: int, device: torch.device | str, distributed: bool) -> bool:
    """Whether every rank can train on its batch of ``size`` samples left after bad ones
    were dropped: not an empty one, nor a single sample on a single device (BatchNorm needs
    two; SyncBN pools them across devices). The same answer on every rank."""
    usable = size > 0 and (distributed or size >= 2)
    return bool(agree(usable, device, op="min"))
