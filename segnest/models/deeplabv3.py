"""DeepLabV3 on a dilated ResNeSt backbone, with the auxiliary FCN head on layer3.

Head layout as in the authors' segmentation code: ASPP with ``channels`` per branch (1x1,
three dilated 3x3, image pooling) -> concat -> 1x1 projection + BN + ReLU + Dropout(0.5)
-> 3x3 conv + BN + ReLU + Dropout(0.1) -> 1x1 classifier. Logits are upsampled
bilinearly (align_corners=True) to the input size, so any input size works.

Memory layout on a CPU: the head runs in channels_last (NHWC) whatever the layout of the
backbone. oneDNN's NHWC kernels skip the zero padding that the ASPP's wide dilations
(12/24/36 at output stride 8) read on a 64x64 map, and its NHWC 1x1 convolutions are
faster too (measurements: experiments/benchmarks/README.md). The logits are upsampled in
channels_last as well, which lets the loss and softmax run over contiguous class rows
(:mod:`segnest.models.pixelwise`). Same numbers, another stride order; GPUs keep the
model's own layout.
"""

from __future__ import annotations

from collections.abc import Callable
from os import PathLike
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from segnest.models.registry import register_head
from segnest.models.resnest import RESNEST_VARIANTS, ResNeSt, build_resnest
from segnest.models.splat import NormLayer
from segnest.models.weights import load_pretrained

# ASPP dilation rates per output stride (the rates scale with the feature resolution).
ASPP_RATES = {8: (12, 24, 36), 16: (6, 12, 18), 32: (3, 6, 9)}


def conv_bn_relu(in_ch: int, out_ch: int, kernel: int, norm_layer: NormLayer,
                 dilation: int = 1) -> nn.Sequential:
    padding = dilation * (kernel // 2)
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel, padding=padding, dilation=dilation, bias=False),
        norm_layer(out_ch),
        nn.ReLU(inplace=True),
    )


class ASPPPooling(nn.Module):
    """Image-level branch: global average pool -> 1x1 conv + BN + ReLU -> broadcast."""

    def __init__(self, in_ch: int, out_ch: int, norm_layer: NormLayer) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.conv = conv_bn_relu(in_ch, out_ch, 1, norm_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Every position gets the same vector: expand is exact and cheaper than interpolate.
        return self.conv(self.pool(x)).expand(-1, -1, x.shape[2], x.shape[3])


class ASPP(nn.Module):
    def __init__(self, in_ch: int, channels: int, rates: tuple[int, int, int],
                 norm_layer: NormLayer, dropout: float = 0.5) -> None:
        super().__init__()
        self.branches = nn.ModuleList(
            [conv_bn_relu(in_ch, channels, 1, norm_layer)]
            + [conv_bn_relu(in_ch, channels, 3, norm_layer, dilation=r) for r in rates]
            + [ASPPPooling(in_ch, channels, norm_layer)]
        )
        self.project = nn.Sequential(
            nn.Conv2d(channels * len(self.branches), channels, 1, bias=False),
            norm_layer(channels),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
        )
        # The dilation of each branch (None: not dilated), and the dilations whose branches
        # run in float32 under CPU autocast. Which is faster depends on the CPU (oneDNN's
        # bf16 kernels for wide dilations on a small map were 1.4-6x slower than fp32 on
        # one AMX CPU, 1.56-2.08x faster on an AVX-512 BF16 CPU without AMX:
        # experiments/benchmarks/README.md); segnest.runtime.tuning decides it for the CPU
        # at hand. Until it has, float32, as measured first.
        self.branch_dilations = [None, *rates, None]
        self.dilations = tuple(rates)
        self.float32_dilations = frozenset(rates)

    def float32_parameters(self) -> list[nn.Parameter]:
        """The parameters of the branches that run in float32 under CPU autocast."""
        return [p for branch, rate in zip(self.branches, self.branch_dilations, strict=True)
                if rate in self.float32_dilations for p in branch.parameters()]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [_float32_on_cpu(branch, x) if rate in self.float32_dilations else branch(x)
                for branch, rate in zip(self.branches, self.branch_dilations, strict=True)]
        return self.project(torch.cat(outs, dim=1))


def _float32_on_cpu(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)``, in float32 when it would run under CPU autocast."""
    if x.device.type != "cpu" or not torch.is_autocast_enabled("cpu"):
        return module(x)
    with torch.autocast("cpu", enabled=False):
        return module(x.float())


class DeepLabV3Head(nn.Sequential):
    def __init__(self, in_ch: int, num_classes: int, channels: int = 256,
                 rates: tuple[int, int, int] = (12, 24, 36),
                 norm_layer: NormLayer = nn.BatchNorm2d) -> None:
        super().__init__(
            ASPP(in_ch, channels, rates, norm_layer),
            conv_bn_relu(channels, channels, 3, norm_layer),
            nn.Dropout(0.1),
            nn.Conv2d(channels, num_classes, 1),
        )


class FCNHead(nn.Sequential):
    """Auxiliary head on layer3: 3x3 conv to in/4 channels + BN + ReLU + Dropout + 1x1."""

    def __init__(self, in_ch: int, num_classes: int, norm_layer: NormLayer = nn.BatchNorm2d):
        inter = in_ch // 4
        super().__init__(
            conv_bn_relu(in_ch, inter, 3, norm_layer),
            nn.Dropout(0.1),
            nn.Conv2d(inter, num_classes, 1),
        )


class DeepLabV3(nn.Module):
    """Backbone + DeepLabV3 head (+ auxiliary FCN head).

    ``forward`` returns ``{"out": logits}`` at input size, plus ``"aux"`` in training when
    the auxiliary head is enabled. ``forward(x, upsample=False)`` returns both at the
    feature resolution (input / output stride), for a loss that upsamples by itself:
    :func:`segnest.models.pixelwise.upsampled_cross_entropy` with ``ALIGN_CORNERS``.
    """

    # How the logits are upsampled to the input size (bilinear), as the reference does.
    ALIGN_CORNERS = True

    def __init__(self, backbone: ResNeSt, num_classes: int, aux: bool = True,
                 head_channels: int = 256, norm_layer: NormLayer = nn.BatchNorm2d) -> None:
        super().__init__()
        if backbone.num_classes != 0:
            raise ValueError("DeepLabV3 needs a feature backbone (num_classes=0)")
        self.backbone = backbone
        self.num_classes = num_classes
        self.head_channels = head_channels
        channels = backbone.feature_channels
        rates = ASPP_RATES[backbone.output_stride]
        self.head = DeepLabV3Head(channels[3], num_classes, head_channels, rates, norm_layer)
        self.aux_head = FCNHead(channels[2], num_classes, norm_layer) if aux else None

    @staticmethod
    def _cpu_channels_last(x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":
            return x
        return x.contiguous(memory_format=torch.channels_last)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing of the backbone's blocks (see
        :meth:`ResNeSt.set_grad_checkpointing`)."""
        self.backbone.set_grad_checkpointing(enable)

    def forward(self, x: torch.Tensor, upsample: bool = True) -> dict[str, torch.Tensor]:
        size = x.shape[-2:] if upsample else None
        features = self.backbone.forward_stages(x)
        logits = self.head(self._cpu_channels_last(features["layer4"]))
        out = {"out": self._upsample(logits, size)}
        if self.training and self.aux_head is not None:
            out["aux"] = self._upsample(self.aux_head(features["layer3"]), size)
        return out

    def _upsample(self, logits: torch.Tensor, size: torch.Size | None) -> torch.Tensor:
        # Under bf16/fp16 autocast the logits leave in float32: the loss, the softmax and
        # the upsampling to full size (here or in the loss) stay float32.
        logits = self._cpu_channels_last(logits.float())
        if size is None:
            return logits
        return F.interpolate(logits, size=size, mode="bilinear",
                             align_corners=self.ALIGN_CORNERS)


@register_head("deeplabv3", task="segmentation", backbones=RESNEST_VARIANTS)
def build_deeplabv3(
    backbone_name: str,
    num_classes: int,
    aux: bool = True,
    head_channels: int = 256,
    output_stride: int = 8,
    pretrained_backbone: str | PathLike | None = None,
    norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d,
    **backbone_overrides: Any,
) -> DeepLabV3:
    """DeepLabV3 on ResNeSt variant ``backbone_name`` (stride 8 by default); every keyword
    not of the head goes to the backbone (``stage_width``, ``dropblock_prob``, ...)."""
    backbone = build_resnest(backbone_name, num_classes=0, output_stride=output_stride,
                             norm_layer=norm_layer, **backbone_overrides)
    if pretrained_backbone is not None:
        load_pretrained(backbone, pretrained_backbone)
    return DeepLabV3(
        backbone, num_classes, aux=aux, head_channels=head_channels, norm_layer=norm_layer
    )
