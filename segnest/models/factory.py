"""Model factory: one name -> builder table, one ``create_model``, and the rebuilding of a
trained model from a segnest checkpoint.

Names are ``<head>_<backbone>`` or a bare backbone (:mod:`segnest.models.registry`).
Backbone names (``resnest50``, ``resnet50d``, ...) build a :class:`ResNeSt`: with the
default ``num_classes=0`` a feature backbone returning ``{"layer1".."layer4"}``, with
``num_classes > 0`` an ImageNet-style classifier. ``deeplabv3_<backbone>`` builds a
:class:`DeepLabV3` segmentation model (stride 8 by default); its own arguments are
``num_classes``, ``aux``, ``head_channels`` and ``pretrained_backbone`` (a local checkpoint
path), and every other keyword goes to the backbone (``output_stride``, ``stage_width``,
``dropblock_prob``, ``norm_layer``, ...). The detection heads (``mask_rcnn_<backbone>``,
...) take the arguments of :func:`segnest.models.detection.rcnn.build_rcnn`.
"""

from __future__ import annotations

import difflib
from typing import Any

from torch import nn

from segnest.errors import SegnestError
from segnest.models import registry
from segnest.models.deeplabv3 import build_deeplabv3  # noqa: F401  registers the head
from segnest.models.detection import rcnn  # noqa: F401  registers the detection heads
from segnest.models.weights import extract_state_dict, match_state_dict
from segnest.runtime.record import CheckpointRecord


def list_models() -> list[str]:
    """Every name ``create_model`` accepts: the backbones, then each head on each of its
    backbones (``deeplabv3_<backbone>``, ``<architecture>_<backbone>``)."""
    return registry.model_names()


def create_model(name: str, **overrides: Any) -> nn.Module:
    """Build a model by name; keyword arguments override the variant's defaults."""
    if registry.split_model_name(name) is None:
        close = difflib.get_close_matches(name, list_models(), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise SegnestError(f"unknown model '{name}'.{hint} Valid names: {', '.join(list_models())}")
    try:
        return registry.build(name, **overrides)
    except TypeError as err:
        raise SegnestError(f"create_model('{name}'): {err}") from err


TASKS = ("segmentation", "classification", "detection")
_TASK_COMMANDS = {"segmentation": "segnest train", "classification": "segnest pretrain",
                  "detection": "segnest train --model <architecture>"}


def checkpoint_task(checkpoint: dict) -> str | None:
    """The task a segnest checkpoint was trained for: its ``task`` entry, or for older
    checkpoints without one, what its ``model_name`` builds; None when neither says."""
    record = CheckpointRecord.read(checkpoint)
    if record.task in TASKS:
        return record.task
    return registry.model_task(record.model_name) if isinstance(record.model_name, str) else None


def model_from_checkpoint(checkpoint: dict, source: str = "checkpoint",
                          task: str = "segmentation") -> nn.Module:
    """Rebuild the model a segnest checkpoint was trained with and load its weights.

    segnest checkpoints carry ``model_name`` and ``model_kwargs`` so that eval, predict
    and export never ask the user to repeat the model's settings. ``task`` is what the
    caller needs: a pretraining (classification) checkpoint given where a segmentation
    model is needed is refused with the way to use it instead.
    """
    record = CheckpointRecord.read(checkpoint)
    if record.model_name is None or record.weights is None:
        hint = (f"; to use its weights as a backbone pass it to segnest train --pretrained {source}"
                if task == "segmentation" and extract_state_dict(checkpoint) else "")
        raise SegnestError(
            f"{source} is not a segnest training checkpoint (no model_name/model entries); "
            f"use a .pt file written by '{_TASK_COMMANDS.get(task, 'segnest train')}'{hint}"
        )
    _check_task(checkpoint, source, task)
    model = create_model(record.model_name, **record.model_kwargs)
    state, _ = match_state_dict(model, extract_state_dict(checkpoint), source=source)
    model.load_state_dict(state, strict=False)
    return model


def _check_task(checkpoint: dict, source: str, task: str) -> None:
    name = CheckpointRecord.read(checkpoint).model_name
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
    if task == "segmentation" and registry.model_task(str(name)) != "segmentation":
        heads = " or ".join(f"{head}_<backbone>" for head in registry.heads_of("segmentation"))
        raise SegnestError(
            f"{source} holds model '{name}', which is not a segmentation model (those are "
            f"named {heads}); eval/predict/export need a segmentation checkpoint from "
            "segnest train"
        )
    if task == "classification" and found == "segmentation":
        raise SegnestError(
            f"{source} is a segmentation checkpoint (task 'segmentation', from segnest train), "
            "not a classification one; pass a checkpoint from segnest pretrain"
        )
