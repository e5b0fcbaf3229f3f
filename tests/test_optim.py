import torch
from torch import nn

from segnest.engine.optim import build_param_groups
from segnest.models import create_model


def test_no_decay_selects_norm_and_bias_by_module_type():
    model = create_model(
        "deeplabv3_resnest14",
        num_classes=3,
        stage_width=8,
        stem_width=8,
        head_channels=16,
        norm_layer=lambda c: nn.GroupNorm(4, c),
    )
    groups = build_param_groups(model, lr=0.1, weight_decay=1e-4, no_decay_norm=True)
    no_decay = {id(p) for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            expected = isinstance(module, nn.GroupNorm) or name == "bias"
            assert (id(p) in no_decay) == expected, (type(module).__name__, name)


def test_head_gets_lr_multiplier_and_every_parameter_appears_once():
    model = create_model(
        "deeplabv3_resnest14", num_classes=3, stage_width=8, stem_width=8, head_channels=16
    )
    groups = build_param_groups(
        model, lr=0.01, weight_decay=1e-4, lr_mults={"head": 10.0, "aux_head": 10.0}
    )
    seen = [id(p) for g in groups for p in g["params"]]
    assert len(seen) == len(set(seen)) == len(list(model.parameters()))
    head_ids = {id(p) for p in model.head.parameters()} | {
        id(p) for p in model.aux_head.parameters()
    }
    for group in groups:
        ids = {id(p) for p in group["params"]}
        assert (ids <= head_ids) == (group["lr"] == 0.1)
        assert torch.isclose(torch.tensor(group["lr"]), torch.tensor(0.01 * group["lr_mult"]))
