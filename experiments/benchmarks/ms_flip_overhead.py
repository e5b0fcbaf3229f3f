"""Overhead of multi-scale + flip evaluation over its forward passes alone.

Times ``segnest.inference.strategies.multi_scale_inference`` (scales x flip, softmax
averaging, resizing back) and, interleaved in the same process, just the model's forward
passes on the same scaled and flipped batches. The ratio total / forwards is the cost of
everything around the network; 1.0 would be free.

Run: python experiments/benchmarks/ms_flip_overhead.py [--model deeplabv3_resnest14]
     [--size 256] [--runs 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from segnest.inference.strategies import _resize, _scaled_size, multi_scale_inference
from segnest.models import create_model
from segnest.models.fuse import fuse_bn

ADE20K_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="deeplabv3_resnest14")
    parser.add_argument("--size", type=int, default=256, help="input side")
    parser.add_argument("--num-classes", type=int, default=150)
    parser.add_argument("--scales", type=float, nargs="+", default=ADE20K_SCALES)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()

    torch.manual_seed(0)
    model = fuse_bn(create_model(args.model, num_classes=args.num_classes))
    image = torch.randn(1, 3, args.size, args.size)
    inputs = []
    for scale in args.scales:
        size = _scaled_size(args.size, args.size, scale, None)
        scaled = image if size == (args.size, args.size) else _resize(image, size)
        inputs.append(torch.cat([scaled, scaled.flip(-1)], dim=0))

    def full() -> None:
        multi_scale_inference(model, image, args.num_classes, scales=args.scales, flip=True)

    def forwards_only() -> None:
        for batch in inputs:
            model(batch)

    times: dict[str, list[float]] = {"total": [], "forwards": []}
    with torch.inference_mode():
        for index in range(args.warmup + args.runs):
            for name, step in (("total", full), ("forwards", forwards_only)):
                start = time.perf_counter()
                step()
                if index >= args.warmup:
                    times[name].append(time.perf_counter() - start)
    total, forwards = (statistics.median(times[k]) for k in ("total", "forwards"))
    print(f"{args.model} (BN folded), {args.size}x{args.size}, scales {list(args.scales)} "
          f"x flip, {args.num_classes} classes, torch {torch.__version__}")
    print(f"  multi-scale + flip total {total * 1e3:8.1f} ms")
    print(f"  forward passes alone     {forwards * 1e3:8.1f} ms")
    print(f"  overhead ratio           {total / forwards:.3f}x")


if __name__ == "__main__":
    main()
