import os
import random
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from segnest.errors import SegnestError
from segnest.runtime import distributed
from segnest.runtime.distributed import (
    CPUSyncBatchNorm,
    DistInfo,
    convert_sync_batchnorm,
    init_distributed,
    seed_everything,
)

CHANNELS = 3
# Unequal per-process batches: synchronisation must weight each process by its count.
BATCH_PER_RANK = (2, 3)


def global_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Input (with a large mean, to test numerical care) and upstream gradient, seeded."""
    generator = torch.Generator().manual_seed(0)
    total = sum(BATCH_PER_RANK)
    x = torch.randn(total, CHANNELS, 5, 4, generator=generator) * 2.0 + 30.0
    upstream = torch.randn(total, CHANNELS, 5, 4, generator=generator)
    return x, upstream


def reference_batchnorm(momentum: float | None = 0.1) -> nn.BatchNorm2d:
    generator = torch.Generator().manual_seed(1)
    bn = nn.BatchNorm2d(CHANNELS, momentum=momentum)
    with torch.no_grad():
        bn.weight.copy_(torch.rand(CHANNELS, generator=generator) + 0.5)
        bn.bias.copy_(torch.randn(CHANNELS, generator=generator))
        bn.running_mean.copy_(torch.randn(CHANNELS, generator=generator))
        bn.running_var.copy_(torch.rand(CHANNELS, generator=generator) + 0.5)
    return bn


def forward_backward(bn: nn.Module, x: torch.Tensor, upstream: torch.Tensor) -> dict:
    x = x.clone().requires_grad_(True)
    out = bn(x)
    (out * upstream).sum().backward()
    return {
        "out": out.detach(),
        "input_grad": x.grad,
        "weight_grad": bn.weight.grad.clone(),
        "bias_grad": bn.bias.grad.clone(),
        "running_mean": bn.running_mean.clone(),
        "running_var": bn.running_var.clone(),
        "num_batches_tracked": bn.num_batches_tracked.clone(),
    }


def assert_results_close(actual: dict, expected: dict) -> None:
    for key, value in expected.items():
        torch.testing.assert_close(actual[key], value, rtol=1e-5, atol=1e-5, msg=key)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_single_process_cpu_sync_bn_is_exactly_batchnorm(momentum):
    x, upstream = global_batch()
    expected_bn = reference_batchnorm(momentum)
    synced_bn = convert_sync_batchnorm(reference_batchnorm(momentum), "cpu")
    for _ in range(2):
        expected = forward_backward(expected_bn, x, upstream)
        actual = forward_backward(synced_bn, x, upstream)
        assert_results_close(actual, expected)
    expected_bn.eval()
    synced_bn.eval()
    torch.testing.assert_close(synced_bn(x), expected_bn(x))


def run_sync_bn_steps(rank: int, momentum: float | None) -> list[dict]:
    """Two training steps of a converted BatchNorm on this process's rows of the batch."""
    x, upstream = global_batch()
    start = sum(BATCH_PER_RANK[:rank])
    rows = slice(start, start + BATCH_PER_RANK[rank])
    bn = convert_sync_batchnorm(reference_batchnorm(momentum), "cpu")
    steps = []
    # Two steps, so running statistics and num_batches_tracked accumulate.
    for _ in range(2):
        bn.zero_grad()
        result = forward_backward(bn, x[rows], upstream[rows])
        # Each process's parameter gradient covers its own rows; their sum is the gradient
        # of the global loss (DDP would average instead of sum).
        torch.distributed.all_reduce(result["weight_grad"])
        torch.distributed.all_reduce(result["bias_grad"])
        steps.append(result)
    return steps


def two_process_worker(rank: int, world_size: int, port: int, result_dir: str):
    """One process of a torchrun-like CPU run: set torchrun's variables, then exercise."""
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    info = init_distributed("cpu")
    try:
        total = distributed.all_reduce_sum(torch.tensor([rank + 1.0]))
        shared = distributed.broadcast_object({"run": f"from rank {rank}"})
        distributed.barrier()
        summary = {
            "info": (info.rank, info.world_size, info.local_rank, str(info.device)),
            "is_main": (info.is_main, distributed.is_main_process()),
            "rank_world": (distributed.get_rank(), distributed.get_world_size()),
            "total": total.item(),
            "shared": shared["run"],
            "sync_bn_momentum_0.1": run_sync_bn_steps(rank, 0.1),
            "sync_bn_momentum_None": run_sync_bn_steps(rank, None),
        }
        torch.save(summary, os.path.join(result_dir, f"rank{rank}.pt"))
    finally:
        distributed.cleanup_distributed()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory) -> list[dict]:
    """Per-rank results of one 2-process gloo run (spawned once: process start is slow)."""
    result_dir = tmp_path_factory.mktemp("two_processes")
    world_size = len(BATCH_PER_RANK)
    mp.spawn(two_process_worker, args=(world_size, free_port(), str(result_dir)), nprocs=world_size)
    return [
        torch.load(result_dir / f"rank{rank}.pt", weights_only=True) for rank in range(world_size)
    ]


@pytest.mark.slow
@pytest.mark.parametrize("momentum", [0.1, None])
def test_two_gloo_processes_match_one_batchnorm_on_the_concatenated_batch(
    two_process_results, momentum
):
    x, upstream = global_batch()
    bn = reference_batchnorm(momentum)
    expected_steps = []
    for _ in range(2):
        bn.zero_grad()
        expected_steps.append(forward_backward(bn, x, upstream))

    for rank, results in enumerate(two_process_results):
        start = sum(BATCH_PER_RANK[:rank])
        rows = slice(start, start + BATCH_PER_RANK[rank])
        actual_steps = results[f"sync_bn_momentum_{momentum}"]
        for actual, expected in zip(actual_steps, expected_steps, strict=True):
            # Outputs and input gradients: this process's rows of the global result.
            expected_rows = dict(
                expected, out=expected["out"][rows], input_grad=expected["input_grad"][rows]
            )
            assert_results_close(actual, expected_rows)


@pytest.mark.slow
def test_init_distributed_under_torchrun_env_starts_gloo_and_helpers_communicate(
    two_process_results,
):
    for rank, summary in enumerate(two_process_results):
        assert summary["info"] == (rank, 2, rank, "cpu")
        assert summary["is_main"] == (rank == 0, rank == 0)
        assert summary["rank_world"] == (rank, 2)
        assert summary["total"] == 3.0
        assert summary["shared"] == "from rank 0"


def test_single_process_run_needs_no_process_group(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    info = init_distributed("cpu")
    assert info == DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    assert info.is_main and not info.distributed
    assert not torch.distributed.is_initialized()
    tensor = torch.tensor([2.0])
    assert distributed.all_reduce_sum(tensor) is tensor and tensor.item() == 2.0
    assert distributed.broadcast_object("same") == "same"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_asking_for_cuda_without_a_gpu_is_a_user_error():
    with pytest.raises(SegnestError, match="--device cuda was given but no CUDA GPU.*--device cpu"):
        init_distributed("cuda")


def test_unknown_device_is_a_user_error():
    with pytest.raises(SegnestError, match="--device"):
        init_distributed("gpu0")


def test_torchrun_env_without_rendezvous_address_is_a_user_error(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    with pytest.raises(SegnestError, match="MASTER_ADDR.*torchrun"):
        init_distributed("cpu")


def test_convert_replaces_every_batchnorm_and_keeps_the_state_dict():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4, momentum=None, eps=1e-3)),
        nn.BatchNorm3d(2, affine=False),
    )
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.running_mean.uniform_()
                module.num_batches_tracked.fill_(7)
                if module.affine:
                    module.weight.uniform_()
    model.eval()
    state_before = {key: value.clone() for key, value in model.state_dict().items()}

    converted = convert_sync_batchnorm(model, "cpu")
    norms = [m for m in converted.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert len(norms) == 3 and all(isinstance(m, CPUSyncBatchNorm) for m in norms)
    assert (norms[1].momentum, norms[1].eps, norms[2].affine) == (None, 1e-3, False)
    assert all(not m.training for m in norms)
    state_after = converted.state_dict()
    assert list(state_after) == list(state_before)
    for key, value in state_before.items():
        assert torch.equal(state_after[key], value), key


def test_convert_turns_a_bare_batchnorm_into_a_sync_one():
    assert isinstance(convert_sync_batchnorm(nn.BatchNorm2d(2), "cpu"), CPUSyncBatchNorm)


def draws() -> tuple:
    return random.random(), np.random.rand(), torch.rand(1).item()


def test_seed_everything_is_reproducible_and_differs_per_rank():
    seed_everything(5, rank=0)
    first = draws()
    seed_everything(5, rank=0)
    assert draws() == first
    seed_everything(5, rank=1)
    assert all(a != b for a, b in zip(draws(), first))
