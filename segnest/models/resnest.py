"""The ResNeSt backbone family (and the ResNet-D baselines it is compared with).

One generic class, :class:`ResNeSt`; each published variant is a row of
:data:`RESNEST_VARIANTS`. Structure and parameter names follow the authors' ``resnest``
package, so their ImageNet checkpoints load with strict key matching into the classifier
and, fc aside, into the dilated backbone.

Output stride follows the reference rule: at stride 8, layer3 and layer4 keep stride 1 with
dilation 2 and 4, and the first block of each dilated stage uses half the dilation; at
stride 16 only layer4 is dilated (2, first block 1). In a stride-1 stage the first block's
``avd`` layer is ``AvgPool2d(3, 1, 1)`` and the shortcut pool is ``AvgPool2d(1, 1)``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from segnest.models.registry import register_backbone
from segnest.models.splat import DropBlock, NormLayer, SplitAttentionConv

STAGE_NAMES = ("layer1", "layer2", "layer3", "layer4")
EXPANSION = 4


def _resnest(layers, stem_width=64, radix=2, groups=1, width=64, avd_first=False, **kw):
    return dict(layers=layers, stem_width=stem_width, radix=radix, groups=groups,
                bottleneck_width=width, deep_stem=True, avg_down=True, avd=True,
                avd_first=avd_first, **kw)


def _fast(radix: int, groups: int, width: int) -> dict[str, Any]:
    return _resnest((3, 4, 6, 3), stem_width=32, radix=radix, groups=groups, width=width,
                    avd_first=True)


# name -> constructor arguments of ResNeSt. radix=0 is the plain (ResNet-D) bottleneck.
RESNEST_VARIANTS: dict[str, dict[str, Any]] = {
    "resnest14": _resnest((1, 1, 1, 1), stem_width=32),
    "resnest26": _resnest((2, 2, 2, 2), stem_width=32),
    "resnest50": _resnest((3, 4, 6, 3), stem_width=32),
    "resnest101": _resnest((3, 4, 23, 3)),
    "resnest200": _resnest((3, 24, 36, 3)),
    "resnest269": _resnest((3, 30, 48, 8)),
    "resnest50_fast_1s1x64d": _fast(1, 1, 64),
    "resnest50_fast_2s1x64d": _fast(2, 1, 64),
    "resnest50_fast_4s1x64d": _fast(4, 1, 64),
    "resnest50_fast_1s2x40d": _fast(1, 2, 40),
    "resnest50_fast_2s2x40d": _fast(2, 2, 40),
    "resnest50_fast_4s2x40d": _fast(4, 2, 40),
    "resnest50_fast_1s4x24d": _fast(1, 4, 24),
    "resnet50d": dict(layers=(3, 4, 6, 3), stem_width=32, radix=0, deep_stem=True,
                      avg_down=True, avd=False),
    "resnet101d": dict(layers=(3, 4, 23, 3), stem_width=32, radix=0, deep_stem=True,
                       avg_down=True, avd=False),
}


class ShortcutPool(nn.AvgPool2d):
    """The shortcut's average pool; at kernel 1 and stride 1 (dilated stages) it is the
    identity and returns its input instead of copying it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel_size == 1 and self.stride == 1:
            return x
        return super().forward(x)


def stage_width_fits(variant: dict[str, Any], stage_width: int) -> bool:
    """Whether ResNeSt ``variant`` (a row of RESNEST_VARIANTS) builds with ``stage_width``:
    every stage's bottleneck width is a whole number of channels per radix split and group,
    and the attention's hidden width divides into the groups."""
    radix, groups = variant.get("radix", 0), variant.get("groups", 1)
    width = variant.get("bottleneck_width", 64)
    for stage in range(4):
        group_width = int(stage_width * 2**stage * width / 64.0) * groups
        if group_width < 1 or group_width % (groups * max(radix, 1)):
            return False
        if radix >= 1 and max(group_width * radix // 4, 32) % groups:
            return False
    return True


@contextmanager
def frozen_norm_stats(module: nn.Module) -> Iterator[None]:
    """Norm layers inside may update their running statistics; on exit they are restored.

    Activation checkpointing runs a block's forward a second time during backward; without
    this the running mean/var (and ``num_batches_tracked``) would be updated twice. The
    recomputation itself must run exactly like the original forward (same saved tensors),
    so the statistics are restored afterwards rather than switched off.
    """
    buffers = [buffer for norm in module.modules()
               if isinstance(norm, nn.modules.batchnorm._BatchNorm)
               for buffer in norm.buffers(recurse=False)]
    saved = [buffer.clone() for buffer in buffers]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in zip(buffers, saved, strict=True):
                buffer.copy_(value)


def checkpointed(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)`` keeping only ``x`` for backward; the recomputation leaves norm
    statistics untouched, so running stats end exactly as without checkpointing."""
    return checkpoint(module, x, use_reentrant=False,
                      context_fn=lambda: (nullcontext(), frozen_norm_stats(module)))


class Bottleneck(nn.Module):
    """ResNeSt bottleneck: 1x1 -> Split-Attention 3x3 (or plain 3x3 when radix=0) -> 1x1."""

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        radix: int = 2,
        cardinality: int = 1,
        bottleneck_width: int = 64,
        avd: bool = False,
        avd_first: bool = False,
        dilation: int = 1,
        is_first: bool = False,
        norm_layer: NormLayer = nn.BatchNorm2d,
        dropblock_prob: float = 0.0,
    ) -> None:
        super().__init__()
        group_width = int(planes * (bottleneck_width / 64.0)) * cardinality

        def dropblock() -> nn.Module:
            return DropBlock(dropblock_prob, 3) if dropblock_prob > 0 else nn.Identity()

        self.radix = radix
        self.conv1 = nn.Conv2d(inplanes, group_width, 1, bias=False)
        self.bn1 = norm_layer(group_width)
        self.dropblock1 = dropblock()
        use_avd = avd and (stride > 1 or is_first)
        self.avd_first = avd_first
        # The average pool takes over the stride, so the 3x3 conv runs at stride 1.
        self.avd_layer = nn.AvgPool2d(3, stride, padding=1) if use_avd else None
        conv_stride = 1 if use_avd else stride
        if radix >= 1:
            self.conv2 = SplitAttentionConv(
                group_width, group_width, 3, conv_stride, dilation, dilation,
                groups=cardinality, radix=radix, norm_layer=norm_layer,
                dropblock_prob=dropblock_prob,
            )
        else:
            self.conv2 = nn.Conv2d(group_width, group_width, 3, conv_stride, dilation,
                                   dilation, groups=cardinality, bias=False)
            self.bn2 = norm_layer(group_width)
            self.dropblock2 = dropblock()
        self.conv3 = nn.Conv2d(group_width, planes * EXPANSION, 1, bias=False)
        self.bn3 = norm_layer(planes * EXPANSION)
        self.dropblock3 = dropblock()
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.dropblock1(self.bn1(self.conv1(x))))
        if self.avd_layer is not None and self.avd_first:
            out = self.avd_layer(out)
        out = self.conv2(out)
        if self.radix == 0:
            out = self.relu(self.dropblock2(self.bn2(out)))
        if self.avd_layer is not None and not self.avd_first:
            out = self.avd_layer(out)
        out = self.dropblock3(self.bn3(self.conv3(out)))
        shortcut = x if self.downsample is None else self.downsample(x)
        # In place: nothing saved for backward reads the pre-activation output.
        return self.relu(out.add_(shortcut))


def stage_strides(output_stride: int) -> list[tuple[int, int]]:
    """(stride, dilation) of layer1..layer4 for an output stride of 8, 16 or 32."""
    table = {
        32: [(1, 1), (2, 1), (2, 1), (2, 1)],
        16: [(1, 1), (2, 1), (2, 1), (1, 2)],
        8: [(1, 1), (2, 1), (1, 2), (1, 4)],
    }
    if output_stride not in table:
        raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride}")
    return table[output_stride]


class ResNeSt(nn.Module):
    """ResNeSt / ResNet-D trunk, as a classifier or as a feature backbone.

    ``num_classes > 0`` builds the classifier (global pool, optional dropout, ``fc``) and
    ``forward`` returns logits. ``num_classes = 0`` builds a feature backbone without
    ``fc`` whose ``forward`` returns ``{"layer1": ..., ..., "layer4": ...}``. Either way
    ``forward_stages`` gives the four stage features.

    ``stage_width`` scales the planes of all stages (64 in every published model); smaller
    values give the tiny models used for CPU demos and tests.
    """

    def __init__(
        self,
        layers: tuple[int, int, int, int] = (3, 4, 6, 3),
        radix: int = 2,
        groups: int = 1,
        bottleneck_width: int = 64,
        num_classes: int = 0,
        output_stride: int = 32,
        deep_stem: bool = True,
        stem_width: int = 32,
        avg_down: bool = True,
        avd: bool = True,
        avd_first: bool = False,
        final_drop: float = 0.0,
        dropblock_prob: float = 0.0,
        last_gamma: bool = False,
        norm_layer: NormLayer = nn.BatchNorm2d,
        stage_width: int = 64,
        in_chans: int = 3,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.output_stride = output_stride
        self.inplanes = stem_width * 2 if deep_stem else 64
        if deep_stem:
            self.conv1 = nn.Sequential(
                nn.Conv2d(in_chans, stem_width, 3, 2, 1, bias=False),
                norm_layer(stem_width),
                nn.ReLU(inplace=True),
                nn.Conv2d(stem_width, stem_width, 3, 1, 1, bias=False),
                norm_layer(stem_width),
                nn.ReLU(inplace=True),
                nn.Conv2d(stem_width, stem_width * 2, 3, 1, 1, bias=False),
            )
        else:
            self.conv1 = nn.Conv2d(in_chans, 64, 7, 2, 3, bias=False)
        self.bn1 = norm_layer(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        block_args = dict(radix=radix, cardinality=groups, bottleneck_width=bottleneck_width,
                          avd=avd, avd_first=avd_first, norm_layer=norm_layer)
        for index, (stride, dilation) in enumerate(stage_strides(output_stride)):
            stage = self._make_stage(
                planes=stage_width * 2**index, blocks=layers[index], stride=stride,
                dilation=dilation, avg_down=avg_down,
                # The reference applies DropBlock to the last two stages only, and treats
                # layer1's first block as not "first" (no avd pool there).
                dropblock_prob=dropblock_prob if index >= 2 else 0.0,
                is_first=index > 0, norm_layer=norm_layer, block_args=block_args,
            )
            self.add_module(STAGE_NAMES[index], stage)
        self.grad_checkpointing = False
        self.feature_channels = [stage_width * 2**i * EXPANSION for i in range(4)]
        if num_classes > 0:
            self.drop = nn.Dropout(final_drop) if final_drop > 0 else nn.Identity()
            self.fc = nn.Linear(self.feature_channels[-1], num_classes)
        self._init_weights(last_gamma)

    def _make_stage(self, planes, blocks, stride, dilation, avg_down, dropblock_prob,
                    is_first, norm_layer, block_args) -> nn.Sequential:
        out_planes = planes * EXPANSION
        downsample = None
        if stride != 1 or self.inplanes != out_planes:
            parts: list[nn.Module] = []
            if avg_down:
                pool = stride if dilation == 1 else 1
                parts.append(ShortcutPool(pool, pool, ceil_mode=True, count_include_pad=False))
                parts.append(nn.Conv2d(self.inplanes, out_planes, 1, bias=False))
            else:
                parts.append(nn.Conv2d(self.inplanes, out_planes, 1, stride, bias=False))
            parts.append(norm_layer(out_planes))
            downsample = nn.Sequential(*parts)
        # The first block of a dilated stage uses half the dilation (reference rule).
        first_dilation = 1 if dilation <= 2 else dilation // 2
        blocks_list = [Bottleneck(self.inplanes, planes, stride, downsample,
                                  dilation=first_dilation, is_first=is_first,
                                  dropblock_prob=dropblock_prob, **block_args)]
        self.inplanes = out_planes
        blocks_list += [Bottleneck(self.inplanes, planes, dilation=dilation,
                                   dropblock_prob=dropblock_prob, **block_args)
                        for _ in range(1, blocks)]
        return nn.Sequential(*blocks_list)

    def _init_weights(self, last_gamma: bool) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels
                nn.init.normal_(module.weight, 0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(module, nn.modules.batchnorm._BatchNorm) and module.affine:
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        if last_gamma:
            # Zero-init of each block's last BN makes every residual block start as identity.
            for module in self.modules():
                if isinstance(module, Bottleneck):
                    nn.init.zeros_(module.bn3.weight)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each bottleneck in backward instead of storing its activations.

        Only blocks' inputs are kept, which trades one extra forward per block for much
        less training memory. Active only in training mode with gradients enabled; losses,
        gradients and norm running statistics are the same as without it.
        """
        self.grad_checkpointing = enable

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))

    def run_stage(self, name: str, x: torch.Tensor) -> torch.Tensor:
        stage = getattr(self, name)
        if not (self.grad_checkpointing and self.training and torch.is_grad_enabled()):
            return stage(x)
        for block in stage:
            x = checkpointed(block, x)
        return x

    def forward_stages(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.stem(x)
        features = {}
        for name in STAGE_NAMES:
            x = self.run_stage(name, x)
            features[name] = x
        return features

    def forward(self, x: torch.Tensor):
        if self.num_classes == 0:
            return self.forward_stages(x)
        x = self.stem(x)
        for name in STAGE_NAMES:
            x = self.run_stage(name, x)
        x = torch.flatten(x.mean(dim=(2, 3)), 1)
        return self.fc(self.drop(x))


def build_resnest(name: str, **overrides: Any) -> ResNeSt:
    """ResNeSt variant ``name`` (a row of :data:`RESNEST_VARIANTS`) with ``overrides``."""
    return ResNeSt(**{**RESNEST_VARIANTS[name], **overrides})


for _name in RESNEST_VARIANTS:
    register_backbone(_name, functools.partial(build_resnest, _name))
