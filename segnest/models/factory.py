"""Model factory: one name -> builder table, one ``create_model``, and the rebuilding of a
trained model from a segnest checkpoint.

Backbone names (``resnest50``, ``resnet50d``, ...) build a :class:`ResNeSt`: with the
default ``num_classes=0`` a feature backbone returning ``{"layer1".."layer4"}``, with
``num_classes > 0`` an ImageNet-style classifier. ``deeplabv3_<backbone>`` builds a
:class:`DeepLabV3` segmentation model (stride 8 by default); its own arguments are
``num_classes``, ``aux``, ``head_channels`` and ``pretrained_backbone`` (a local checkpoint
path), and every other keyword goes to the backbone (``output_stride``, ``stage_width``,
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
from segnest.models.detection.backbone import DETECTION_BACKBONES
from segnest.models.detection.rcnn import ARCHITECTURES, build_rcnn
from segnest.models.resnest import RESNEST_VARIANTS, ResNeSt
from segnest.models.weights import extract_state_dict, load_pretrained, match_state_dict

SEGMENTATION_PREFIX = "deeplabv3_"


def build_backbone(name: str, **overrides: Any) -> ResNeSt:
    return ResNeSt(**{**RESNEST_VARIANTS[name], **overrides})


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
    backbone = build_backbone(
        backbone_name,
        num_classes=0,
        output_stride=output_stride,
        norm_layer=norm_layer,
        **backbone_overrides,
    )
    if pretrained_backbone is not None:
        load_pretrained(backbone, pretrained_backbone)
    return DeepLabV3(
        backbone, num_classes, aux=aux, head_channels=head_channels, norm_layer=norm_layer
    )


def detection_parts(name: str) -> tuple[str, str] | None:
    """``(architecture, backbone)`` of a detection model name such as
    ``mask_rcnn_resnest50``; None for other names."""
    for architecture in ARCHITECTURES:
        backbone = name.removeprefix(architecture + "_")
        if backbone != name and backbone in DETECTION_BACKBONES:
            return architecture, backbone
    return None


def list_models() -> list[str]:
    """Every name ``create_model`` accepts: the backbones, the segmentation models, then
    the detection models (``<architecture>_<backbone>``)."""
    backbones = list(RESNEST_VARIANTS)
    return (backbones + [SEGMENTATION_PREFIX + b for b in backbones]
            + [f"{a}_{b}" for a in ARCHITECTURES for b in DETECTION_BACKBONES])


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
    elif (parts := detection_parts(name)) is not None:
        builder, args = build_rcnn, parts
    else:
        close = difflib.get_close_matches(name, list_models(), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise SegnestError(f"unknown model '{name}'.{hint} Valid names: {', '.join(list_models())}")
    try:
        return builder(*args, **overrides)
    except TypeError as err:
        raise SegnestError(f"create_model('{name}'): {err}") from err


# Keyword arguments renamed since they were first written into checkpoints.
_RENAMED_KWARGS = {"base_width": "stage_width"}


def canonical_model_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """``model_kwargs`` as stored in a checkpoint, with renamed arguments under their
    current names."""
    return {_RENAMED_KWARGS.get(k, k): v for k, v in kwargs.items()}


TASKS = ("segmentation", "classification", "detection")
_TASK_COMMANDS = {"segmentation": "segnest train", "classification": "segnest pretrain",
                  "detection": "segnest train --model <architecture>"}


def checkpoint_task(checkpoint: dict) -> str | None:
    """The task a segnest checkpoint was trained for: its ``task`` entry, or for older
    checkpoints without one, what its ``model_name`` builds; None when neither says."""
    task = checkpoint.get("task")
    if task in TASKS:
        return task
    name = checkpoint.get("model_name")
    if not isinstance(name, str):
        return None
    if name.startswith(SEGMENTATION_PREFIX) and name[len(SEGMENTATION_PREFIX):] in RESNEST_VARIANTS:
        return "segmentation"
    if detection_parts(name) is not None:
        return "detection"
    return "classification" if name in RESNEST_VARIANTS else None


def model_from_checkpoint(checkpoint: dict, source: str = "checkpoint",
                          task: str = "segmentation") -> nn.Module:
    """Rebuild the model a segnest checkpoint was trained with and load its weights.

    segnest checkpoints carry ``model_name`` and ``model_kwargs`` so that eval, predict
    and export never ask the user to repeat the model's settings. ``task`` is what the
    caller needs: a pretraining (classification) checkpoint given where a segmentation
    model is needed is refused with the way to use it instead.
    """
    if "model_name" not in checkpoint or "model" not in checkpoint:
        hint = (f"; to use its weights as a backbone pass it to segnest train --pretrained {source}"
                if task == "segmentation" and extract_state_dict(checkpoint) else "")
        raise SegnestError(
            f"{source} is not a segnest training checkpoint (no model_name/model entries); "
            f"use a .pt file written by '{_TASK_COMMANDS.get(task, 'segnest train')}'{hint}"
        )
    _check_task(checkpoint, source, task)
    kwargs = canonical_model_kwargs(checkpoint.get("model_kwargs", {}))
    model = create_model(checkpoint["model_name"], **kwargs)
    state, _ = match_state_dict(model, extract_state_dict(checkpoint), source=source)
    model.load_state_dict(state, strict=False)
    return model


def _check_task(checkpoint: dict, source: str, task: str) -> None:
    name = checkpoint["model_name"]
    found = checkpoint_task(checkpoint)
    if task == "segmentation" and found == "classification":
        raise SegnestError(
            f"{source} is a classification pretraining checkpoint (task 'classification', "
            "from segnest pretrain); export and quantize need a segmentation checkpoint from "
            "segnest train (eval and predict take this one); to use it as a backbone pass it "
            f"to segnest train --pretrained {source}"
        )
    if task == "segmentation" and found == "detection":
        raise SegnestError(
            f"{source} is a detection checkpoint ({name}); this command handles segmentation "
            "checkpoints only")
    if task == "detection" and found != "detection":
        raise SegnestError(
            f"{source} holds model '{name}', not a detection model (<architecture>_<backbone>,"
            " e.g. mask_rcnn_resnest50); pass a checkpoint from segnest train --model mask_rcnn")
    if task == "segmentation" and not str(name).startswith(SEGMENTATION_PREFIX):
        raise SegnestError(
            f"{source} holds model '{name}', which is not a segmentation model (those are "
            f"named {SEGMENTATION_PREFIX}<backbone>); eval/predict/export need a segmentation "
            "checkpoint from segnest train"
        )
    if task == "classification" and found == "segmentation":
        raise SegnestError(
            f"{source} is a segmentation checkpoint (task 'segmentation', from segnest train), "
            "not a classification one; pass a checkpoint from segnest pretrain"
        )
