"""Batch-norm folding for inference.

In eval mode a batch norm is a per-channel affine map, so a convolution followed by one is
again a convolution: ``w' = w * s`` and ``b' = (b - mean) * s + beta`` with
``s = gamma / sqrt(var + eps)``. :func:`fuse_bn` returns a copy of a model with every such
pair folded and the norm replaced by ``nn.Identity``: the same outputs (up to float
rounding) with one pass over each feature map fewer. The copy's state dict differs from the
original's; it is meant for inference only, never for training or checkpoints.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from segnest.models.resnest import Bottleneck, ResNeSt
from segnest.models.splat import SplitAttentionConv

# (convolution attribute, norm attribute) pairs applied back to back in each forward,
# possibly with a DropBlock (identity in eval) in between. ``nn.Sequential`` containers
# are handled by adjacency instead.
FOLD_PAIRS: dict[type, tuple[tuple[str, str], ...]] = {
    ResNeSt: (("conv1", "bn1"),),
    Bottleneck: (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3")),
    SplitAttentionConv: (("conv", "bn0"), ("fc1", "bn1")),
}


def fold_conv_bn(conv: nn.Conv2d, norm: _BatchNorm) -> nn.Conv2d:
    """A new convolution equal to ``norm(conv(x))`` with ``norm`` in eval mode."""
    weight = conv.weight.detach().double()
    scale = norm.running_var.double().add(norm.eps).rsqrt()
    shift = -norm.running_mean.double()
    if conv.bias is not None:
        shift = shift + conv.bias.detach().double()
    if norm.affine:
        scale = scale * norm.weight.detach().double()
    bias = shift * scale
    if norm.affine:
        bias = bias + norm.bias.detach().double()
    fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                      conv.padding, conv.dilation, conv.groups, bias=True,
                      padding_mode=conv.padding_mode, device=conv.weight.device,
                      dtype=conv.weight.dtype)
    with torch.no_grad():
        fused.weight.copy_(weight * scale.view(-1, 1, 1, 1))
        fused.bias.copy_(bias)
    return fused


def _foldable(conv: nn.Module, norm: nn.Module) -> bool:
    return (isinstance(conv, nn.Conv2d) and isinstance(norm, _BatchNorm)
            and norm.track_running_stats and norm.running_mean is not None
            and conv.out_channels == norm.num_features)


def _fold_sequential(seq: nn.Sequential) -> None:
    names = list(seq._modules)
    for first, second in zip(names, names[1:], strict=False):
        conv, norm = seq._modules[first], seq._modules[second]
        if _foldable(conv, norm):
            seq._modules[first] = fold_conv_bn(conv, norm)
            seq._modules[second] = nn.Identity()


def _fold_attributes(module: nn.Module, pairs: tuple[tuple[str, str], ...]) -> None:
    for conv_name, norm_name in pairs:
        conv, norm = getattr(module, conv_name, None), getattr(module, norm_name, None)
        # A deep stem is a Sequential whose last convolution feeds the trunk's bn1.
        if isinstance(conv, nn.Sequential) and len(conv) and _foldable(conv[-1], norm):
            conv[-1] = fold_conv_bn(conv[-1], norm)
            setattr(module, norm_name, nn.Identity())
        elif _foldable(conv, norm):
            setattr(module, conv_name, fold_conv_bn(conv, norm))
            setattr(module, norm_name, nn.Identity())


def fuse_bn(model: nn.Module) -> nn.Module:
    """An eval-mode copy of ``model`` with every convolution -> batch norm pair folded.

    Covers the stem, the bottlenecks (conv1/bn1, conv3/bn3, plain conv2/bn2), the
    shortcut convolution, Split-Attention (conv/bn0, fc1/bn1) and the DeepLabV3 / FCN
    heads. ``model`` itself is left untouched. Norms that track no running statistics
    (and other norm types) stay as they are.
    """
    fused = copy.deepcopy(model).eval()
    # Children before parents, over a snapshot: replaced modules are never revisited.
    for module in list(fused.modules())[::-1]:
        pairs = next((p for cls, p in FOLD_PAIRS.items() if isinstance(module, cls)), None)
        if pairs is not None:
            _fold_attributes(module, pairs)
        if isinstance(module, nn.Sequential):
            _fold_sequential(module)
    return fused
