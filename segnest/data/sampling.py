"""Sample order and per-sample randomness that depend only on (seed, epoch, index).

That is what makes a resumed run exact: an epoch's order is a seeded permutation that a
resumed run can enter at any position (:class:`EpochSampler`), and a sample's random
augmentation does not depend on which worker loads it or what was drawn before
(:class:`SeededSamples`; the segmentation transforms seed themselves the same way).
"""

from __future__ import annotations

import random
import signal

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from segnest.data.transforms import seed_worker


class EpochSampler(Sampler[int]):
    """This rank's share of a seeded permutation of the dataset, from a start position.

    Like ``DistributedSampler(drop_last=True)`` but the permutation depends only on
    (seed, epoch), and ``start`` skips the samples a resumed run has already seen.
    """

    def __init__(self, size: int, seed: int, epoch: int, rank: int, world_size: int,
                 start: int = 0) -> None:
        self.size, self.seed, self.epoch = size, seed, epoch
        self.rank, self.world_size, self.start = rank, world_size, start
        self.per_rank = size // world_size

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.size, generator=generator).tolist()
        mine = order[self.rank: self.per_rank * self.world_size: self.world_size]
        return iter(mine[self.start:])

    def __len__(self) -> int:
        return self.per_rank - self.start


class SeededSamples(Dataset):
    """``dataset[index]`` drawn with the torch, NumPy and Python generators seeded from
    (seed, epoch, index), so a sample's augmentation is the same whichever worker loads it
    and wherever in the epoch a run starts. The caller's generator states are left as they
    were (``workers=0`` loads in the main process). Call :meth:`set_epoch` before each
    epoch's loader is created."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int):
        sample_seed = (self.seed * 1_000_003 + self.epoch * 100_019 + index) % 2**63
        python_state, numpy_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed)
            random.seed(sample_seed)
            np.random.seed(sample_seed % 2**32)
            try:
                return self.dataset[index]
            finally:
                random.setstate(python_state)
                np.random.set_state(numpy_state)


def init_train_worker(worker_id: int) -> None:
    """Seed the worker, and leave Ctrl-C and SIGTERM to the main process: it finishes the
    iteration and saves, which it could not do if the workers died on the same signal (a
    terminal's Ctrl-C and SLURM's SIGTERM reach every process of the job). The main process
    shuts its workers down itself, and they exit on their own if it dies."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    seed_worker(worker_id)
