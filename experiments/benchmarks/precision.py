"""bf16 against fp32 on this machine: speed ratios measured in one process, and what bf16
costs in mIoU.

(a) DeepLabV3-ResNeSt-50 inference, 150 classes, batch 1 at 512x512, each variant as
    ``segnest eval`` runs it (:func:`segnest.inference.strategies.inference_model`: BN
    folded; ``--compile``: compiled with frozen weights; bf16: channels_last under
    autocast): fp32 compiled (the baseline), bf16 compiled, bf16 eager, fp32 eager.
(b) The training step of ``segnest train`` (:func:`segnest.tasks.segmentation.task.
    train_one_step`: forward under autocast, loss with the auxiliary head in fp32, SGD) of
    the same model, batch 2 at 512x512, in the layout ``segnest train`` gives it
    (bf16: channels_last): fp32 eager vs bf16 eager.
(c) mIoU of a checkpoint (the demo's: ``segnest demo`` writes runs/demo/train/last.pt) on
    its validation split with segnest's own ``evaluate()``, single-scale and multi-scale +
    flip, for each row of :data:`ACCURACY_VARIANTS` (fp32, bf16). int8 needs the checkpoint
    file and calibration images (``segnest quantize``): ``int8.py --parts accuracy`` gives
    fp32, bf16 and int8 side by side.

Speed: the variants take turns (a, b, c, a, b, c, ...) after warm-up and medians are
compared, so a shared machine's load falls on all alike. It prints the CPU and the flags
that decide bf16 (avx512_bf16, amx_bf16). On a CPU without native bf16 the bf16 rows are
skipped with the reason: there bf16 is emulated and far slower.

Run: python experiments/benchmarks/precision.py --checkpoint runs/demo/train/last.pt
     [--parts abc] [--runs 5] [--train-runs 3] [--size 512]
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from segnest.data import build_dataset
from segnest.engine.schedule import PolyLR
from segnest.inference.config import InferenceFlags
from segnest.inference.evaluate import evaluate
from segnest.inference.settings import InferenceSettings
from segnest.inference.strategies import Model, inference_model
from segnest.models import create_model, model_from_checkpoint
from segnest.runtime.checkpoint import load_checkpoint
from segnest.runtime.precision import NATIVE_BF16_FLAGS, cpu_native_bf16, for_training
from segnest.tasks.segmentation.config import TrainConfig
from segnest.tasks.segmentation.task import train_one_step
from segnest.tools.bench import time_interleaved

CPU = torch.device("cpu")
BF16 = torch.bfloat16

# Accuracy rows: name -> function(fp32 model in eval mode, device) -> the callable that
# evaluate() runs (logits or {'out': logits}). int8's rows: int8.py --parts accuracy.
ACCURACY_VARIANTS: dict[str, Callable[[nn.Module, torch.device], Model]] = {
    "fp32": lambda model, device: inference_model(model),
    "bf16": lambda model, device: inference_model(model, precision=BF16),
}


def describe_cpu() -> str:
    """The CPU's model name, core count and its flags that matter for bf16 and int8."""
    name, flags = platform.processor() or "unknown CPU", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and name in ("", "x86_64", "unknown CPU"):
                name = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    shown = [f for f in ("avx2", "avx512f", "avx512_vnni", *NATIVE_BF16_FLAGS, "amx_tile",
                         "amx_int8") if f in flags]
    return (f"{name}, {torch.get_num_threads()} threads, flags: {' '.join(shown) or 'n/a'}; "
            f"native bf16: {cpu_native_bf16()}; torch {torch.__version__}")


def report(title: str, times: dict[str, list[float]], baseline: str, unit: float = 1e3,
           unit_name: str = "ms", digits: int = 0) -> None:
    """Each variant's median time and speed against ``baseline`` two ways: the ratio of the
    medians, and the median of the ratios within each round of turns (on a loaded machine
    the rounds differ more than the variants within one)."""
    medians = {name: statistics.median(values) for name, values in times.items()}
    print(title)
    for name, median in medians.items():
        spread = ", ".join(f"{t * unit:.{digits}f}" for t in times[name])
        paired = statistics.median(b / t for b, t in zip(times[baseline], times[name],
                                                          strict=True))
        print(f"  {name:<16} {median * unit:8.{digits}f} {unit_name}   "
              f"{medians[baseline] / median:5.2f}x {baseline} (per round {paired:4.2f}x)   "
              f"(runs: {spread})")


def inference_speed(args: argparse.Namespace, bf16: bool) -> None:
    torch.manual_seed(0)
    model = create_model("deeplabv3_resnest50", num_classes=150).eval()
    x = torch.randn(1, 3, args.size, args.size)
    runners = {"fp32 compiled": inference_model(model, compile=True)}
    if bf16:
        runners["bf16 compiled"] = inference_model(model, compile=True, precision=BF16)
        runners["bf16 eager"] = inference_model(model, precision=BF16)
    runners["fp32 eager"] = inference_model(model)

    def step(runner: Model) -> Callable[[], None]:
        def run() -> None:
            with torch.inference_mode():
                runner(x)
        return run

    # Warm-up 2: the first call compiles (tens of seconds) and the second settles oneDNN.
    times = time_interleaved({name: step(r) for name, r in runners.items()}, CPU,
                             args.warmup, args.runs)
    report(f"(a) DeepLabV3-ResNeSt-50 inference, 150 classes, batch 1 at {args.size}x"
           f"{args.size} (BN folded; median of {args.runs})", times, "fp32 compiled")


def training_speed(args: argparse.Namespace, bf16: bool) -> None:
    torch.manual_seed(0)
    model = create_model("deeplabv3_resnest50", num_classes=150).train()
    cfg = TrainConfig()  # the step's loss settings: cross-entropy, aux weight 0.2
    generator = torch.Generator().manual_seed(0)
    batch = {"image": torch.randn(2, 3, args.size, args.size, generator=generator),
             "mask": torch.randint(0, 150, (2, args.size, args.size), generator=generator)}

    def step(precision: torch.dtype | None) -> Callable[[], None]:
        own = for_training(copy.deepcopy(model), CPU, precision)  # as segnest train does
        optimizer = torch.optim.SGD(own.parameters(), lr=1e-4, momentum=0.9)
        scheduler = PolyLR(optimizer, 10**6)
        scaler = torch.amp.GradScaler("cpu", enabled=False)

        def run() -> None:
            train_one_step(own, batch, optimizer, scheduler, scaler, cfg, CPU,
                           precision=precision)
        return run

    steps = {"fp32 eager": step(None)}
    if bf16:
        steps["bf16 eager"] = step(BF16)
    times = time_interleaved(steps, CPU, 1, args.train_runs)
    report(f"(b) DeepLabV3-ResNeSt-50 training step (segnest train's), batch 2 at {args.size}x"
           f"{args.size} (median of {args.train_runs})", times, "fp32 eager", 1.0, "s", 2)


def miou(runner: Model, dataset, settings: InferenceSettings) -> float:
    """mIoU (percent) of ``runner`` on ``dataset`` under ``settings``, by segnest's evaluate()."""
    results, _ = evaluate(runner, dataset, settings, CPU, progress=False)
    return results["mIoU"]


def accuracy(args: argparse.Namespace, bf16: bool) -> None:
    checkpoint = load_checkpoint(args.checkpoint)
    model = model_from_checkpoint(checkpoint, source=args.checkpoint).eval()
    config = checkpoint.get("config") or {}
    dataset_name = checkpoint["dataset"]
    dataset = build_dataset(dataset_name, config.get("data_root"), "val",
                            label_map=config.get("label_map"),
                            in_channels=int(checkpoint["model_kwargs"].get("in_chans", 3)))
    settings = {
        "single-scale": InferenceSettings.from_flags(InferenceFlags(), checkpoint, dataset_name),
        "ms+flip": InferenceSettings.from_flags(InferenceFlags(multi_scale=True, flip=True),
                                                checkpoint, dataset_name),
    }
    print(f"(c) mIoU of {args.checkpoint} on {dataset_name} val ({len(dataset)} images), "
          "eager, BN folded")
    rows = {name: make for name, make in ACCURACY_VARIANTS.items() if bf16 or name != "bf16"}
    table: dict[str, dict[str, float]] = {}
    for name, make in rows.items():
        runner = make(model, CPU)
        table[name] = {label: miou(runner, dataset, s) for label, s in settings.items()}
    print(f"  {'':8}" + "".join(f"{label:>16}" for label in settings))
    for name, values in table.items():
        cells = "".join(
            f"{values[label]:8.2f}" + (f" ({values[label] - table['fp32'][label]:+.2f})"
                                       if name != "fp32" else " " * 8)
            for label in settings)
        print(f"  {name:8}{cells}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="abc", help="any of a, b, c")
    parser.add_argument("--checkpoint", default="runs/demo/train/last.pt",
                        help="(c): a segnest checkpoint, e.g. the demo's")
    parser.add_argument("--size", type=int, default=512, help="(a), (b): input side")
    parser.add_argument("--warmup", type=int, default=2, help="(a): untimed calls")
    parser.add_argument("--runs", type=int, default=7, help="(a): timed calls")
    parser.add_argument("--train-runs", type=int, default=3, help="(b): timed steps")
    args = parser.parse_args()

    print(describe_cpu())
    bf16 = cpu_native_bf16()
    if not bf16:
        print("bf16 rows skipped: this CPU has no native bf16 (AVX512-BF16 or AMX-BF16); "
              "oneDNN would emulate it, far slower than fp32")
    if "a" in args.parts:
        inference_speed(args, bf16)
    if "b" in args.parts:
        training_speed(args, bf16)
    if "c" in args.parts:
        accuracy(args, bf16)


if __name__ == "__main__":
    main()
