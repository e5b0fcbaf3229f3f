"""Every random generator a run draws from (Python, NumPy, torch CPU and CUDA), captured into
and restored from a checkpoint, so a resumed run draws what an uninterrupted one would."""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from segnest.runtime.distributed import (
    DistInfo,
)


def capture_rng_state() -> dict[str, Any]:
    """Snapshot of the Python, NumPy, torch CPU and CUDA generators, as tensors and
    primitives only, so a checkpoint holding it loads with ``weights_only=True``."""
    python_version, python_internal, python_gauss = random.getstate()
    bit_generator, numpy_key, numpy_pos, numpy_has_gauss, numpy_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": {
            "version": python_version,
            "internal": torch.tensor(python_internal, dtype=torch.int64),
            "gauss_next": python_gauss,
        },
        "numpy": {
            "bit_generator": bit_generator,
            "key": torch.from_numpy(numpy_key.astype(np.int64)),
            "pos": int(numpy_pos),
            "has_gauss": int(numpy_has_gauss),
            "cached_gaussian": float(numpy_gauss),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Restore generators from ``capture_rng_state``; CUDA states only for visible devices."""
    python = state["python"]
    random.setstate((python["version"], tuple(python["internal"].tolist()), python["gauss_next"]))
    numpy_state = state["numpy"]
    np.random.set_state((
        numpy_state["bit_generator"],
        numpy_state["key"].cpu().numpy().astype(np.uint32),
        numpy_state["pos"],
        numpy_state["has_gauss"],
        numpy_state["cached_gaussian"],
    ))
    torch.set_rng_state(state["torch"].cpu())
    cuda_states = state.get("cuda")
    if cuda_states and torch.cuda.is_available():
        for device_index in range(min(len(cuda_states), torch.cuda.device_count())):
            torch.cuda.set_rng_state(cuda_states[device_index].cpu(), device_index)


def capture_all_rng_states(dist: DistInfo) -> list[dict]:
    """Every rank's RNG state (ranks draw different dropout masks), indexed by rank."""
    state = capture_rng_state()
    if not dist.distributed:
        return [state]
    states: list = [None] * dist.world_size
    torch.distributed.all_gather_object(states, state)
    return states
