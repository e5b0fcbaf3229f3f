"""segnest against its peers on this CPU: inference and a training step, interleaved in one
process.

Inference (DeepLabV3-ResNeSt-50, stride 8, 150 classes, batch 1, ``--size`` square, seeded
random weights; what is timed does not depend on them):

- segnest: fp32 and bf16, eager and compiled (``inference_model``, as eval and predict run
  it, with the hardware decisions of :mod:`segnest.runtime.tuning`); int8 in ONNX Runtime
  (``segnest quantize``'s default layer types); OpenVINO fp32, bf16 and int8 (``segnest
  export --format openvino`` / ``quantize --backend openvino``: NNCF, run with the bf16
  hint where the CPU has it, fp32 hint otherwise);
- peers (optional installs, skipped when missing): segmentation_models_pytorch's
  DeepLabV3 with timm's ``resnest50d`` encoder at output stride 8, fp32 and bf16, compiled
  the tuned way (channels_last, frozen weights, bf16 under autocast), and that network in
  OpenVINO fp32, bf16 and int8 (NNCF), as a user would convert it.

Training step (batch 2, ``--size``, SGD): segnest as ``segnest train`` runs it (auxiliary
head and loss on, the hardware decisions of
:func:`segnest.runtime.tuning.prepare_for_training` and the loss path of
:func:`segnest.models.pixelwise.loss_upsampling`), and without the auxiliary head (the
same work as smp's network), vs smp's DeepLabV3 with cross-entropy, each in fp32 and bf16
(autocast, channels_last). Eager: ``segnest train`` does not compile by default, nor does
smp's usual loop.

Each round times every path once, in turns, after one warm-up call each (compilation
happens there); the table gives medians and, for each path, the median over rounds of its
time divided by the reference's time in the same round (interleaved ratios are steadier
than ratios of medians on a shared machine).

Run: python experiments/benchmarks/peers.py [--rounds 5] [--size 512] [--no-train]
     [--only segnest,smp] (minutes: ResNeSt-50 at 512 x 512 on a few cores)
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import platform
import statistics
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from segnest.inference.config import QuantizeConfig
from segnest.inference.export import LogitsOnly, export_onnx
from segnest.inference.openvino import OpenVinoModel, StagedIR, quantize_ir, to_openvino
from segnest.inference.quantize import OnnxModel, quantize_onnx
from segnest.inference.strategies import inference_model
from segnest.models import create_model
from segnest.models.pixelwise import FULL_SIZE, loss_upsampling
from segnest.runtime.precision import cpu_native_bf16
from segnest.runtime.tuning import (
    cpu_flags,
    cpu_model,
    hardware_decisions,
    model_dilations,
    prepare_for_training,
)
from segnest.tasks.segmentation.losses import segmentation_loss

CLASSES = 150
BF16 = torch.bfloat16
Step = Callable[[], object]


def segnest_model(aux: bool = True) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("deeplabv3_resnest50", num_classes=CLASSES, aux=aux)


def smp_model() -> torch.nn.Module:
    import segmentation_models_pytorch as smp

    torch.manual_seed(0)
    return smp.DeepLabV3(encoder_name="tu-resnest50d", encoder_weights=None,
                         encoder_output_stride=8, classes=CLASSES)


def tuned_peer(model: torch.nn.Module, dtype: torch.dtype | None) -> Step:
    """A peer compiled the tuned way: channels_last, frozen weights, autocast for bf16."""
    import torch._inductor.config as inductor_config

    model = model.eval().to(memory_format=torch.channels_last)
    compiled = torch.compile(model)

    def run(x: torch.Tensor) -> torch.Tensor:
        autocast = (torch.autocast("cpu", dtype=dtype) if dtype is not None
                    else contextlib.nullcontext())
        with inductor_config.patch(freezing=True), autocast:
            return compiled(x.contiguous(memory_format=torch.channels_last))
    return run


def openvino_paths(name: str, module: torch.nn.Module, x: torch.Tensor,
                   calibration: list[torch.Tensor], folder: Path) -> dict[str, Callable]:
    """``name`` converted to OpenVINO: fp32, bf16 (where native) and NNCF int8."""
    converted = to_openvino(module, x)
    paths = {}
    staged = StagedIR(converted, folder / f"{name}.xml", {"classes": []})
    int8 = StagedIR(quantize_ir(to_openvino(module, x), calibration),
                    folder / f"{name}.int8.xml", {"classes": []})
    paths[f"{name} OpenVINO fp32"] = OpenVinoModel(staged.xml, precision="fp32")
    hint = "bf16" if cpu_native_bf16() else "fp32"
    if hint == "bf16":
        paths[f"{name} OpenVINO bf16"] = OpenVinoModel(staged.xml, precision="bf16")
    paths[f"{name} OpenVINO int8 ({hint} hint)"] = OpenVinoModel(int8.xml, precision=hint)
    return paths


def inference_paths(size: int, only: set[str], folder: Path) -> dict[str, Step]:
    x = torch.randn(1, 3, size, size)
    generator = torch.Generator().manual_seed(1)
    calibration = [torch.randn(1, 3, size, size, generator=generator) for _ in range(4)]
    runners: dict[str, Callable] = {}
    native = cpu_native_bf16()
    if "segnest" in only:
        model = segnest_model()
        runners["segnest fp32 eager"] = inference_model(model)
        runners["segnest fp32 compiled"] = inference_model(model, compile=True)
        if native:
            runners["segnest bf16 eager"] = inference_model(model, precision=BF16)
            runners["segnest bf16 compiled"] = inference_model(model, compile=True,
                                                               precision=BF16)
        logits = LogitsOnly(inference_model(model)).eval()
        onnx_fp32 = folder / "segnest.onnx"
        with torch.no_grad():
            export_onnx(logits, x, onnx_fp32, end_to_end=False)
        layer_types = QuantizeConfig().layer_types
        quantize_onnx(onnx_fp32, folder / "segnest.int8.onnx", calibration, layer_types)
        runners["segnest int8 ONNX Runtime"] = OnnxModel(folder / "segnest.int8.onnx")
        runners.update(openvino_paths("segnest", logits, x, calibration, folder))
    if "smp" in only and importlib.util.find_spec("segmentation_models_pytorch"):
        peer = smp_model().eval()
        runners["smp fp32 compiled tuned"] = tuned_peer(smp_model(), None)
        if native:
            runners["smp bf16 compiled tuned"] = tuned_peer(smp_model(), BF16)
        runners.update(openvino_paths("smp", peer, x, calibration, folder))

    def step(runner: Callable) -> Step:
        def run() -> object:
            with torch.inference_mode():
                return runner(x)
        return run
    return {name: step(runner) for name, runner in runners.items()}


def training_paths(size: int, only: set[str]) -> dict[str, Step]:
    x = torch.randn(2, 3, size, size)
    target = torch.randint(0, CLASSES, (2, size, size))
    dtypes = {"fp32": None, **({"bf16": BF16} if cpu_native_bf16() else {})}
    steps: dict[str, Step] = {}
    for label, dtype in dtypes.items():
        if "segnest" in only:
            # As segnest train runs it (auxiliary head on), and without the auxiliary head:
            # smp's network has none, so that row compares the same work.
            loss_path = loss_upsampling(torch.device("cpu"), 2, CLASSES, (size, size))
            upsample = loss_path.chosen == FULL_SIZE
            for aux, name in ((True, f"segnest train {label}"),
                              (False, f"segnest train {label} no aux")):
                model = segnest_model(aux).train()
                decisions = prepare_for_training(model, torch.device("cpu"), dtype)
                if aux:
                    print("\n".join(f"  training {label}: {line}"
                                     for line in (*decisions.lines(), loss_path.line())))
                steps[name] = train_step(
                    model, lambda m, x, up=upsample: m(x, upsample=up),
                    lambda out, t: segmentation_loss(out, t, 0.2)[0], x, target, dtype)
        if "smp" in only and importlib.util.find_spec("segmentation_models_pytorch"):
            peer = smp_model().train()
            if dtype is not None:
                peer = peer.to(memory_format=torch.channels_last)
            steps[f"smp train {label}"] = train_step(
                peer, lambda m, x: m(x), lambda out, t: F.cross_entropy(out.float(), t),
                x, target, dtype)
    return steps


def train_step(model: torch.nn.Module, forward: Callable, loss_fn: Callable,
               x: torch.Tensor, target: torch.Tensor, dtype: torch.dtype | None) -> Step:
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    if dtype is not None:
        x = x.contiguous(memory_format=torch.channels_last)

    def run() -> object:
        autocast = (torch.autocast("cpu", dtype=dtype) if dtype is not None
                    else contextlib.nullcontext())
        with autocast:
            out = forward(model, x)
        loss = loss_fn(out, target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss
    return run


def interleaved(steps: dict[str, Step], rounds: int, reference: str) -> None:
    for name, step in list(steps.items()):
        start = time.perf_counter()
        try:
            step()  # warm-up: compilation, oneDNN kernel selection
        except Exception:  # a path that fails here is reported and left out
            print(f"{name}: failed, left out\n{traceback.format_exc(limit=3)}")
            del steps[name]
            continue
        print(f"  warm-up {name}: {time.perf_counter() - start:.1f} s", flush=True)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    base = reference if reference in times else next(iter(times))
    print(f"| path | median ms | interleaved ratio vs {base} (x faster) |")
    print("|---|---|---|")
    for name, values in times.items():
        ratio = statistics.median(b / v for b, v in zip(times[base], values, strict=True))
        print(f"| {name} | {1e3 * statistics.median(values):.0f} | {ratio:.2f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--no-train", action="store_true", help="skip the training steps")
    parser.add_argument("--no-infer", action="store_true", help="skip inference")
    parser.add_argument("--only", default="segnest,smp", help="segnest, smp or both")
    args = parser.parse_args()
    only = set(args.only.split(","))
    flags = sorted(f for f in cpu_flags() if f.startswith(("avx", "amx")))
    print(f"CPU: {cpu_model()}, {torch.get_num_threads()} threads; {' '.join(flags)}")
    versions = [f"torch {torch.__version__}", f"python {platform.python_version()}"]
    for package in ("openvino", "onnxruntime", "segmentation_models_pytorch", "timm"):
        if importlib.util.find_spec(package):
            versions.append(f"{package} {__import__(package).__version__}")
    print("; ".join(versions))
    if cpu_native_bf16():
        decisions = hardware_decisions("cpu", BF16, model_dilations(segnest_model()))
        print("segnest's hardware decisions (bf16):\n  " + "\n  ".join(decisions.lines()))
    if not args.no_infer:
        with tempfile.TemporaryDirectory(prefix="segnest-peers-") as folder:
            print(f"\ninference, batch 1, {args.size}x{args.size}, {args.rounds} rounds")
            interleaved(inference_paths(args.size, only, Path(folder)), args.rounds,
                        "segnest fp32 compiled")
    if not args.no_train:
        print(f"\ntraining step, batch 2, {args.size}x{args.size}, {args.rounds} rounds")
        interleaved(training_paths(args.size, only), args.rounds, "segnest train fp32")


if __name__ == "__main__":
    main()
