"""``--precision``: which number format a command computes in, decided once per run.

``fp32`` computes in float32. ``bf16`` and ``fp16`` run the model's forward under
``torch.autocast`` with that dtype: convolutions and matrix products in 16 bits, while the
weights (the master copy the optimizer updates), batch-norm statistics, the loss, softmax
and metrics stay float32 (the models hand back float32 logits). ``auto`` picks the fastest
format the hardware runs natively: bf16 on a CPU with native bf16 or a GPU that has it,
fp16 on an older GPU, fp32 on any other CPU. On a CPU, 16-bit training and inference run
the model in channels_last, the layout oneDNN's bf16 kernels are fast in.

A CPU runs bf16 natively when it has AVX512-BF16 or AMX-BF16 instructions; elsewhere
oneDNN emulates it, tens to a hundred times slower than fp32, so bf16 is refused there
with a line that says what to use. fp16 is a GPU format here (CPU autocast in fp16 has no
fast kernels on most CPUs) and is refused on a CPU. Only fp16 needs a gradient scaler
(its range is too small for small gradients); bf16 has float32's range.

``--amp`` (the flag before ``--precision``) means what it always did: fp16 autocast with a
gradient scaler on a CUDA GPU, i.e. ``--precision fp16``.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn

from segnest.errors import SegnestError

# The autocast dtype of each precision name; None computes in float32.
PRECISION_DTYPES: dict[str, torch.dtype | None] = {
    "fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# What --amp stands for (its meaning before --precision existed).
AMP_PRECISION = "fp16"
# CPU capabilities that make bf16 native (names as torch's cpuinfo and /proc/cpuinfo spell them).
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX-BF16).

    torch's cpuinfo query answers on every OS; where this torch lacks it, the kernel's
    /proc/cpuinfo flags do. ``torch.ops.mkldnn._is_mkldnn_bf16_supported()`` is not used:
    it also says yes for plain AVX-512, where oneDNN emulates bf16."""
    query = getattr(torch._C._cpu, "_get_cpu_capability", None)
    if query is not None:
        capability = query()
        return any(bool(capability.get(flag)) for flag in NATIVE_BF16_FLAGS)
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = {word for line in text.splitlines() if line.startswith("flags")
             for word in line.split(":", 1)[-1].split()}
    return any(flag in flags for flag in NATIVE_BF16_FLAGS)


def cuda_bf16(device: torch.device) -> bool:
    """Whether the CUDA GPU ``device`` computes bf16 natively (Ampere and later)."""
    with torch.cuda.device(device):
        return torch.cuda.is_bf16_supported(including_emulation=False)


def requested_precision(cfg: Any) -> str:
    """The precision a command's flags ask for: ``--precision``, or fp16 for ``--amp``
    (the config check refuses the two when they disagree), else fp32."""
    if getattr(cfg, "amp", False):
        return AMP_PRECISION
    return getattr(cfg, "precision", None) or "fp32"


def _flag(name: str, amp: bool) -> str:
    return "--amp" if amp else f"--precision {name}"


def resolve_precision(name: str, device: torch.device, *, amp: bool = False
                      ) -> torch.dtype | None:
    """The autocast dtype for precision ``name`` on ``device`` (None: float32), or a
    one-line SegnestError when ``device`` does not run it natively. ``amp`` names the
    request ``--amp`` in that line."""
    # Config validation already allows only these (config.PRECISIONS: the names, without
    # importing torch); runtime code sits below config and does not import it.
    if name != "auto" and name not in PRECISION_DTYPES:
        raise SegnestError(f"--precision {name!r} is not one of "
                           f"{', '.join((*PRECISION_DTYPES, 'auto'))}; pick one of those")
    flag = _flag(name, amp)
    if device.type == "cuda":
        bf16 = cuda_bf16(device)
        if name == "auto":
            return torch.bfloat16 if bf16 else torch.float16
        if name == "bf16" and not bf16:
            raise SegnestError(f"{flag}: this GPU ({torch.cuda.get_device_name(device)}) has "
                               "no native bf16; use --precision fp16 (or auto) on it")
        return PRECISION_DTYPES[name]
    native = device.type == "cpu" and cpu_native_bf16()
    if name == "auto":
        return torch.bfloat16 if native else None
    if name == "fp16":
        hint = ("--precision bf16 (native on this CPU) or fp32" if native
                else "--precision fp32 (or auto)")
        raise SegnestError(f"{flag} needs a CUDA GPU but this run is on {device}; use {hint}, "
                           "or --device cuda on a machine with a GPU")
    if name == "bf16" and not native:
        raise SegnestError(
            f"{flag}: this {device.type.upper()} has no native bf16 (neither AVX512-BF16 nor "
            "AMX-BF16), where bf16 is emulated and far slower than fp32; use --precision fp32 "
            "(or auto, which picks bf16 only where it is native)")
    return PRECISION_DTYPES[name]


def precision_name(dtype: torch.dtype | None) -> str:
    """``"fp32"``, ``"bf16"`` or ``"fp16"``: the name of an autocast dtype."""
    return next(name for name, value in PRECISION_DTYPES.items() if value == dtype)


def autocast(device: torch.device, dtype: torch.dtype | None) -> AbstractContextManager:
    """Autocast to ``dtype`` on ``device``; nothing for float32 (None)."""
    if dtype is None:
        return nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def for_training(model: nn.Module, device: torch.device, dtype: torch.dtype | None
                 ) -> nn.Module:
    """``model`` in the memory layout it trains fastest in at ``dtype``: channels_last
    for bf16/fp16 on a CPU (in place), where oneDNN's 16-bit kernels are slow in NCHW (a
    DeepLabV3-ResNeSt-50 step in bf16 ran 1.2x fp32 in NCHW, 1.67x in channels_last:
    experiments/benchmarks/README.md); otherwise as it is."""
    if dtype is not None and device.type == "cpu":
        model.to(memory_format=torch.channels_last)
    return model


def needs_grad_scaler(device: torch.device, dtype: torch.dtype | None) -> bool:
    """Only fp16 on a GPU: fp16's small range underflows small gradients; bf16 has
    float32's range and needs no scaling."""
    return dtype == torch.float16 and device.type == "cuda"


def grad_scaler(device: torch.device, dtype: torch.dtype | None) -> torch.amp.GradScaler:
    """The gradient scaler of a training run, on where :func:`needs_grad_scaler` says."""
    return torch.amp.GradScaler(device.type, enabled=needs_grad_scaler(device, dtype))


class Autocast(nn.Module):
    """``module`` run under autocast to ``dtype`` on the device of its parameters."""

    def __init__(self, module: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.module, self.dtype = module, dtype

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        device = next(self.module.parameters()).device
        with torch.autocast(device.type, dtype=self.dtype):
            return self.module(*args, **kwargs)
