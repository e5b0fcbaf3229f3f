"""Model factory: one name -> builder table, one ``create_model``.

Backbone names (``resnest50``, ``resnet50d``, ...) build a :class:`ResNeSt`: with the
default ``num_classes=0`` a feature backbone returning ``{"layer1".."layer4"}``, with
``num_classes > 0`` an ImageNet-style classifier. ``deeplabv3_<backbone>`` builds a
:class:`DeepLabV3` segmentation model (stride 8 by default); its own arguments are
``num_classes``, ``aux``, ``head_channels`` and ``pretrained_backbone`` (a local checkpoint
path), and every other keyword goes to the backbone (``output_stride``, ``base_width``,
``dropblock_prob``, ``norm_layer``, ...).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from os import PathLike
from typing import Any

from torch import nn

from segnest.errors import SegnestError
from segnest.models.deeplabv3 import DeepLabV3
from segnest.models.resnest import RESNEST_VARIANTS, ResNeSt

SEGMENTATION_PREFIX = "deeplabv3_"


def build_backbone(name: str, **overrides: Any) -> ResNeSt:
    return ResNeSt(**{**RESNEST_VARIANTS[name], **overrides})


def build_deeplabv3(
    backbone_name: str,
    num_classes: int = 150,
    aux: bool = True,
    head_channels: int = 256,
    output_stride: int = 8,
    pretrained_backbone: str | PathLike | None = None,
    norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d,
    **backbone_overrides: Any,
) -> DeepLabV3:
    backbone = build_backbone(
        backbone_name,
        num_classes=0,
        output_stride=output_stride,
        norm_layer=norm_layer,
        **backbone_overrides,
    )
    if pretrained_backbone is not None:
        from segnest.models.weights import load_pretrained

        load_pretrained(backbone, pretrained_backbone)
    return DeepLabV3(
        backbone, num_classes, aux=aux, head_channels=head_channels, norm_layer=norm_layer
    )


def list_models() -> list[str]:
    """Every name ``create_model`` accepts: the backbones, then the segmentation models."""
    backbones = list(RESNEST_VARIANTS)
    return backbones + [SEGMENTATION_PREFIX + b for b in backbones]


def create_model(name: str, **overrides: Any) -> nn.Module:
    """Build a model by name; keyword arguments override the variant's defaults."""
    if name in RESNEST_VARIANTS:
        builder: Callable[..., nn.Module] = build_backbone
        args: tuple = (name,)
    elif (
        name.startswith(SEGMENTATION_PREFIX)
        and name[len(SEGMENTATION_PREFIX) :] in RESNEST_VARIANTS
    ):
        builder, args = build_deeplabv3, (name[len(SEGMENTATION_PREFIX) :],)
    else:
        close = difflib.get_close_matches(name, list_models(), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise SegnestError(f"unknown model '{name}'.{hint} Valid names: {', '.join(list_models())}")
    try:
        return builder(*args, **overrides)
    except TypeError as err:
        raise SegnestError(f"create_model('{name}'): {err}") from err


__all__ = ["DeepLabV3", "ResNeSt", "RESNEST_VARIANTS", "create_model", "list_models"]
