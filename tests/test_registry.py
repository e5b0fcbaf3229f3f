"""A model is a head on a backbone, by data: the registry alone says which names exist, what
they build and for which task; a head registered in one place is usable everywhere."""

import pytest
import torch
from torch import nn

from segnest.errors import SegnestError
from segnest.models import create_model, list_models, model_from_checkpoint, registry
from segnest.models.deeplabv3 import DeepLabV3
from segnest.models.factory import checkpoint_task
from segnest.models.resnest import RESNEST_VARIANTS


def test_names_split_into_head_and_backbone_by_the_registered_data():
    head, backbone = registry.split_model_name("deeplabv3_resnest50")
    assert (head.name, head.task, backbone) == ("deeplabv3", "segmentation", "resnest50")
    head, backbone = registry.split_model_name("cascade_mask_rcnn_resnest50")
    assert (head.name, head.task, backbone) == ("cascade_mask_rcnn", "detection", "resnest50")
    assert registry.split_model_name("resnest14") == (None, "resnest14")
    for unknown in ("deeplabv3_resnest999", "deeplabv3", "fpn_resnest50", "resnest"):
        assert registry.split_model_name(unknown) is None


def test_the_detection_families_are_heads_of_the_detection_task():
    assert registry.heads_of("detection") == ["faster_rcnn", "mask_rcnn", "cascade_rcnn",
                                              "cascade_mask_rcnn"]
    assert registry.heads_of("segmentation") == ["deeplabv3"]
    assert {registry.model_task(n) for n in ("mask_rcnn_resnest50", "faster_rcnn_resnet50")} \
        == {"detection"}


def test_every_head_lists_each_of_its_backbones_and_the_backbones_stand_alone():
    names = list_models()
    assert names[:len(RESNEST_VARIANTS)] == list(RESNEST_VARIANTS)
    for head in registry.HEADS.values():
        assert {registry.model_name(head.name, b) for b in head.backbones} <= set(names)
    assert len(names) == len(set(names))


class TinyHead(nn.Module):
    def __init__(self, backbone_name: str, num_classes: int, width: int = 4) -> None:
        super().__init__()
        self.backbone_name = backbone_name
        self.conv = nn.Conv2d(3, num_classes, 1)
        self.width = width

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"out": self.conv(x)}


def test_a_head_registered_in_one_place_is_built_listed_and_reloaded_by_name(monkeypatch):
    monkeypatch.setattr(registry, "HEADS", dict(registry.HEADS))
    registry.register_head("tinyseg", task="segmentation", backbones=["resnest14"])(TinyHead)

    assert "tinyseg_resnest14" in list_models()
    model = create_model("tinyseg_resnest14", num_classes=3, width=2)
    assert isinstance(model, TinyHead) and model.backbone_name == "resnest14"
    checkpoint = {"model_name": "tinyseg_resnest14", "model_kwargs": {"num_classes": 3},
                  "model": model.state_dict()}
    assert checkpoint_task(checkpoint) == "segmentation"
    rebuilt = model_from_checkpoint(checkpoint)
    assert torch.equal(rebuilt.conv.weight, model.conv.weight)
    assert "tinyseg_<backbone>" in _segmentation_refusal()


def _segmentation_refusal() -> str:
    """The message that names the segmentation models, for a checkpoint of a model no
    head knows given where a segmentation model is needed."""
    with pytest.raises(SegnestError) as error:
        model_from_checkpoint({"model_name": "unet_resnest14", "model": {}},
                              task="segmentation")
    return str(error.value)


def test_a_name_registered_twice_is_refused(monkeypatch):
    monkeypatch.setattr(registry, "HEADS", dict(registry.HEADS))
    with pytest.raises(ValueError, match="registered twice"):
        registry.register_head("deeplabv3", task="segmentation", backbones=["resnest14"])(
            TinyHead)
    with pytest.raises(ValueError, match="registered twice"):
        registry.register_backbone("resnest14", TinyHead)


def test_existing_names_build_what_they_built():
    model = create_model("deeplabv3_resnest14", num_classes=3, stage_width=8, stem_width=8,
                         head_channels=8)
    assert isinstance(model, DeepLabV3)
    assert model.eval()(torch.zeros(1, 3, 32, 32))["out"].shape == (1, 3, 32, 32)
    with pytest.raises(SegnestError, match="Did you mean 'deeplabv3_resnest14'"):
        create_model("deeplabv3_resnest41")
