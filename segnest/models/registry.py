"""The model registry: a model is a head on a backbone, by data.

A *backbone* is a named trunk (a row of ResNeSt's variant table, torchvision's ResNet-50);
built alone it is an ImageNet-style classifier. A *head* is a named architecture that takes
a backbone by name and builds the whole model for one task: ``deeplabv3`` (segmentation),
``faster_rcnn``, ``mask_rcnn``, ``cascade_rcnn``, ``cascade_mask_rcnn`` (detection). The
model ``<head>_<backbone>`` (``deeplabv3_resnest50``, ``mask_rcnn_resnest50``) is that head's
builder called with that backbone's name; a head lists the backbones it takes.

Each module registers what it defines where it defines it (:func:`register_backbone`,
:func:`register_head`); :mod:`segnest.models.factory` imports them all and builds by name.
Adding a head is its module, registered, plus its import in ``factory.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from torch import nn

CLASSIFICATION = "classification"


@dataclass(frozen=True)
class Backbone:
    """A named trunk: ``build(**overrides)`` makes it (a classifier by default)."""

    name: str
    build: Callable[..., nn.Module]


@dataclass(frozen=True)
class Head:
    """A named architecture of ``task`` over a backbone: ``build(backbone_name, **kwargs)``
    makes the whole model; ``backbones``: the backbone names it takes."""

    name: str
    task: str
    build: Callable[..., nn.Module]
    backbones: tuple[str, ...]


BACKBONES: dict[str, Backbone] = {}
HEADS: dict[str, Head] = {}


def register_backbone(name: str, build: Callable[..., nn.Module]) -> None:
    if name in BACKBONES or name in HEADS:
        raise ValueError(f"model name {name!r} is registered twice")
    BACKBONES[name] = Backbone(name, build)


def register_head(name: str, task: str, backbones: Iterable[str]
                  ) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator: register ``build(backbone_name, **kwargs)`` as head ``name`` of ``task``,
    over ``backbones``."""

    def register(build: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in HEADS or name in BACKBONES:
            raise ValueError(f"model name {name!r} is registered twice")
        HEADS[name] = Head(name, task, build, tuple(backbones))
        return build

    return register


def model_name(head: str, backbone: str) -> str:
    """The name of ``head`` on ``backbone``: ``deeplabv3_resnest50``."""
    return f"{head}_{backbone}"


def split_model_name(name: str) -> tuple[Head | None, str] | None:
    """``(head, backbone)`` of a registered model name (head None for a bare backbone);
    None for a name that is neither."""
    if name in BACKBONES:
        return None, name
    for head in HEADS.values():
        backbone = name.removeprefix(head.name + "_")
        if backbone != name and backbone in head.backbones:
            return head, backbone
    return None


def model_names() -> list[str]:
    """Every registered model: the backbones, then each head on each of its backbones in
    registration order."""
    return [*BACKBONES, *(model_name(head.name, backbone) for head in HEADS.values()
                          for backbone in head.backbones)]


def heads_of(task: str) -> list[str]:
    """The names of the heads of ``task``."""
    return [head.name for head in HEADS.values() if head.task == task]


def model_task(name: str) -> str | None:
    """The task model ``name`` is built for (a bare backbone: classification); None for an
    unknown name."""
    parts = split_model_name(name)
    if parts is None:
        return None
    head, _ = parts
    return CLASSIFICATION if head is None else head.task


def build(name: str, **overrides: Any) -> nn.Module | None:
    """Model ``name`` built with ``overrides``; None when no such model is registered."""
    parts = split_model_name(name)
    if parts is None:
        return None
    head, backbone = parts
    if head is None:
        return BACKBONES[backbone].build(**overrides)
    return head.build(backbone, **overrides)
