"""SGD parameter groups: per-module lr multipliers and no weight decay on norm and bias.

Norm parameters are chosen by module type (any ``_BatchNorm``, ``GroupNorm``,
``LayerNorm``...), never by parameter name, so a renamed or custom layer cannot slip
through; biases are every parameter named ``bias``.
"""

from __future__ import annotations

import torch
from torch import nn

NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm,
              nn.modules.instancenorm._InstanceNorm)


def no_decay_parameters(model: nn.Module) -> set[int]:
    """ids of the parameters that should get no weight decay: norm weights/biases, biases."""
    ids: set[int] = set()
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if isinstance(module, NORM_TYPES) or name == "bias":
                ids.add(id(param))
    return ids


def build_param_groups(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    no_decay_norm: bool = False,
    lr_mults: dict[str, float] | None = None,
) -> list[dict]:
    """Param groups for SGD. ``lr_mults`` maps a submodule name (``"head"``) to a multiplier
    of the base lr; each group records ``lr_mult`` so schedules keep the ratio."""
    lr_mults = lr_mults or {}
    skip_decay = no_decay_parameters(model) if no_decay_norm else set()
    owner: dict[int, float] = {}
    modules = dict(model.named_modules())
    for name, mult in lr_mults.items():
        if name not in modules:
            raise ValueError(f"lr_mults names {name!r}, which is not a submodule of the model")
        for param in modules[name].parameters():
            owner[id(param)] = mult
    buckets: dict[tuple[float, bool], list[torch.nn.Parameter]] = {}
    for param in model.parameters():
        if not param.requires_grad:
            continue
        key = (owner.get(id(param), 1.0), id(param) in skip_decay)
        buckets.setdefault(key, []).append(param)
    return [
        {"params": params, "lr": lr * mult, "lr_mult": mult,
         "weight_decay": 0.0 if no_decay else weight_decay}
        for (mult, no_decay), params in sorted(buckets.items())
    ]
