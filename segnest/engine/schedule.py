"""Per-iteration learning-rate schedules: poly (segmentation), warmup + cosine (pretraining)
and warmup + steps (detection).

Both are ``torch.optim.lr_scheduler.LRScheduler`` subclasses stepped once per iteration
and computed in closed form from the iteration count, so a resumed run rebuilds its schedule
from the settings it is given and continues it with :meth:`ClosedFormLR.resume_at` (the
same learning rates as an uninterrupted run when the settings are the same; a longer or
shorter schedule when ``--iters`` changed). Each parameter group follows the schedule from
its own initial learning rate, which keeps the head's 10x multiplier.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler


def linear_warmup_factor(iteration: int, warmup_iters: int, warmup_ratio: float) -> float:
    """Multiplier rising linearly from ``warmup_ratio`` at 0 to 1 at ``warmup_iters``."""
    if iteration >= warmup_iters:
        return 1.0
    return warmup_ratio + (1.0 - warmup_ratio) * iteration / warmup_iters


def _per_group_floor(min_lr: float | Sequence[float], optimizer: Optimizer) -> list[float]:
    group_count = len(optimizer.param_groups)
    if isinstance(min_lr, int | float):
        return [float(min_lr)] * group_count
    floors = [float(value) for value in min_lr]
    if len(floors) != group_count:
        raise ValueError(f"min_lr has {len(floors)} values for {group_count} parameter groups")
    return floors


def _check_lengths(total_iters: int, warmup_iters: int, warmup_ratio: float) -> None:
    if total_iters <= 0:
        raise ValueError(f"total_iters must be positive, got {total_iters}")
    if not 0 <= warmup_iters <= total_iters:
        raise ValueError(f"warmup_iters must be in [0, {total_iters}], got {warmup_iters}")
    if not 0.0 <= warmup_ratio <= 1.0:
        raise ValueError(f"warmup_ratio must be in [0, 1], got {warmup_ratio}")


class ClosedFormLR(LRScheduler):
    """A schedule whose learning rates are a function of the iteration alone."""

    def get_lr(self) -> list[float]:
        return self.lrs_at(self.last_epoch)

    def lrs_at(self, iteration: int) -> list[float]:
        raise NotImplementedError

    def resume_at(self, iteration: int) -> None:
        """Continue at ``iteration``: the optimizer gets the learning rates this schedule
        gives there, and the next ``step`` moves on from it."""
        self.last_epoch = iteration
        self._step_count = iteration + 1  # as if stepped from the start (1 at construction)
        self._last_lr = self.lrs_at(iteration)
        for group, lr in zip(self.optimizer.param_groups, self._last_lr, strict=True):
            group["lr"] = lr


class PolyLR(ClosedFormLR):
    """Poly decay ``(base - min_lr) * (1 - t / T) ** power + min_lr`` with optional warmup.

    ``min_lr=0`` is the authors' plain poly (``base * (1 - t/T) ** 0.9``); a positive floor
    follows mmsegmentation, where the floor is an absolute learning rate shared by all groups
    (so the ratio between groups shrinks towards 1 near the end); pass one floor per group to
    scale it instead. During the first ``warmup_iters`` iterations the poly value is
    multiplied by ``warmup_ratio + (1 - warmup_ratio) * t / warmup_iters``. Past
    ``total_iters`` the learning rate stays at the floor.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        total_iters: int,
        power: float = 0.9,
        min_lr: float | Sequence[float] = 0.0,
        warmup_iters: int = 0,
        warmup_ratio: float = 1e-6,
        last_epoch: int = -1,
    ) -> None:
        _check_lengths(total_iters, warmup_iters, warmup_ratio)
        self.total_iters = total_iters
        self.power = power
        self.min_lrs = _per_group_floor(min_lr, optimizer)
        self.warmup_iters = warmup_iters
        self.warmup_ratio = warmup_ratio
        super().__init__(optimizer, last_epoch)

    def lrs_at(self, iteration: int) -> list[float]:
        iteration = min(iteration, self.total_iters)
        decay = (1.0 - iteration / self.total_iters) ** self.power
        warmup = linear_warmup_factor(iteration, self.warmup_iters, self.warmup_ratio)
        return [
            ((base_lr - floor) * decay + floor) * warmup
            for base_lr, floor in zip(self.base_lrs, self.min_lrs, strict=True)
        ]


class WarmupCosineLR(ClosedFormLR):
    """Linear warmup from ``warmup_ratio * base`` to ``base``, then cosine decay to ``min_lr``.

    Over ``warmup_iters`` iterations the learning rate rises linearly; over the remaining
    ``total_iters - warmup_iters`` it follows
    ``min_lr + (base - min_lr) * (1 + cos(pi * progress)) / 2``; past ``total_iters`` it
    stays at ``min_lr``.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        total_iters: int,
        warmup_iters: int = 0,
        warmup_ratio: float = 1e-6,
        min_lr: float | Sequence[float] = 0.0,
        last_epoch: int = -1,
    ) -> None:
        _check_lengths(total_iters, warmup_iters, warmup_ratio)
        self.total_iters = total_iters
        self.warmup_iters = warmup_iters
        self.warmup_ratio = warmup_ratio
        self.min_lrs = _per_group_floor(min_lr, optimizer)
        super().__init__(optimizer, last_epoch)

    def lrs_at(self, iteration: int) -> list[float]:
        iteration = min(iteration, self.total_iters)
        if iteration < self.warmup_iters:
            factor = linear_warmup_factor(iteration, self.warmup_iters, self.warmup_ratio)
            return [base_lr * factor for base_lr in self.base_lrs]
        # max(..., 1): when warmup fills the whole run, the last iteration sits at progress 0.
        decay_iters = max(self.total_iters - self.warmup_iters, 1)
        progress = (iteration - self.warmup_iters) / decay_iters
        cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
        return [
            floor + (base_lr - floor) * cosine
            for base_lr, floor in zip(self.base_lrs, self.min_lrs, strict=True)
        ]


class WarmupStepLR(ClosedFormLR):
    """Linear warmup, then the base learning rate divided by ``1/gamma`` at each step.

    ``base * warmup(t) * gamma ** (number of steps <= t)`` where ``warmup`` rises linearly
    from ``warmup_ratio`` at 0 to 1 at ``warmup_iters`` (detectron2's ``WarmupMultiStepLR``
    with its linear warmup; the authors' 1x: 90k iterations, steps at 60k and 80k, gamma
    0.1, 1000 warmup iterations from 0.001). Past ``total_iters`` the learning rate stays
    where the last iteration left it.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        total_iters: int,
        steps: Sequence[int],
        gamma: float = 0.1,
        warmup_iters: int = 0,
        warmup_ratio: float = 0.001,
        last_epoch: int = -1,
    ) -> None:
        _check_lengths(total_iters, warmup_iters, warmup_ratio)
        steps = [int(step) for step in steps]
        if steps != sorted(steps) or any(not 0 < step <= total_iters for step in steps):
            raise ValueError(f"steps must rise within (0, {total_iters}], got {steps}")
        if not 0.0 < gamma <= 1.0:
            raise ValueError(f"gamma must be in (0, 1], got {gamma}")
        self.total_iters = total_iters
        self.steps = steps
        self.gamma = gamma
        self.warmup_iters = warmup_iters
        self.warmup_ratio = warmup_ratio
        super().__init__(optimizer, last_epoch)

    def lrs_at(self, iteration: int) -> list[float]:
        iteration = min(iteration, self.total_iters)
        decay = self.gamma ** sum(1 for step in self.steps if step <= iteration)
        warmup = linear_warmup_factor(iteration, self.warmup_iters, self.warmup_ratio)
        return [base_lr * decay * warmup for base_lr in self.base_lrs]
