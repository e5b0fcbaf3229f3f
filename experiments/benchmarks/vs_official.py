"""segnest against the authors' ResNeSt (the ``resnest`` package), side by side.

Same architecture, same weights (the official state dict loaded into segnest), same
input, one process, interleaved A/B runs after warm-up, medians reported.

  a) stride-8 ResNeSt-50 backbone inference: segnest with BN folded vs official
     ``resnest50(dilated=True)``; speed ratio and achieved GFLOP/s as a fraction of a
     3x3 convolution peak probe timed in turns with the models.
  b) DeepLabV3-ResNeSt-50 training step: segnest (its model and its loss) vs the official
     backbone under the same head run as the reference runs it (the authors' DeepLabV3 in
     PyTorch-Encoding: plain NCHW modules, ``nn.CrossEntropyLoss``); speed ratio.
  c) activation checkpointing: peak training memory with and without, each measured by
     ``segnest.tools.bench.run_bench`` in its own subprocess so the peaks are separate.

Run: python experiments/benchmarks/vs_official.py [--parts abc] [--size 512] [--runs 3]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from segnest.inference.strategies import inference_model
from segnest.models import create_model
from segnest.models.deeplabv3 import DeepLabV3
from segnest.models.fuse import fuse_bn
from segnest.models.pixelwise import upsampled_cross_entropy
from segnest.runtime.compiling import compile_model
from segnest.tools.bench import conv_probe, time_interleaved

try:
    import resnest.torch as official
except ImportError:  # pragma: no cover - the benchmark needs the reference package
    sys.exit("needs the official package: pip install resnest")


def randomize_norm_stats(model: nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            n = module.num_features
            module.running_mean.copy_(torch.rand(n, generator=generator) * 0.2 - 0.1)
            module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)


class OfficialBackbone(nn.Module):
    """The official dilated ResNet exposed with segnest's backbone interface."""

    num_classes = 0
    output_stride = 8
    feature_channels = [256, 512, 1024, 2048]

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward_stages(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        net = self.net
        x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
        features = {}
        for name in ("layer1", "layer2", "layer3", "layer4"):
            x = getattr(net, name)(x)
            features[name] = x
        return features

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.forward_stages(x)


class ReferenceDeepLabV3(DeepLabV3):
    """segnest's DeepLabV3 modules (same architecture and weights) with the reference
    forward: every tensor in the backbone's layout, logits upsampled in NCHW."""

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        size = x.shape[-2:]
        features = self.backbone.forward_stages(x)
        out = {"out": F.interpolate(self.head(features["layer4"]), size=size,
                                    mode="bilinear", align_corners=True)}
        out["aux"] = F.interpolate(self.aux_head(features["layer3"]), size=size,
                                   mode="bilinear", align_corners=True)
        return out


def official_backbone() -> tuple[nn.Module, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    net = official.resnest50(pretrained=False, dilated=True)
    randomize_norm_stats(net, 1)
    del net.fc  # unused by a backbone; keeps the state dicts equal
    return OfficialBackbone(net), net.state_dict()


def interleaved(steps: dict[str, Callable[[], object]], warmup: int,
                runs: int) -> dict[str, float]:
    """Median seconds per step; runs alternate between the steps to share the noise."""
    times = time_interleaved(steps, torch.device("cpu"), warmup, runs)
    return {name: statistics.median(values) for name, values in times.items()}


def part_a(args: argparse.Namespace) -> None:
    ref, state = official_backbone()
    ref.eval()
    ours = create_model("resnest50", output_stride=8)
    ours.load_state_dict(state, strict=True)
    ours_plain = ours.eval()
    fused = fuse_bn(ours_plain)
    x = torch.randn(args.infer_batch, 3, args.size, args.size)
    with torch.inference_mode():
        diff = (fused(x)["layer4"] - ref(x)["layer4"]).abs().max().item()
        with FlopCounterMode(display=False) as counter:
            ref(x)
        flops = counter.get_total_flops()
        probe, probe_flops = conv_probe(torch.device("cpu"))
        steps = {"conv probe": probe, "official": lambda: ref(x),
                 "segnest plain": lambda: ours_plain(x), "segnest fused": lambda: fused(x)}
        if args.compile:
            # Exactly what segnest eval/predict --compile run (its own folded copy: compiling
            # moves the weights to channels_last, which must not touch the eager rows).
            # The warm-up call compiles.
            compiled = inference_model(ours_plain, compile=True)
            steps["fused+compile"] = lambda: compiled(x)
        seconds = interleaved(steps, args.warmup, args.runs)
        if args.compile:
            diff = max(diff, (compiled(x)["layer4"] - ref(x)["layer4"]).abs().max().item())
    peak = probe_flops / seconds.pop("conv probe") / 1e9
    print(f"(a) stride-8 ResNeSt-50 backbone inference, batch {args.infer_batch} at "
          f"{args.size}x{args.size}: {flops / 1e9:.1f} GFLOP, max |diff| to official "
          f"{diff:.2e}")
    print(f"    conv peak probe {peak:.1f} GFLOP/s")
    for name, sec in seconds.items():
        rate = flops / sec / 1e9
        print(f"    {name:14s} {sec * 1e3:8.0f} ms  {rate:6.1f} GFLOP/s  "
              f"{100 * rate / peak:5.1f}% of peak  speed vs official "
              f"{seconds['official'] / sec:.2f}x")


def part_b(args: argparse.Namespace) -> None:
    ref_backbone, state = official_backbone()
    ours = create_model("deeplabv3_resnest50", num_classes=150)
    ours.backbone.load_state_dict(state, strict=True)
    assembly = ReferenceDeepLabV3(ref_backbone, 150)
    assembly.head.load_state_dict(ours.head.state_dict())
    assembly.aux_head.load_state_dict(ours.aux_head.state_dict())
    ours.train()
    assembly.train()
    x = torch.randn(args.train_batch, 3, args.train_size, args.train_size)
    target = torch.randint(0, 150, (args.train_batch, args.train_size, args.train_size))

    def step(model: nn.Module, optimizer: torch.optim.Optimizer,
             criterion: Callable[..., torch.Tensor] = upsampled_cross_entropy,
             **forward_kwargs: bool) -> Callable[[], None]:
        def run() -> None:
            out = model(x, **forward_kwargs)
            loss = criterion(out["out"], target) + 0.2 * criterion(out["aux"], target)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return run

    # Same numbers on both sides (dropout off in copies, so the masks cannot differ).
    losses = []
    for model, criterion, kwargs in ((assembly, F.cross_entropy, {}),
                                     (ours, upsampled_cross_entropy, {"upsample": False})):
        twin = copy.deepcopy(model)
        for module in twin.modules():
            if isinstance(module, nn.Dropout):
                module.p = 0.0
        out = twin(x, **kwargs)
        losses.append((criterion(out["out"], target) + 0.2 * criterion(out["aux"], target))
                      .item())
    steps = {"official+head": step(assembly, torch.optim.SGD(assembly.parameters(), 0.0),
                                   F.cross_entropy),
             "segnest": step(ours, torch.optim.SGD(ours.parameters(), 0.0), upsample=False)}
    if args.compile:
        twin = copy.deepcopy(ours)
        steps["segnest compile"] = step(compile_model(twin),
                                        torch.optim.SGD(twin.parameters(), 0.0),
                                        upsample=False)
    seconds = interleaved(steps, args.train_warmup, args.train_runs)
    print(f"(b) DeepLabV3-ResNeSt-50 training step, batch {args.train_batch} at "
          f"{args.train_size}x{args.train_size}: loss official {losses[0]:.6f}, "
          f"segnest {losses[1]:.6f}")
    for name, sec in seconds.items():
        print(f"    {name:14s} {sec:8.2f} s  speed vs official "
              f"{seconds['official+head'] / sec:.2f}x")


def bench_subprocess(args: argparse.Namespace, checkpoint: bool) -> dict:
    cfg = dict(model="deeplabv3_resnest50", size=args.train_size, batch=args.train_batch,
               mode="train", warmup=0, runs=1, checkpoint_activations=checkpoint,
               device="cpu")
    code = ("import json, sys; from segnest.tools.config import BenchConfig; "
            "from segnest.tools.bench import run_bench; "
            "print(json.dumps(run_bench(BenchConfig(**json.loads(sys.argv[1])), quiet=True)))")
    result = subprocess.run([sys.executable, "-c", code, json.dumps(cfg)], check=True,
                            capture_output=True, text=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def part_c(args: argparse.Namespace) -> None:
    plain = bench_subprocess(args, checkpoint=False)
    ckpt = bench_subprocess(args, checkpoint=True)
    cut = 1 - ckpt["peak_memory_mb"] / plain["peak_memory_mb"]
    print(f"(c) activation checkpointing, DeepLabV3-ResNeSt-50 training step, batch "
          f"{args.train_batch} at {args.train_size}x{args.train_size} (separate processes)")
    print(f"    plain        peak +{plain['peak_memory_mb']:7.0f} MB  "
          f"{plain['ms_per_step'] / 1e3:6.2f} s/step")
    print(f"    checkpointed peak +{ckpt['peak_memory_mb']:7.0f} MB  "
          f"{ckpt['ms_per_step'] / 1e3:6.2f} s/step")
    slowdown = ckpt["ms_per_step"] / plain["ms_per_step"]
    print(f"    peak memory cut {100 * cut:.1f}%, time x{slowdown:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="abc", help="which of a, b, c to run")
    parser.add_argument("--size", type=int, default=512, help="inference input side (a)")
    parser.add_argument("--infer-batch", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--train-size", type=int, default=512, help="training side (b, c)")
    parser.add_argument("--train-batch", type=int, default=2)
    parser.add_argument("--train-warmup", type=int, default=1)
    parser.add_argument("--train-runs", type=int, default=1)
    parser.add_argument("--compile", action="store_true",
                        help="add torch.compile'd segnest rows (compiled during warm-up)")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for part, run in (("a", part_a), ("b", part_b), ("c", part_c)):
        if part in args.parts:
            run(args)
            sys.stdout.flush()


if __name__ == "__main__":
    main()
