"""``segnest bench``: speed, peak memory and achieved FLOP/s of one model.

A step is one inference forward (eval mode, ``torch.inference_mode``, BN folded unless
``fuse_bn`` is off; ``compile`` compiles it with frozen weights as ``segnest eval`` does)
or one training step (forward, cross-entropy on random labels with the auxiliary loss,
backward, SGD update). Times are the median of ``runs`` steps after ``warmup`` untimed ones
(at least one). FLOPs are counted once with ``FlopCounterMode`` (a multiply-add is two
FLOPs) and the achieved rate is set against a convolution peak probe, one large 3x3
convolution timed in turns with the model's steps (so both see the same machine load):
the fraction says how close the model comes to what this device's convolution kernels
can do at best.

Peak memory is the growth over the memory in use before the first step, taken over the
warm-up steps (so it includes compilation with ``compile``): on CUDA from
``torch.cuda.max_memory_allocated``; on CPU from the process's resident-set high-water mark
(``VmHWM``, reset through ``/proc/self/clear_refs`` on Linux; elsewhere ``ru_maxrss``,
which can only grow, so there it is a lower bound when an earlier peak was higher).
"""

from __future__ import annotations

import dataclasses
import json
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from segnest.commands.config import validate_config
from segnest.errors import SegnestError
from segnest.inference.strategies import inference_model
from segnest.models import create_model
from segnest.models.deeplabv3 import DeepLabV3
from segnest.models.pixelwise import FULL_SIZE, loss_upsampling
from segnest.runtime.compiling import compile_model
from segnest.runtime.distributed import resolve_device
from segnest.runtime.precision import (
    autocast,
    precision_name,
    resolve_precision,
)
from segnest.runtime.tuning import hardware_decisions, model_dilations, prepare_for_training
from segnest.tasks.segmentation.config import TrainConfig
from segnest.tasks.segmentation.losses import segmentation_loss
from segnest.tools.config import BenchConfig

# Convolution peak probe: 256 -> 256 channels, 3x3, batch 2 at 128x128 (19.3 GFLOP).
PROBE_SHAPE = (2, 256, 128, 128)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(steps: dict[str, Callable[[], Any]], device: torch.device, warmup: int,
                     runs: int) -> dict[str, list[float]]:
    """Seconds per call of each step, ``runs`` calls after ``warmup`` untimed ones.

    The steps take turns (a, b, a, b, ...) so that a shared machine's slow and fast
    spells fall on all of them alike; compare their medians.
    """
    times: dict[str, list[float]] = {name: [] for name in steps}
    for index in range(warmup + runs):
        for name, step in steps.items():
            _synchronize(device)
            start = time.perf_counter()
            step()
            _synchronize(device)
            if index >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def _proc_status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


class PeakMemory:
    """Peak memory growth (bytes) of the code run between ``start()`` and ``peak()``."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.baseline = 0
        self.hwm_reset = False

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline = torch.cuda.memory_allocated(self.device)
            return
        rss = _proc_status_kb("VmRSS")
        try:
            # "5" resets the resident-set high-water mark to the current RSS (Linux >= 4.0).
            Path("/proc/self/clear_refs").write_text("5")
            self.hwm_reset = rss is not None
        except OSError:
            self.hwm_reset = False
        self.baseline = (rss if self.hwm_reset else self._maxrss_kb()) * 1024

    @staticmethod
    def _maxrss_kb() -> int:
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return maxrss // 1024 if sys.platform == "darwin" else maxrss  # bytes on macOS

    def peak(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) - self.baseline
        hwm = _proc_status_kb("VmHWM") if self.hwm_reset else None
        peak_kb = hwm if hwm is not None else self._maxrss_kb()
        return max(0, peak_kb * 1024 - self.baseline)


def conv_probe(device: torch.device,
               dtype: torch.dtype | None = None) -> tuple[Callable[[], None], int]:
    """One large 3x3 convolution, the yardstick of what this device's conv kernels reach:
    a step to time (alongside the model's, see :func:`time_interleaved`) and its FLOPs.
    ``dtype`` runs it under autocast (None: float32), in channels_last as the models'
    inference runs in that precision."""
    batch, channels, height, width = PROBE_SHAPE
    generator = torch.Generator().manual_seed(0)
    layout = torch.contiguous_format if dtype is None else torch.channels_last
    x = torch.randn(PROBE_SHAPE, generator=generator).to(device, memory_format=layout)
    weight = torch.randn(channels, channels, 3, 3, generator=generator).to(device) * 0.02
    weight = weight.contiguous(memory_format=layout)
    flops = 2 * batch * channels * channels * 9 * height * width

    def step() -> None:
        with torch.inference_mode(), autocast(device, dtype):
            F.conv2d(x, weight, padding=1)

    return step, flops


def _loss(out: Any, target_cls: torch.Tensor, target_seg: torch.Tensor) -> torch.Tensor:
    """The training commands' losses: cross-entropy for a classifier, and for a
    segmentation model ``segnest train``'s loss with its default auxiliary weight."""
    if not isinstance(out, dict):
        return F.cross_entropy(out.float(), target_cls)
    return segmentation_loss(out, target_seg, TrainConfig.aux_weight)[0]


def _describe(report: dict[str, Any]) -> str:
    mode = "inference" if report["mode"] == "infer" else "training step"
    options = ", ".join(k for k in ("fuse_bn", "compile", "checkpoint_activations",
                                    "channels_last") if report.get(k)) or "plain"
    options += f", {report['precision']}"
    decisions = [f"  decided         {line}" if i == 0 else f"                  {line}"
                 for i, line in enumerate(report["decisions"])]
    return "\n".join([
        f"segnest bench: {report['model']} {mode}, batch {report['batch']} at "
        f"{report['size']}x{report['size']} on {report['device']} ({options})",
        f"  throughput      {report['images_per_s']:.3f} images/s",
        f"  time per step   {report['ms_per_step']:.1f} ms (median of {report['runs']})",
        f"  peak memory     {report['peak_memory_mb']:.1f} MB above the start",
        f"  compute         {report['gflop_per_step']:.2f} GFLOP/step, "
        f"{report['achieved_gflops']:.2f} GFLOP/s",
        f"  conv peak       {report['conv_peak_gflops']:.2f} GFLOP/s (3x3 conv probe); "
        f"achieved = {100 * report['fraction_of_conv_peak']:.1f}% of it",
        f"  hardware        {report['hardware']}",
        *decisions,
    ])


def run_bench(cfg: BenchConfig, *, channels_last: bool = False,
              quiet: bool = False) -> dict[str, Any]:
    """Benchmark ``cfg.model`` and return (and print, unless ``quiet``) the report.

    ``cfg.precision`` runs the steps as the commands do: inference as ``segnest eval``
    (:func:`segnest.inference.strategies.inference_model`), a training step's forward under
    autocast. ``channels_last`` converts model and input to that memory format (inference
    in bf16/fp16 and compiled inference use it anyway).
    """
    cfg = validate_config(cfg)  # as the command line does, for callers from Python
    device = resolve_device(cfg.device)
    dtype = resolve_precision(cfg.precision, device)
    torch.manual_seed(0)
    model = create_model(cfg.model, num_classes=cfg.num_classes).to(device)
    train = cfg.mode == "train"
    if train:
        decisions = prepare_for_training(model.train(), device, dtype)
        if cfg.checkpoint_activations:
            if not hasattr(model, "set_grad_checkpointing"):
                raise SegnestError(f"{cfg.model} has no activation checkpointing")
            model.set_grad_checkpointing(True)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    if not train:
        # What inference_model decides for this hardware (the same call, cached): printed.
        decisions = hardware_decisions(device.type, dtype, model_dilations(model))
        # Eval's model, eager (FLOPs are counted on it) and, with --compile, compiled.
        model = inference_model(model, fuse=cfg.fuse_bn, precision=dtype)
    runner: Any = model
    if cfg.compile:
        # Inference compiles as eval and predict do, with frozen weights.
        runner = compile_model(model, frozen=not train)

    x = torch.randn(cfg.batch, 3, cfg.size, cfg.size, device=device)
    x = x.contiguous(memory_format=memory_format)
    target_cls = torch.randint(0, cfg.num_classes, (cfg.batch,), device=device)
    target_seg = torch.randint(0, cfg.num_classes, (cfg.batch, cfg.size, cfg.size),
                               device=device)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9) if train else None

    def infer_step(net: Any = runner) -> None:
        with torch.inference_mode():
            net(x)

    # Segmentation training: the loss takes the logits as segnest train decides for this
    # hardware and shape (upsampled by the model or in bands by the loss), printed too.
    forward_kwargs = {}
    if train and isinstance(model, DeepLabV3):
        loss_path = loss_upsampling(device, cfg.batch, cfg.num_classes, (cfg.size, cfg.size),
                                    align_corners=DeepLabV3.ALIGN_CORNERS)
        forward_kwargs = {"upsample": loss_path.chosen == FULL_SIZE}
        decisions = dataclasses.replace(decisions, choices=(*decisions.choices, loss_path))

    def train_step(net: Any = runner) -> None:
        with autocast(device, dtype):
            out = net(x, **forward_kwargs)
        loss = _loss(out, target_cls, target_seg)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step = train_step if train else infer_step
    memory = PeakMemory(device)
    memory.start()
    try:
        # Peak memory over the warm-up (at least one step; it includes compilation).
        for _ in range(max(1, cfg.warmup)):
            step()
    except ValueError as err:
        if "more than 1 value per channel" not in str(err):
            raise
        raise SegnestError(
            f"--batch {cfg.batch} cannot train {cfg.model}: batch norm after "
            "Split-Attention's global pooling needs at least two samples; use --batch 2"
        ) from err
    peak_bytes = memory.peak()
    probe, probe_flops = conv_probe(device, dtype)
    probe()  # its warm-up
    times = time_interleaved({"model": step, "probe": probe}, device, 0, cfg.runs)

    # Counted on the eager module: the same arithmetic, and compiled graphs hide their ops.
    with FlopCounterMode(display=False) as counter:
        step(model)
    flops = counter.get_total_flops()
    seconds = statistics.median(times["model"])
    peak = probe_flops / statistics.median(times["probe"]) / 1e9
    report: dict[str, Any] = {
        "model": cfg.model, "mode": cfg.mode, "device": str(device),
        "batch": cfg.batch, "size": cfg.size, "runs": cfg.runs, "warmup": cfg.warmup,
        "fuse_bn": cfg.fuse_bn and not train, "compile": cfg.compile,
        "checkpoint_activations": cfg.checkpoint_activations and train,
        # Frozen compilation, 16-bit inference and 16-bit CPU training use channels_last.
        "channels_last": channels_last or (cfg.compile and not train) or (
            dtype is not None and (not train or device.type == "cpu")),
        "precision": precision_name(dtype),
        "images_per_s": cfg.batch / seconds,
        "ms_per_step": 1e3 * seconds,
        "peak_memory_mb": peak_bytes / 2**20,
        "gflop_per_step": flops / 1e9,
        "achieved_gflops": flops / seconds / 1e9,
        "conv_peak_gflops": peak,
        "fraction_of_conv_peak": flops / seconds / 1e9 / peak,
        "hardware": decisions.device,
        "decisions": decisions.lines(),
    }
    if not quiet:
        print(json.dumps(report) if cfg.json else _describe(report))
    return report
