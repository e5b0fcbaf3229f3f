"""Loading weights from local checkpoints into segnest models.

``load_pretrained`` accepts, for the same architecture: an official ResNeSt state dict
(``resnest50-528c19ca.pth``), a timm one (``resnest50d``/``resnest101e``/``resnet50d``
share the key layout), a DDP state dict with ``module.`` prefixes, and segnest's own
checkpoints (training, pretraining or ``--export``). It finds where the weights belong:
a backbone state dict loads into ``model.backbone`` of a segmentation model, and the
backbone part of a segmentation checkpoint loads into a bare backbone. Classifier keys
(``fc.*``) are skipped when the target has no classifier. Everything else must match
exactly; mismatches are reported in one message.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from os import PathLike

import torch
from torch import nn

from segnest.errors import SegnestError
from segnest.runtime.checkpoint import load_checkpoint

OPTIONAL_SUFFIXES = ("num_batches_tracked",)


@dataclass
class LoadReport:
    loaded: int
    skipped: list[str] = field(default_factory=list)
    prefix: str = ""


def extract_state_dict(obj: dict) -> dict[str, torch.Tensor]:
    """The tensor dict inside a checkpoint, with DDP ``module.`` prefixes removed."""
    for key in ("model", "state_dict", "model_state"):
        if isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    state = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _rebase(state: dict[str, torch.Tensor], target_keys: set[str]) -> tuple[dict, str]:
    """Re-prefix the source keys so that they overlap the target's the most."""
    candidates = {"": state}
    if any(k.startswith("backbone.") for k in state):
        candidates["strip backbone."] = {k[len("backbone."):]: v for k, v in state.items()
                                    if k.startswith("backbone.")}
    candidates["backbone."] = {"backbone." + k: v for k, v in state.items()}
    best = max(candidates, key=lambda c: len(target_keys & candidates[c].keys()))
    return candidates[best], best


def _preview(keys: list[str], limit: int = 5) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def match_state_dict(model: nn.Module, state: dict[str, torch.Tensor],
                     source: str = "checkpoint") -> tuple[dict, LoadReport]:
    """Map ``state`` onto ``model``'s keys; raise one SegnestError listing every mismatch."""
    target = model.state_dict()
    state, prefix = _rebase(state, set(target))
    skipped = sorted(k for k in state if k not in target
                     and k.startswith(("fc.", "backbone.fc.")))
    state = {k: v for k, v in state.items() if k not in skipped}
    unexpected = sorted(k for k in state if k not in target)
    missing = sorted(k for k in target if k not in state and not k.endswith(OPTIONAL_SUFFIXES))
    # A segmentation model takes a backbone checkpoint: its heads are expected to be new.
    if prefix == "backbone.":
        missing = [k for k in missing if k.startswith("backbone.")]
    mismatched = [f"{k} {tuple(state[k].shape)} vs {tuple(target[k].shape)}"
                  for k in sorted(state) if k in target and state[k].shape != target[k].shape]
    problems = []
    if missing:
        problems.append(f"missing keys: {_preview(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_preview(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatches (checkpoint vs model): {_preview(mismatched)}")
    if problems:
        raise SegnestError(
            f"{source} does not fit {type(model).__name__}: " + "; ".join(problems)
            + ". Check that the checkpoint was made for the same model name and settings."
        )
    return state, LoadReport(loaded=len(state), skipped=skipped, prefix=prefix)


def load_pretrained(model: nn.Module, path: str | PathLike) -> LoadReport:
    """Load a local checkpoint into ``model`` (see the module docstring for what fits)."""
    state = extract_state_dict(load_checkpoint(path))
    if not state:
        raise SegnestError(f"{path} holds no tensors: it is not a model checkpoint")
    state, report = match_state_dict(model, state, source=str(path))
    model.load_state_dict(state, strict=False)
    return report
