"""int8 (segnest quantize) against fp32 and bf16: whole-model speed, and mIoU on mini val.

Part ``speed``: DeepLabV3-ResNeSt-50 (150 classes, seeded weights), one 512x512 image,
timed in turns in one process after warm-up (medians of ``--runs``):

- ``fp32 compiled``: segnest's compiled path, ``inference_model(model, compile=True)``;
- ``bf16 compiled``: ``segnest eval --precision bf16 --compile``'s path,
  ``inference_model(model, compile=True, precision=torch.bfloat16)``;
- ``ort fp32``: the ONNX export in ONNX Runtime, unquantized;
- ``inductor int8 (torchao PT2E)`` with ``--pt2e`` and torchao importable: PT2E with
  the x86 inductor quantizer (all convolutions), frozen compiled;
- ``ort int8 <types>``: ``segnest quantize``'s model for each ``--layer-types`` set in
  ``--type-sets`` (calibrated on a few random normalized images: speed does not depend on
  the calibration).

Part ``accuracy``: the demo checkpoint (``segnest demo``'s ``train/last.pt``) on the mini
val set with segnest's ``evaluate``: fp32 (BN folded), bf16 (``--precision bf16``'s path) and
int8 (``segnest quantize`` with its default layer types, calibrated on 16 training images),
single scale and multi-scale + flip.

Run: python experiments/benchmarks/int8.py --checkpoint runs/demo/train/last.pt
     [--parts speed,accuracy] [--runs 5] [--size 512]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from segnest.data import build_dataset
from segnest.inference.config import InferenceFlags, QuantizeConfig
from segnest.inference.evaluate import evaluate
from segnest.inference.export import LogitsOnly, export_onnx
from segnest.inference.metrics import percent
from segnest.inference.quantize import OnnxModel, quantize_onnx, run_quantize
from segnest.inference.settings import InferenceSettings
from segnest.inference.strategies import inference_model
from segnest.models import create_model, model_from_checkpoint
from segnest.runtime.checkpoint import load_checkpoint


def pt2e_int8(model: torch.nn.Module, x: torch.Tensor,
              calibration: list[torch.Tensor]) -> Callable | None:
    """The torchao PT2E + X86InductorQuantizer int8 model, frozen compiled; None without
    torchao (not a segnest dependency: pip install --target DIR --no-deps torchao)."""
    try:
        import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    except ImportError:
        return None
    from segnest.runtime.compiling import FrozenCompiled

    # PT2E folds the batch norms itself; it takes the model as trained.
    exported = torch.export.export(LogitsOnly(model.eval()), (x,)).module()
    quantizer = xiq.X86InductorQuantizer()
    quantizer.set_global(xiq.get_default_x86_inductor_quantization_config())
    try:
        prepared = prepare_pt2e(exported, quantizer)
    except ValueError as err:  # the quantizer's pattern matching, on this torch/torchao
        print(f"torchao PT2E failed on the whole model: {err}")
        return None
    with torch.no_grad():
        for batch in calibration:
            prepared(batch)
    return FrozenCompiled(torch.compile(convert_pt2e(prepared)))


def speed(args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    model = create_model("deeplabv3_resnest50", num_classes=150).eval()
    x = torch.randn(1, 3, args.size, args.size)
    paths: dict[str, Callable] = {}
    started = time.perf_counter()
    paths["fp32 compiled"] = inference_model(model, compile=True)
    paths["bf16 compiled"] = inference_model(model, compile=True, precision=torch.bfloat16)
    with tempfile.TemporaryDirectory(prefix="int8-bench-") as folder:
        fp32 = Path(folder) / "model.onnx"
        with torch.no_grad():
            export_onnx(LogitsOnly(inference_model(model)).eval(), x, fp32, end_to_end=False)
        paths["ort fp32"] = OnnxModel(fp32)
        generator = torch.Generator().manual_seed(1)
        calibration = [torch.randn(1, 3, args.size, args.size, generator=generator)
                       for _ in range(2)]
        for types in args.type_sets.split(";"):
            target = Path(folder) / f"model.{types.replace(',', '_')}.int8.onnx"
            counts = quantize_onnx(fp32, target, calibration, types.split(","))
            print(f"int8 {types}: {counts}")
            paths[f"ort int8 {types}"] = OnnxModel(target)
        if args.pt2e:
            inductor = pt2e_int8(model, x, calibration)
            if inductor is not None:
                paths["inductor int8 (torchao PT2E)"] = inductor
        print(f"prepared (compiles, exports, quantization) in "
              f"{time.perf_counter() - started:.0f} s; timing {args.runs} runs", flush=True)
        times: dict[str, list[float]] = {name: [] for name in paths}
        with torch.inference_mode():
            for run in paths.values():  # warm-up: compiles for this size
                run(x)
            for _ in range(args.runs):
                for name, run in paths.items():
                    start = time.perf_counter()
                    run(x)
                    times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(t) for name, t in times.items()}
    bf16 = medians["bf16 compiled"]
    fp32_s = medians["fp32 compiled"]
    print(f"\nDeepLabV3-ResNeSt-50, 1x3x{args.size}x{args.size}, "
          f"{torch.get_num_threads()} threads; median of {args.runs}")
    print(f"{'path':42s} {'s/img':>8s} {'vs fp32':>8s} {'vs bf16':>8s}  all runs")
    for name, median in medians.items():
        runs = " ".join(f"{t:.3f}" for t in times[name])
        print(f"{name:42s} {median:8.3f} {fp32_s / median:7.2f}x {bf16 / median:7.2f}x  {runs}")


def accuracy(args: argparse.Namespace) -> None:
    checkpoint = load_checkpoint(args.checkpoint)
    fp32 = inference_model(model_from_checkpoint(checkpoint, source=args.checkpoint))
    with tempfile.TemporaryDirectory(prefix="int8-acc-") as folder:
        result = run_quantize(QuantizeConfig(checkpoint=args.checkpoint,
                                             out=str(Path(folder) / "model.int8.onnx")))
        bf16 = inference_model(model_from_checkpoint(checkpoint, source=args.checkpoint),
                               precision=torch.bfloat16)
        models = {"fp32": fp32, "bf16": bf16, "int8": OnnxModel(result["target"])}
        dataset_name = checkpoint["dataset"]
        root = (checkpoint.get("config") or {}).get("data_root")
        dataset = build_dataset(dataset_name, root, "val")
        rows = []
        for label, flags in (("single scale", InferenceFlags()),
                             ("multi-scale + flip", InferenceFlags(multi_scale=True, flip=True))):
            settings = InferenceSettings.from_flags(flags, checkpoint)
            for name, model in models.items():
                metrics, _ = evaluate(model, dataset, settings, "cpu", progress=False)
                rows.append((label, name, percent(metrics["mIoU"]), percent(metrics["pixAcc"]),
                             metrics["timing"]["forward_s"]))
    print(f"\n{args.checkpoint} on {dataset_name} val ({len(dataset)} images)")
    print(f"{'setting':20s} {'precision':9s} {'mIoU':>7s} {'pixAcc':>7s} {'forward s':>9s}")
    for label, name, miou, pix, seconds in rows:
        print(f"{label:20s} {name:9s} {miou:>7s} {pix:>7s} {seconds:9.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="speed,accuracy")
    parser.add_argument("--checkpoint", default="runs/demo/train/last.pt")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--type-sets", default="pointwise,dense;pointwise,dense,grouped,dilated",
                        help="';'-separated --layer-types sets to time")
    parser.add_argument("--pt2e", action="store_true",
                        help="also time torchao's PT2E int8 through inductor, if importable")
    args = parser.parse_args()
    parts = args.parts.split(",")
    if "speed" in parts:
        speed(args)
    if "accuracy" in parts:
        accuracy(args)


if __name__ == "__main__":
    main()
