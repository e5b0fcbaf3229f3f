"""How many compute threads a CPU process runs beside its data-loader workers.

PyTorch's intra-op (OpenMP) threads meet at a barrier after every operator; a thread that
shares its core with a busy loader worker, or with another program, is descheduled for a
time slice while the others spin at the barrier. With small images (thousands of short
operators) a 2-core machine then runs many times slower: ``segnest eval`` took 15-25x
longer under load while training's validation, which runs with one thread per free core,
did not (experiments/benchmarks/README.md has the figures). Training and evaluation
therefore give their workers their cores the same way, here.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def threads_beside_workers(device: torch.device, workers: int) -> Iterator[int]:
    """On a CPU with ``workers`` loader processes, run ``cores - workers`` compute threads
    (at least one) inside the block, restoring the count after it; yields that count.
    A GPU's host threads are left as they are."""
    threads = torch.get_num_threads()
    inside = max(1, threads - workers) if device.type == "cpu" and workers > 0 else threads
    torch.set_num_threads(inside)
    try:
        yield inside
    finally:
        torch.set_num_threads(threads)
