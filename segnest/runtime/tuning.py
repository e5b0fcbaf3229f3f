"""Hardware decisions: the one place that decides, for the CPU at hand, the choices whose
best answer depends on the hardware, and says why.

- **Precision of the ASPP's dilated convolutions under 16-bit autocast on a CPU**,
  rate by rate, for inference and (separately: forward plus backward) for training:
  measured. oneDNN's bf16 kernels for wide dilations on a small map (rates
  12/24/36 on a 64 x 64 map at output stride 8, most taps in the zero padding) were 1.4-6x
  slower than its fp32 NHWC kernels on one AMX CPU and 1.56-2.08x faster on an AVX-512
  BF16 CPU without AMX (experiments/benchmarks/README.md), so no rule holds: each rate's
  convolution (a reduced channel count, the real map size and dilation, channels_last) is
  timed in both precisions, interleaved, median of :data:`ROUNDS`, and the faster one kept.
  The result is cached per CPU model, instruction set flags, torch and oneDNN version,
  precision and mode (inference or training) (``<segnest cache>/hardware/<key>.json``,
  written atomically); a cache that is missing, corrupt, stale or unwritable costs one more
  measurement (about a second), never a wrong answer.
- **Memory layout**: channels_last for 16-bit CPU inference and training and for compiled
  inference (rule: oneDNN's 16-bit and frozen convolutions run in NHWC; measured in
  experiments/benchmarks/README.md); GPUs keep the model's layout.
- **Weights in 16-bit eager inference**: cast to the autocast dtype once when the model is
  prepared, instead of autocast recasting the float32 weights on every call (rule: the cast
  is the same, so the numbers are identical).
- **Compilation**: frozen weights (inference only) and one static graph per input size
  (:mod:`segnest.runtime.compiling`): a dynamic-shape graph, which torch falls back to at the
  second input size by default, ran 1.22-1.26x slower than a graph per size.

:func:`hardware_decisions` makes them (once per process per device kind, precision and
mode); :func:`decide_for` sets them on a model, :func:`prepare_for_training` on a model
about to train (``segnest train``, ``segnest bench --mode train``); ``segnest bench`` and
a 16-bit CPU training run print them.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import platform
import re
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from segnest.errors import SegnestError
from segnest.runtime.files import default_cache_dir, write_text_atomic
from segnest.runtime.precision import for_training, precision_name

# Instruction set flags that change which oneDNN kernels run (part of the cache key).
KERNEL_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "avx512_fp16", "amx_bf16",
                "amx_int8", "amx_fp16")
# The timed convolution: channels in/out (reduced from the ASPP's 2048 -> 256 so that a
# measurement takes about a second), the feature map of a 512 x 512 input at output
# stride 8, and the rounds (interleaved fp32/16-bit; the median is kept).
PROBE_CHANNELS = (512, 128)
PROBE_MAP = 64
ROUNDS = 5
# Bumped when what is measured changes: older cache files are then measured again.
CACHE_VERSION = 2
# The attribute of a module whose dilated convolutions can run in float32 under autocast
# (segnest's ASPP): ``dilations`` (its rates) and ``float32_dilations`` (those kept float32).
FLOAT32_DILATIONS = "float32_dilations"


@dataclass(frozen=True)
class Choice:
    """One decision: what it is about, what was chosen, and why."""

    what: str
    chosen: str
    why: str

    def line(self) -> str:
        return f"{self.what}: {self.chosen} ({self.why})"


def dilation_what(rate: int) -> str:
    """What the precision decision of the ASPP's convolution of dilation ``rate`` is
    called (in the printed choices and in a checkpoint's record of them)."""
    return f"ASPP 3x3 conv, dilation {rate}"


@dataclass(frozen=True)
class HardwareDecisions:
    """The choices for one device kind and precision."""

    device: str
    precision: str
    float32_dilations: frozenset[int]
    choices: tuple[Choice, ...]

    def lines(self) -> list[str]:
        return [choice.line() for choice in self.choices]

    def record(self) -> dict[str, str]:
        """What was chosen, by what it is about: what a training checkpoint records so that
        a resumed run continues with the same choices (:func:`apply_recorded`)."""
        return {choice.what: choice.chosen for choice in self.choices}


def cpu_flags() -> set[str]:
    """The CPU's instruction set flags (/proc/cpuinfo; empty where it cannot be read)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return {word for line in text.splitlines() if line.startswith("flags")
            for word in line.split(":", 1)[-1].split()}


def cpu_model() -> str:
    """The CPU's model name as the OS reports it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def onednn_version() -> str:
    found = re.search(r"MKL-DNN v([\w.]+)", torch.__config__.show())
    return found.group(1) if found else "none"


def cache_key(**what: object) -> dict[str, object]:
    """What a measurement depends on: the CPU, its kernel flags, the software and threads,
    and ``what`` was measured (precision, mode, sizes)."""
    return {"version": CACHE_VERSION, "cpu": cpu_model(),
            "flags": sorted(f for f in KERNEL_FLAGS if f in cpu_flags()),
            "torch": torch.__version__, "onednn": onednn_version(),
            "threads": torch.get_num_threads(), **what}


def _cache_file(key: dict[str, object]) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return default_cache_dir() / "hardware" / f"{digest}.json"


def measure_dilated(dilation: int, dtype: torch.dtype, training: bool = False
                    ) -> tuple[float, float]:
    """Median seconds of one dilated 3x3 convolution in float32 and in ``dtype``
    (channels_last, eager), timed in turns: its forward pass under ``torch.inference_mode``,
    or with ``training`` its forward and backward pass as training runs it (float32
    weights; the 16-bit one under autocast, as the ASPP's branches run in a 16-bit run)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(*PROBE_CHANNELS, 3, padding=dilation, dilation=dilation, bias=False)
    conv = conv.to(memory_format=torch.channels_last)
    x = torch.randn(1, PROBE_CHANNELS[0], PROBE_MAP, PROBE_MAP).contiguous(
        memory_format=torch.channels_last)
    if training:
        x_low = x.to(dtype).requires_grad_(True)
        x.requires_grad_(True)

        def fp32() -> None:
            conv(x).sum().backward()

        def low() -> None:
            with torch.autocast("cpu", dtype=dtype):
                out = conv(x_low)
            out.float().sum().backward()
        context = contextlib.nullcontext
    else:
        low_conv = nn.Conv2d(*PROBE_CHANNELS, 3, padding=dilation, dilation=dilation,
                             bias=False)
        low_conv.load_state_dict(conv.state_dict())
        low_conv = low_conv.eval().to(dtype=dtype, memory_format=torch.channels_last)
        x_low = x.to(dtype)

        def fp32() -> None:
            conv(x)

        def low() -> None:
            low_conv(x_low)
        context = torch.inference_mode
    with context():  # the warm-up call lets oneDNN pick and JIT-compile its kernels
        fp32_s, low_s = time_paths((fp32, low))
    return fp32_s, low_s


def _read_cache(path: Path, key: dict[str, object], names: list[str]
                ) -> dict[str, list[float]] | None:
    """The cached timings of each of ``names``, or None when missing, unreadable or not
    for ``key``."""
    try:
        cached = json.loads(path.read_text())
        if cached["key"] != key:
            return None
        timings = {name: [float(t) for t in cached["timings"][name]] for name in names}
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if any(len(pair) < 2 or min(pair) <= 0 for pair in timings.values()):
        return None
    return timings


def cached_timings(key: dict[str, object], names: list[str],
                   measure: Callable[[str], tuple[float, ...]]
                   ) -> tuple[dict[str, list[float]], str]:
    """(seconds of the compared paths per name in ``names``, where they came from): from
    the cache file of ``key`` (:func:`cache_key`) when it holds them all, else
    ``measure(name)`` now, written to the cache atomically. A missing, corrupt, stale or
    unwritable cache costs one more measurement, never a wrong answer. A measurement taken
    while other work keeps the CPU busy (:func:`busy_cpu`) is used but not cached: such
    contention slows kernels of many small parallel regions far more than large ones (a
    2.2x faster path measured 4x slower on a 2-core machine shared with a compile job),
    so it could fix the wrong choice for good."""
    path = _cache_file(key)
    timings = _read_cache(path, key, names)
    if timings is not None:
        return timings, f"cached in {path}"
    busy = busy_cpu()
    timings = {name: list(measure(name)) for name in names}
    if busy:
        return timings, f"measured now on a busy CPU ({busy}), not cached"
    try:
        write_text_atomic(path, json.dumps({"key": key, "timings": timings}, indent=1))
    except (SegnestError, OSError):
        return timings, "measured now; cache not writable, measured again next run"
    return timings, "measured now"


def busy_cpu() -> str | None:
    """What keeps this process's CPUs busy when the load average of the last minute exceeds
    their count (``"load 2.6 on 2 cores"``); None when they are free enough to time on, or
    where the load cannot be read."""
    try:
        load = os.getloadavg()[0]
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None
    return f"load {load:.1f} on {cores} cores" if load > cores else None


def time_paths(paths: Sequence[Callable[[], object]]) -> tuple[float, ...]:
    """Median seconds of each of ``paths``, run in turns (:data:`ROUNDS` rounds) after one
    warm-up call each."""
    for run in paths:
        run()
    times: list[list[float]] = [[] for _ in paths]
    for _ in range(ROUNDS):
        for run, spent in zip(paths, times, strict=True):
            start = time.perf_counter()
            run()
            spent.append(time.perf_counter() - start)
    return tuple(statistics.median(spent) for spent in times)


def _dilation_choices(dtype: torch.dtype, dilations: tuple[int, ...], training: bool
                      ) -> tuple[frozenset[int], list[Choice]]:
    precision = precision_name(dtype)
    key = cache_key(precision=precision, mode="train" if training else "infer",
                     dilations=list(dilations))
    timings, source = cached_timings(key, [str(rate) for rate in dilations],
                                     lambda rate: measure_dilated(int(rate), dtype, training))
    float32: set[int] = set()
    choices = []
    for rate in dilations:
        fp32_s, low_s = timings[str(rate)]
        keep_fp32 = fp32_s < low_s
        if keep_fp32:
            float32.add(rate)
        timed = "forward + backward" if training else "forward"
        choices.append(Choice(
            dilation_what(rate), "fp32" if keep_fp32 else precision,
            f"{timed} {precision} {1e3 * low_s:.1f} ms vs fp32 {1e3 * fp32_s:.1f} ms on a "
            f"{PROBE_MAP}x{PROBE_MAP} map, {source}"))
    return frozenset(float32), choices


@functools.cache
def hardware_decisions(device_type: str, dtype: torch.dtype | None,
                       dilations: tuple[int, ...] = (), training: bool = False
                       ) -> HardwareDecisions:
    """The choices for models run on ``device_type`` ("cpu", "cuda") at autocast ``dtype``
    (None: float32) whose ASPP has ``dilations``, for inference or ``training``; measured
    once per process (and cached on disk per CPU) where they are measured."""
    precision = precision_name(dtype)
    float32: frozenset[int] = frozenset()
    choices: list[Choice] = []
    cpu_16bit = device_type == "cpu" and dtype is not None
    if cpu_16bit and dilations:
        float32, choices = _dilation_choices(dtype, dilations, training)
    if device_type == "cpu":
        where = f"CPU: {cpu_model()}"
        layout = ("channels_last" if dtype is not None else "the model's own (NCHW)" if training
                  else "channels_last when compiled, else the model's own (NCHW backbone, "
                  "NHWC head)")
        choices.append(Choice("memory layout", layout,
                              "rule: oneDNN's 16-bit and frozen convolutions run in NHWC"))
    else:
        where = device_type
        choices.append(Choice("memory layout", "the model's own", "rule: unmeasured on GPUs"))
    if training:
        return HardwareDecisions(where, precision, float32, tuple(choices))
    if dtype is not None:
        choices.append(Choice(f"weights in eager {precision} inference",
                              f"cast to {precision} once",
                              "rule: the same cast autocast makes on every call"))
    choices.append(Choice("compiled inference", "frozen weights, a static graph per size",
                          "rule: a dynamic-shape graph ran 1.22-1.26x slower than one per "
                          "size"))
    return HardwareDecisions(where, precision, float32, tuple(choices))


def model_dilations(model: nn.Module) -> tuple[int, ...]:
    """The dilation rates of the modules of ``model`` that can keep them in float32."""
    return tuple(sorted({rate for m in model.modules() if hasattr(m, FLOAT32_DILATIONS)
                         for rate in m.dilations}))


def decide_for(model: nn.Module, device: torch.device, dtype: torch.dtype | None,
               training: bool = False) -> HardwareDecisions:
    """:func:`hardware_decisions` for ``model`` on ``device`` at ``dtype`` (for inference,
    or ``training``), applied to it (in place) and returned."""
    decisions = hardware_decisions(device.type, dtype, model_dilations(model), training)
    for module in model.modules():
        if hasattr(module, FLOAT32_DILATIONS):
            setattr(module, FLOAT32_DILATIONS,
                    frozenset(module.dilations) & decisions.float32_dilations)
    return decisions


def prepare_for_training(model: nn.Module, device: torch.device, dtype: torch.dtype | None
                         ) -> HardwareDecisions:
    """``model`` (in place) in the memory layout it trains fastest in at ``dtype``
    (:func:`segnest.runtime.precision.for_training`) and with its ASPP's dilated
    convolutions in the precision each trains faster in on this hardware; the decisions."""
    for_training(model, device, dtype)
    if dtype is None:  # nothing runs under autocast: the model stays as it is
        return hardware_decisions(device.type, None, (), training=True)
    return decide_for(model, device, dtype, training=True)


def apply_recorded(model: nn.Module, recorded: dict[str, str]) -> None:
    """Set on ``model`` (in place) the per-dilation precisions ``recorded`` holds (a
    :meth:`HardwareDecisions.record`, from the checkpoint a run resumes or from the main
    process): the same choices give the same numbers; rates it does not name keep theirs."""
    for module in model.modules():
        if not hasattr(module, FLOAT32_DILATIONS):
            continue
        float32 = set(getattr(module, FLOAT32_DILATIONS))
        for rate in module.dilations:
            chosen = recorded.get(dilation_what(rate))
            if chosen is not None:
                (float32.add if chosen == "fp32" else float32.discard)(rate)
        setattr(module, FLOAT32_DILATIONS, frozenset(float32))


def cast_weights_once(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """The weights and biases of ``model``'s convolutions and linear layers in ``dtype``
    (in place), except those of the convolutions it runs in float32 (dilations in
    ``float32_dilations``): autocast then finds them already cast."""
    keep = {id(p) for m in model.modules() if hasattr(m, FLOAT32_DILATIONS)
            for p in m.float32_parameters()}
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            for param in module.parameters(recurse=False):
                if id(param) not in keep and param.is_floating_point():
                    param.data = param.data.to(dtype)
    return model

