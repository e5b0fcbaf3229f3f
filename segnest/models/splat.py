"""Split-Attention convolution (ResNeSt paper, Eq. 1-3), radix-major layout.

One grouped convolution with ``groups = cardinality * radix`` produces ``radix`` splits of
``channels`` each, stored radix-major: split ``r`` is channels ``[r*C, (r+1)*C)``. The
attention branch (global pooling -> fc1 -> BN -> ReLU -> fc2) is grouped by cardinality, so
fc2 emits its logits cardinality-major; the r-softmax normalises over the radix within each
cardinal group and the weights are laid out radix-major again to scale the splits.

Parameter names (``conv``, ``bn0``, ``fc1``, ``bn1``, ``fc2``) are those of the official
``SplAtConv2d`` so that official checkpoints load with strict key matching.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torchvision.ops import DropBlock2d, drop_block2d

NormLayer = Callable[[int], nn.Module]


class DropBlock(DropBlock2d):
    """torchvision's ``DropBlock2d`` that also runs on feature maps smaller than its block
    (a small input at output stride 32 gives 2x2 maps): the block shrinks to the largest
    odd size that fits. Identical to ``DropBlock2d`` whenever the block fits."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = min(self.block_size, x.shape[-2], x.shape[-1])
        size -= 1 - size % 2  # drop_block2d wants an odd size
        return drop_block2d(x, self.p, size, self.inplace, self.eps, self.training)


def split_attention_weights(logits: torch.Tensor, radix: int, cardinality: int) -> torch.Tensor:
    """r-softmax: turn fc2's cardinality-major logits (B, card*radix*k, 1, 1) into radix-major
    attention weights of shape (B, radix, card*k, 1, 1) (sigmoid when radix is 1)."""
    batch = logits.shape[0]
    if radix == 1:
        return torch.sigmoid(logits).view(batch, 1, -1, 1, 1)
    weights = logits.view(batch, cardinality, radix, -1).softmax(dim=2)
    return weights.transpose(1, 2).reshape(batch, radix, -1, 1, 1)


class SplitAttentionConv(nn.Module):
    """A k x k convolution whose ``radix`` splits are fused by channel-wise attention."""

    def __init__(
        self,
        in_channels: int,
        channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        padding: int = 1,
        dilation: int = 1,
        groups: int = 1,
        radix: int = 2,
        reduction_factor: int = 4,
        norm_layer: NormLayer = nn.BatchNorm2d,
        dropblock_prob: float = 0.0,
    ) -> None:
        super().__init__()
        if radix < 1:
            raise ValueError(f"radix must be >= 1, got {radix}")
        self.radix = radix
        self.cardinality = groups
        self.channels = channels
        inter_channels = max(in_channels * radix // reduction_factor, 32)
        self.conv = nn.Conv2d(
            in_channels, channels * radix, kernel_size, stride, padding, dilation,
            groups=groups * radix, bias=False,
        )
        self.bn0 = norm_layer(channels * radix)
        self.dropblock = DropBlock(dropblock_prob, 3) if dropblock_prob > 0 else nn.Identity()
        self.relu = nn.ReLU(inplace=True)
        self.fc1 = nn.Conv2d(channels, inter_channels, 1, groups=groups)
        self.bn1 = norm_layer(inter_channels)
        self.fc2 = nn.Conv2d(inter_channels, channels * radix, 1, groups=groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.dropblock(self.bn0(self.conv(x))))
        batch = x.shape[0]
        # Pooling before summing the radix splits is the same linear map as summing first,
        # but reads x once and never materialises the (B, C, H, W) sum.
        gap = x.mean(dim=(2, 3), keepdim=True)
        if self.radix > 1:
            gap = gap.view(batch, self.radix, self.channels, 1, 1).sum(dim=1)
        attention = self.fc2(self.relu(self.bn1(self.fc1(gap))))
        weights = split_attention_weights(attention, self.radix, self.cardinality)
        if self.radix == 1:
            return x * weights.view(batch, self.channels, 1, 1)
        # A view, not a split: the radix splits are contiguous blocks of channels. The
        # weighted sum accumulates split by split instead of reducing a (B, R, C, H, W)
        # product, which would be R times the size of the output.
        splits = x.view(batch, self.radix, self.channels, *x.shape[2:])
        out = splits[:, 0] * weights[:, 0]
        for r in range(1, self.radix):
            out.addcmul_(splits[:, r], weights[:, r])
        return out
