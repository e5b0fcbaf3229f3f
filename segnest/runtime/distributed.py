"""torchrun integration, seeding and synchronized BatchNorm on every device.

One process per device, launched by ``torchrun`` (which sets ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``); a plain ``python -m segnest`` run is
a world of one and needs no process group. The helpers below are no-ops in that case, so
training code calls them unconditionally.

``nn.SyncBatchNorm`` only runs on CUDA. ``CPUSyncBatchNorm`` gives CPU (gloo) runs the same
statistics and gradients, so a CPU run with N processes trains like one process on the
concatenated batch.
"""

from __future__ import annotations

import os
import random
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from segnest.errors import SegnestError

# The autograd-aware all_reduce is the public API CPUSyncBatchNorm needs; its suggested
# replacement is a private module. Keep the deprecation notice out of every training step.
warnings.filterwarnings("ignore", message=r"torch\.distributed\.nn\.functional\.all_reduce is "
                        "deprecated", category=FutureWarning)


@dataclass
class DistInfo:
    """Where this process sits in the run and which device it computes on."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0 writes checkpoints, logs and TensorBoard events."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str | None = None) -> DistInfo:
    """Read torchrun's environment, pick the device and start the process group if needed.

    ``device`` is ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or None (CUDA when visible, else CPU).
    Under torchrun, ``"cuda"`` means the GPU numbered ``LOCAL_RANK``.
    """
    rank = _int_from_env("RANK", 0)
    world_size = _int_from_env("WORLD_SIZE", 1)
    local_rank = _int_from_env("LOCAL_RANK", 0)
    chosen = resolve_device(device, world_size, local_rank)
    if chosen.type == "cuda":
        torch.cuda.set_device(chosen)

    if world_size > 1 and not dist.is_initialized():
        missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
        if missing:
            raise SegnestError(
                f"WORLD_SIZE={world_size} is set but {' and '.join(missing)} is not; "
                "launch multi-process runs with torchrun (e.g. torchrun --nproc_per_node 2 "
                "-m segnest train ...)"
            )
        backend = "nccl" if chosen.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=chosen)


def cleanup_distributed() -> None:
    """Tear down the process group if one is running."""
    if _group_initialized():
        dist.destroy_process_group()


def get_rank() -> int:
    return dist.get_rank() if _group_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if _group_initialized() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    """Wait for every process; a no-op in a single-process run."""
    if get_world_size() <= 1:
        return
    if dist.get_backend() == "nccl":
        # Naming the device avoids NCCL guessing it (and warning) from the rank.
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


def agree(value: int, device: torch.device | str, op: str = "max") -> int:
    """``value`` combined over all processes, ``op`` "max" (any rank's) or "min" (every
    rank's); ``value`` itself when alone. Every rank must call it at the same point."""
    if get_world_size() == 1:
        return int(value)
    flag = torch.tensor([int(value)], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.MIN)
    return int(flag.item())


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all processes in place and return it (unchanged when alone)."""
    if get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` in rank order, on every rank (``[obj]`` when alone)."""
    if get_world_size() <= 1:
        return [obj]
    gathered: list[Any] = [None] * get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Return rank ``src``'s ``obj`` on every rank (any picklable object)."""
    if get_world_size() <= 1:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def seed_everything(seed: int, rank: int = 0) -> int:
    """Seed Python, NumPy and torch (CPU and every CUDA device) with ``seed + rank``.

    Offsetting by rank gives each process different augmentation draws while keeping the
    whole run reproducible. Returns the seed used.
    """
    process_seed = seed + rank
    random.seed(process_seed)
    np.random.seed(process_seed % 2**32)
    torch.manual_seed(process_seed)  # also seeds every CUDA device
    return process_seed


def convert_sync_batchnorm(model: nn.Module, device: torch.device | str) -> nn.Module:
    """Swap every BatchNorm in ``model`` for a synchronized one suited to ``device``.

    CUDA uses ``nn.SyncBatchNorm``; other devices use ``CPUSyncBatchNorm``. Parameters and
    buffers are shared with the original layers, so state-dict keys and values, and any
    optimizer already holding the parameters, stay valid.
    """
    if torch.device(device).type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return _replace_batchnorm(model)


class CPUSyncBatchNorm(_BatchNorm):
    """BatchNorm whose training statistics span all processes of the group, on any device.

    In training mode with a process group of more than one process, the per-channel count,
    sum and sum of squares are all-reduced with the autograd-aware
    ``torch.distributed.nn.functional.all_reduce``, so the forward pass uses the statistics
    of the global batch and the backward pass propagates gradients through them across
    processes, as ``nn.SyncBatchNorm`` does; processes may hold different batch sizes.
    Otherwise (evaluation, or a single process) it is exactly ``nn.BatchNorm``.
    Every process must call it the same number of times, as with any collective.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: Any = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype
        )
        self.process_group = process_group

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected an input of at least 2 dimensions, got {input.dim()}")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not (self.training and _group_size(self.process_group) > 1):
            return super().forward(input)
        self._check_input_dim(input)
        if input.size(1) != self.num_features:
            raise ValueError(
                f"expected {self.num_features} channels in dimension 1, got {input.size(1)}"
            )
        mean, biased_var, count = self._global_statistics(input)
        if count <= 1:
            raise ValueError(
                f"expected more than 1 value per channel when training, got input {input.shape}"
            )
        if self.track_running_stats:
            self._update_running_stats(mean.detach(), biased_var.detach(), count)

        shape = (1, self.num_features) + (1,) * (input.dim() - 2)
        invstd = torch.rsqrt(biased_var + self.eps).to(input.dtype)
        centred = input - mean.to(input.dtype).view(shape)
        if self.affine:
            return centred * (self.weight * invstd).view(shape) + self.bias.view(shape)
        return centred * invstd.view(shape)

    def _global_statistics(self, input: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Global per-channel mean and biased variance (float64), and the global count.

        Each process contributes ``n``, ``n * mean`` and ``n * (var + mean**2)`` from its
        own numerically stable mean and variance; only these per-channel sums are combined
        in float64, so large means do not cancel away the variance.
        """
        reduce_dims = [0, *range(2, input.dim())]
        local_count = input.numel() // self.num_features
        stats_input = input if input.dtype in (torch.float32, torch.float64) else input.float()
        if local_count > 0:
            local_var, local_mean = torch.var_mean(stats_input, dim=reduce_dims, correction=0)
            local_mean = local_mean.double()
            local_sum = local_mean * local_count
            local_square_sum = local_var.double() * local_count + local_mean * local_sum
        else:
            # Empty local batch: zeros that stay in the graph, so this process still joins
            # the all-reduce in the backward pass.
            local_sum = stats_input.sum(reduce_dims).double()
            local_square_sum = local_sum
        packed = torch.cat(
            [
                local_sum,
                local_square_sum,
                torch.tensor([float(local_count)], dtype=torch.float64, device=input.device),
            ]
        )
        packed = dist_nn.all_reduce(packed, op=dist.ReduceOp.SUM, group=self._group())
        channels = self.num_features
        global_count = int(round(packed[2 * channels].item()))
        mean = packed[:channels] / max(global_count, 1)
        biased_var = (packed[channels : 2 * channels] / max(global_count, 1) - mean * mean).clamp(
            min=0.0
        )
        return mean, biased_var, global_count

    @torch.no_grad()
    def _update_running_stats(
        self, mean: torch.Tensor, biased_var: torch.Tensor, count: int
    ) -> None:
        """Exponential (or, with ``momentum=None``, cumulative) average, as in BatchNorm."""
        self.num_batches_tracked.add_(1)
        if self.momentum is None:
            factor = 1.0 / float(self.num_batches_tracked)
        else:
            factor = self.momentum
        unbiased_var = biased_var * (count / (count - 1))
        self.running_mean.mul_(1.0 - factor).add_(mean.to(self.running_mean.dtype), alpha=factor)
        self.running_var.mul_(1.0 - factor).add_(
            unbiased_var.to(self.running_var.dtype), alpha=factor
        )

    def _group(self) -> Any:
        return self.process_group if self.process_group is not None else dist.group.WORLD


def _replace_batchnorm(module: nn.Module) -> nn.Module:
    """Return ``module`` with each ``_BatchNorm`` (other than ours) swapped, recursively."""
    if isinstance(module, _BatchNorm) and not isinstance(module, CPUSyncBatchNorm):
        replacement = CPUSyncBatchNorm(
            module.num_features,
            eps=module.eps,
            momentum=module.momentum,
            affine=module.affine,
            track_running_stats=module.track_running_stats,
            # An nn.SyncBatchNorm moved to CPU keeps the group it was restricted to.
            process_group=getattr(module, "process_group", None),
        )
        if module.affine:
            replacement.weight = module.weight
            replacement.bias = module.bias
        replacement.running_mean = module.running_mean
        replacement.running_var = module.running_var
        replacement.num_batches_tracked = module.num_batches_tracked
        replacement.train(module.training)
        if hasattr(module, "qconfig"):
            replacement.qconfig = module.qconfig
        return replacement
    for name, child in module.named_children():
        converted = _replace_batchnorm(child)
        if converted is not child:
            module.add_module(name, converted)
    return module


def _group_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def _group_size(group: Any) -> int:
    if not _group_initialized():
        return 1
    return dist.get_world_size(group) if group is not None else dist.get_world_size()


def _int_from_env(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise SegnestError(
            f"environment variable {name}={raw!r} is not an integer; unset it or launch "
            "with torchrun, which sets it"
        ) from None


def resolve_device(requested: str | None, world_size: int = 1,
                   local_rank: int = 0) -> torch.device:
    """``--device`` as a torch device: cpu, cuda (under torchrun the GPU numbered
    ``LOCAL_RANK``) or cuda:N; None means CUDA when visible, else the CPU."""
    if requested is None:
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise SegnestError(
            f"--device {requested} is not a device; use cpu, cuda or cuda:N"
        ) from None
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type != "cuda":
        raise SegnestError(f"--device {requested} is not supported; use cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise SegnestError(
            f"--device {requested} was given but no CUDA GPU is visible; use --device cpu"
        )
    visible = torch.cuda.device_count()
    if device.index is None:
        index = local_rank if world_size > 1 else torch.cuda.current_device()
    elif world_size > 1:
        raise SegnestError(
            f"--device {requested} names one GPU but torchrun started {world_size} processes; "
            "use --device cuda (each process takes the GPU numbered LOCAL_RANK)"
        )
    else:
        index = device.index
    if index >= visible:
        raise SegnestError(
            f"--device {requested} needs GPU {index} but only {visible} are visible; "
            "use a lower index or check CUDA_VISIBLE_DEVICES"
        )
    return torch.device("cuda", index)
