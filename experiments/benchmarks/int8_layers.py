"""int8 vs fp32 vs bf16 per layer type, at the shapes of DeepLabV3-ResNeSt-50 at 512x512.

Each case is one convolution (bias, as after BN folding) + ReLU, batch 1, at a shape taken
from the stride-8 model on a 512x512 input (feature maps 64x64):

- ``1x1``: a bottleneck's 1x1 reduction in layer3 (1024 -> 256);
- ``3x3``: the head's plain 3x3 after the ASPP (256 -> 256);
- ``3x3 d2``: the same dense 3x3 with dilation 2, to separate dilation from grouping;
- ``splat g2``: Split-Attention's grouped 3x3 in layer2 (128 -> 256, groups = radix 2);
- ``splat g2 d2`` / ``splat g2 d4``: the same in the dilated layer3 (256 -> 512) and
  layer4 (512 -> 1024);
- ``aspp d12`` / ``aspp d36``: the ASPP's dilated 3x3 branches (2048 -> 256).

Paths, timed in turns in one process after warm-up (medians of ``--runs``):

- ``torch fp32``: eager, channels_last (oneDNN), as segnest runs an uncompiled model;
- ``torch bf16``: the same with bf16 weights and input (oneDNN, AMX where present);
- ``ort fp32`` / ``ort int8``: ONNX Runtime on the exported layer, unquantized and after
  ``quantize_static`` (QDQ, per-channel symmetric int8 weights, uint8 activations,
  calibrated on ReLU'd noise); the ratio int8/fp32 within ORT is the quantization gain;
- ``inductor fp32`` / ``inductor int8`` (only with ``torchao`` importable): torch.compile
  with frozen weights, and PT2E + ``X86InductorQuantizer`` + the same compile.

Run: python experiments/benchmarks/int8_layers.py [--runs 7] [--cases 1x1,splat-g2]
(PYTHONPATH may add a scratch torchao: pip install --target DIR --no-deps torchao)
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

# name -> (in, out, kernel, dilation, groups, side)
CASES = {
    "1x1": (1024, 256, 1, 1, 1, 64),
    "3x3": (256, 256, 3, 1, 1, 64),
    "3x3-d2": (256, 256, 3, 2, 1, 64),
    "splat-g2": (128, 256, 3, 1, 2, 64),
    "splat-g2-d2": (256, 512, 3, 2, 2, 64),
    "splat-g2-d4": (512, 1024, 3, 4, 2, 64),
    "aspp-d12": (2048, 256, 3, 12, 1, 64),
    "aspp-d36": (2048, 256, 3, 36, 1, 64),
}


def conv_relu(cin: int, cout: int, k: int, d: int, g: int) -> nn.Module:
    torch.manual_seed(0)
    conv = nn.Conv2d(cin, cout, k, padding=d * (k // 2), dilation=d, groups=g, bias=True)
    return nn.Sequential(conv, nn.ReLU()).eval()


def ort_sessions(model: nn.Module, x: torch.Tensor, folder: Path) -> dict[str, Callable]:
    import onnxruntime as ort
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    fp32 = folder / "layer.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(fp32), input_names=["x"], output_names=["y"],
                          opset_version=17, dynamo=False)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            g = torch.Generator().manual_seed(1)
            self.items = iter([{"x": torch.randn(x.shape, generator=g).relu().numpy()}
                               for _ in range(4)])

        def get_next(self):
            return next(self.items, None)

    int8 = folder / "layer.int8.onnx"
    quantize_static(str(fp32), str(int8), Reader(), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8)
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    feed = {"x": x.numpy()}
    out = {}
    for name, path in (("ort fp32", fp32), ("ort int8", int8)):
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        out[name] = (lambda s=session: s.run(None, feed))
    return out


def inductor_paths(model: nn.Module, x: torch.Tensor) -> dict[str, Callable]:
    try:
        import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    except ImportError:
        return {}
    import torch._inductor.config as inductor_config

    exported = torch.export.export(model, (x,)).module()
    quantizer = xiq.X86InductorQuantizer()
    quantizer.set_global(xiq.get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(exported, quantizer)
    g = torch.Generator().manual_seed(1)
    for _ in range(4):
        prepared(torch.randn(x.shape, generator=g).relu())
    converted = convert_pt2e(prepared)
    with inductor_config.patch(freezing=True), torch.no_grad():
        fp32 = torch.compile(model.to(memory_format=torch.channels_last))
        int8 = torch.compile(converted)
        xl = x.contiguous(memory_format=torch.channels_last)

        def run_fp32() -> None:
            with inductor_config.patch(freezing=True):
                fp32(xl)

        def run_int8() -> None:
            with inductor_config.patch(freezing=True):
                int8(xl)

        for step in (run_fp32, run_int8):  # compile now, not inside the timed runs
            step()
    return {"inductor fp32": run_fp32, "inductor int8": run_int8}


def time_case(name: str, runs: int, reps: int, use_inductor: bool) -> dict[str, float]:
    cin, cout, k, d, g, side = CASES[name]
    model = conv_relu(cin, cout, k, d, g)
    x = torch.randn(1, cin, side, side).relu()
    xl = x.contiguous(memory_format=torch.channels_last)
    eager = conv_relu(cin, cout, k, d, g).to(memory_format=torch.channels_last)
    # bf16 weights and input, as a frozen autocast graph runs them (eager autocast would
    # re-cast the weights on every call, which is not what a deployed model pays).
    eager_bf16 = conv_relu(cin, cout, k, d, g).to(torch.bfloat16,
                                                   memory_format=torch.channels_last)
    xl_bf16 = xl.to(torch.bfloat16)

    def torch_fp32() -> None:
        eager(xl)

    def torch_bf16() -> None:
        eager_bf16(xl_bf16)

    paths: dict[str, Callable] = {"torch fp32": torch_fp32, "torch bf16": torch_bf16}
    with tempfile.TemporaryDirectory(prefix="int8_layers_") as folder:
        paths.update(ort_sessions(model, x, Path(folder)))
        if use_inductor:
            paths.update(inductor_paths(conv_relu(cin, cout, k, d, g), x))
        times: dict[str, list[float]] = {p: [] for p in paths}
        with torch.inference_mode():
            for step in paths.values():
                step()
            for _ in range(runs):
                for p, step in paths.items():
                    start = time.perf_counter()
                    for _ in range(reps):
                        step()
                    times[p].append((time.perf_counter() - start) / reps)
    return {p: statistics.median(t) for p, t in times.items()}


# (faster, slower) path pairs whose time ratio slower / faster is printed.
SPEEDUPS = (("torch bf16", "torch fp32"), ("ort int8", "ort fp32"), ("ort int8", "torch bf16"),
            ("inductor int8", "inductor fp32"), ("inductor int8", "torch bf16"))


def speedup(result: dict[str, float], fast: str, slow: str) -> str:
    if fast not in result or slow not in result:
        return "-"
    return f"{result[slow] / result[fast]:.2f}x"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=",".join(CASES),
                        help=f"comma-separated subset of {', '.join(CASES)}")
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--reps", type=int, default=3, help="calls per timed run")
    parser.add_argument("--no-inductor", action="store_true",
                        help="skip the torchao PT2E + inductor paths")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"pid {os.getpid()}; times in ms (median of {args.runs})")
    header = None
    for name in args.cases.split(","):
        result = time_case(name, args.runs, args.reps, not args.no_inductor)
        if header is None:
            header = list(result)
            print(f"{'case':12s} " + " ".join(f"{h:>14s}" for h in header) + "  speed-ups: "
                  + " ".join(f"{a}>{b}" for a, b in SPEEDUPS))
        print(f"{name:12s} " + " ".join(f"{result[h] * 1e3:14.2f}" for h in header) + " "
              + " ".join(f"{speedup(result, a, b):>10s}" for a, b in SPEEDUPS), flush=True)

if __name__ == "__main__":
    main()
