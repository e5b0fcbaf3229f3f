"""``--compile``: one place that decides how segnest calls ``torch.compile``.

Training compiles the model as it is. Inference (eval, predict, bench) compiles with
frozen weights (``frozen=True``): inductor treats the parameters as constants, so it
can fold them, prepack the convolution weights for oneDNN and fuse the ReLUs and residual
adds into the convolutions, which plain compilation cannot do for trainable weights.

Inference compiles one static graph per input size (``dynamic=False``). torch's default
would, at the second input size, trace one graph with symbolic sizes for all sizes, which
cannot prepack convolutions for a size and ran at eager speed (1.22-1.26x slower than a graph
per size). Each new size compiles once more, up to torch's recompile limit
(``torch._dynamo.config.recompile_limit``, 8 by default): sizes
beyond it run eagerly, as fast as the symbolic graph would.

On a CPU, inductor writes C++ and needs a compiler; without one the first forward would
fail deep inside torch, so that is checked up front.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

import torch
from torch import nn

from segnest.errors import SegnestError

CXX_NAMES = ("g++", "c++", "clang++")


def has_cxx() -> bool:
    """Whether a C++ compiler for inductor (CXX, else g++, c++ or clang++) is on PATH."""
    configured = os.environ.get("CXX")
    if configured:
        return shutil.which(configured) is not None
    return any(shutil.which(name) for name in CXX_NAMES)


class FrozenCompiled(nn.Module):
    """Runs a compiled module with inductor's ``freezing`` switched on.

    Dynamo reads the flag from the global inductor config while it traces (on the first
    call and on every recompilation for a new input size); ``torch.compile(options=...)``
    only reaches the later inductor passes, which leaves most of the gain on the table, so
    the flag is set around each call instead of for the whole process.
    """

    def __init__(self, compiled: nn.Module) -> None:
        super().__init__()
        self.compiled = compiled

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        import torch._inductor.config as inductor_config

        with inductor_config.patch(freezing=True):
            return self.compiled(*args, **kwargs)


def compile_model(model: nn.Module, *, frozen: bool = False) -> nn.Module:
    """``torch.compile(model)``; with ``frozen`` the weights are compiled in as constants
    (inference only, under ``torch.inference_mode`` or ``no_grad``: the compiled model
    does not see later weight updates) and ``model`` is moved to channels_last in place,
    in which oneDNN's frozen convolutions run faster (inputs may keep any layout), and one
    static graph is compiled per input size."""
    on_cpu = any(p.device.type == "cpu" for p in model.parameters())
    if on_cpu and not has_cxx():
        raise SegnestError(
            "--compile on the CPU needs a C++ compiler (g++ or clang++) on PATH, or CXX set "
            "to one; install one (e.g. 'apt install g++') or run without --compile"
        )
    if not frozen:
        return torch.compile(model)
    return FrozenCompiled(torch.compile(model.to(memory_format=torch.channels_last),
                                        dynamic=False))
