"""The detection backbone: a stride-32 trunk (ResNeSt, or torchvision's ResNet-50 as the
baseline) under a feature pyramid.

Keys follow torchvision's detection models (``body.*``, ``fpn.*``), and ``body`` is the
classification trunk itself with its own key layout, so the official ResNeSt ImageNet
weights and segnest's pretraining exports load into it key for key (``fc`` skipped).

Freezing follows detectron2's ``FREEZE_AT``, which the authors' configs leave at 2: the
stem and the first ``frozen_stages`` stages get no gradients, and their BatchNorms become
:class:`~torchvision.ops.misc.FrozenBatchNorm2d` (fixed statistics and affine). The other
stages keep trainable BatchNorm (``backbone_norm="bn"``, the authors' SyncBN recipe) or
become frozen too (``backbone_norm="frozen"``, torchvision's choice for a pretrained trunk).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn
from torchvision.models import resnet50
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
from torchvision.ops.misc import FrozenBatchNorm2d

from segnest.models.resnest import RESNEST_VARIANTS, STAGE_NAMES, ResNeSt

# torchvision's plain ResNet-50, the paper's detection baseline (Tables 5 and 6).
TORCHVISION_RESNET50 = "resnet50"
DETECTION_BACKBONES = (*RESNEST_VARIANTS, TORCHVISION_RESNET50)
BACKBONE_NORMS = ("bn", "frozen")
FPN_CHANNELS = 256
# Names of the pyramid levels the RoI poolers read (P2-P5); "pool" (P6) feeds the RPN only.
ROI_LEVELS = ("0", "1", "2", "3")
_STEM = ("conv1", "bn1")


def build_trunk(name: str, **overrides) -> nn.Module:
    """The stride-32 classification trunk ``name`` without its classifier."""
    if name == TORCHVISION_RESNET50:
        if overrides:
            raise TypeError(f"backbone '{name}' takes no settings, got {sorted(overrides)}")
        trunk = resnet50(weights=None)
        # The pooled classifier is not part of a detection backbone (as in torchvision's
        # IntermediateLayerGetter); dropping it keeps the state dict free of unused keys.
        trunk.avgpool = nn.Identity()
        trunk.fc = nn.Identity()
        return trunk
    return ResNeSt(**{**RESNEST_VARIANTS[name], "num_classes": 0, "output_stride": 32,
                      **overrides})


def trunk_channels(trunk: nn.Module) -> list[int]:
    """Output channels of layer1..layer4."""
    if isinstance(trunk, ResNeSt):
        return list(trunk.feature_channels)
    return [getattr(trunk, name)[-1].conv3.out_channels for name in STAGE_NAMES]


def freeze_batchnorm(module: nn.Module) -> nn.Module:
    """``module`` with every BatchNorm replaced by a FrozenBatchNorm2d holding its current
    statistics and affine parameters (in place for children; returns the result)."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        frozen = FrozenBatchNorm2d(module.num_features, eps=module.eps)
        with torch.no_grad():
            if module.affine:
                frozen.weight.copy_(module.weight)
                frozen.bias.copy_(module.bias)
            frozen.running_mean.copy_(module.running_mean)
            frozen.running_var.copy_(module.running_var)
        return frozen
    for name, child in module.named_children():
        replaced = freeze_batchnorm(child)
        if replaced is not child:
            setattr(module, name, replaced)
    return module


def freeze_trunk(trunk: nn.Module, frozen_stages: int, backbone_norm: str) -> None:
    """Freeze the stem and the first ``frozen_stages`` stages (no gradients, frozen BN);
    with ``backbone_norm="frozen"`` the remaining stages' BatchNorms are frozen too."""
    if not 0 <= frozen_stages <= 4:
        raise ValueError(f"frozen_stages must be 0-4, got {frozen_stages}")
    if backbone_norm not in BACKBONE_NORMS:
        raise ValueError(f"backbone_norm must be one of {BACKBONE_NORMS}, got '{backbone_norm}'")
    frozen_parts = [*_STEM, *STAGE_NAMES[:frozen_stages]] if frozen_stages > 0 else []
    for name in frozen_parts:
        part = getattr(trunk, name)
        for parameter in part.parameters():
            parameter.requires_grad_(False)
        setattr(trunk, name, freeze_batchnorm(part))
    if backbone_norm == "frozen":
        freeze_batchnorm(trunk)


class FPNBackbone(nn.Module):
    """A trunk's layer1..layer4 through an FPN with a max-pooled P6: returns
    ``{"0": P2, "1": P3, "2": P4, "3": P5, "pool": P6}`` with ``out_channels`` each,
    the interface torchvision's ``GeneralizedRCNN`` expects."""

    def __init__(self, body: nn.Module, out_channels: int = FPN_CHANNELS,
                 fpn_norm: bool = True) -> None:
        super().__init__()
        self.body = body
        self.fpn = FeaturePyramidNetwork(
            trunk_channels(body), out_channels, extra_blocks=LastLevelMaxPool(),
            norm_layer=nn.BatchNorm2d if fpn_norm else None,
        )
        self.out_channels = out_channels

    def stage_features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """layer1..layer4 of the trunk (ResNeSt's own path keeps gradient checkpointing)."""
        if isinstance(self.body, ResNeSt):
            return self.body.forward_stages(x)
        body = self.body
        x = body.maxpool(body.relu(body.bn1(body.conv1(x))))
        features = {}
        for name in STAGE_NAMES:
            x = getattr(body, name)(x)
            features[name] = x
        return features

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        stages = self.stage_features(x)
        return self.fpn(OrderedDict((str(i), stages[name]) for i, name in enumerate(STAGE_NAMES)))
