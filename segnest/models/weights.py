"""Loading weights from local checkpoints into segnest models.

``load_pretrained`` accepts, for the same architecture: an official ResNeSt state dict
(``resnest50-528c19ca.pth``), a timm one (``resnest50d``/``resnest101e``/``resnet50d``
share the key layout), a DDP state dict with ``module.`` prefixes, and segnest's own
checkpoints (training, pretraining or ``--export``). It finds where the weights belong:
a backbone state dict loads into ``model.backbone`` of a segmentation model, and the
backbone part of a segmentation checkpoint loads into a bare backbone. Classifier keys
(``fc.*``) are skipped when the target has no classifier. Everything else must match
exactly; mismatches are reported in one message.

A file named like the official downloads, ``<name>-<hex>.pth``, carries the start of its
own sha256 (the torch.hub convention); ``load_pretrained`` checks it, so that a truncated
or corrupted download, or another file renamed to an official name, is one clear error
instead of a confusing one (or a silently wrong backbone). Other names are not checked.

A model with other than 3 input channels gets the RGB stem filters adapted
(``adapt_input_channels``).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path

import torch
from torch import nn

from segnest.errors import SegnestError
from segnest.runtime.checkpoint import load_checkpoint

OPTIONAL_SUFFIXES = ("num_batches_tracked",)

# The authors' ImageNet weights (REFERENCE.md; the official ``resnest`` package's
# ``resnest_model_urls``): pass one with --pretrained. The hex digits are the start of the
# file's sha256.
OFFICIAL_WEIGHTS = {
    "resnest50": "resnest50-528c19ca.pth",
    "resnest101": "resnest101-22405ba7.pth",
    "resnest200": "resnest200-75117900.pth",
    "resnest269": "resnest269-0cc87c48.pth",
    "resnest50_fast_1s1x64d": "resnest50_fast_1s1x64d-d8fbf808.pth",
    "resnest50_fast_2s1x64d": "resnest50_fast_2s1x64d-44938639.pth",
    "resnest50_fast_4s1x64d": "resnest50_fast_4s1x64d-f74f3fc3.pth",
    "resnest50_fast_1s2x40d": "resnest50_fast_1s2x40d-32830b84.pth",
    "resnest50_fast_2s2x40d": "resnest50_fast_2s2x40d-9d126481.pth",
    "resnest50_fast_4s2x40d": "resnest50_fast_4s2x40d-41d14ed0.pth",
    "resnest50_fast_1s4x24d": "resnest50_fast_1s4x24d-d4a4f76f.pth",
}
OFFICIAL_FILE_NAMES = frozenset(OFFICIAL_WEIGHTS.values())
# ``<name>-<hex>.<ext>``: torch.hub's names for checked downloads.
_HASH_IN_NAME = re.compile(r"-([0-9a-f]{8,64})\.[A-Za-z0-9]+$")
_HASH_CHUNK = 1 << 20


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


def check_hash_in_name(path: str | PathLike) -> None:
    """If ``path`` is named ``<name>-<hex>.<ext>``, check that its sha256 starts with those
    hex digits (one read of the file, in chunks); a mismatch is a SegnestError."""
    path = Path(path)
    match = _HASH_IN_NAME.search(path.name)
    if match is None or not path.is_file():
        return  # a missing file is reported by the loader
    expected = match.group(1)
    if expected.isdigit() and path.name not in OFFICIAL_FILE_NAMES:
        return  # digits only: more likely a date or a step (model-20231124.pth) than a hash
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(_HASH_CHUNK):
            digest.update(chunk)
    actual = digest.hexdigest()[: len(expected)]
    if actual != expected:
        raise SegnestError(
            f"{path}: its sha256 starts with {actual}, not {expected} as its name says; the "
            "download is corrupted or incomplete, or another file was given this name: "
            "download it again (if the suffix is not a hash, rename the file)")


def _target_key(key: str, prefix: str) -> str:
    """Where ``_rebase``'s choice ``prefix`` puts the source key ``key``."""
    if prefix == "backbone.":
        return "backbone." + key
    if prefix == "strip backbone.":
        return key[len("backbone."):]
    return key


def adapt_input_channels(model: nn.Module, state: dict[str, torch.Tensor]
                         ) -> dict[str, torch.Tensor]:
    """``state`` with RGB input filters fitted to a model
    that takes N != 3 input channels (``in_chans``): the first convolution of the stem.

    For N > 3 the RGB filters stay on channels 0-2 and every extra channel gets their mean;
    for N < 3 every channel gets the mean. All are then scaled by 3/N, so that an input
    whose channels resemble each other gives the stem the activations (and BatchNorm
    statistics) that an RGB image gave in pretraining.
    """
    target = model.state_dict()
    _, prefix = _rebase(state, set(target))
    adapted = dict(state)
    for key, weight in state.items():
        want = target.get(_target_key(key, prefix))
        if (want is None or weight.ndim != 4 or weight.shape[1] != 3
                or want.shape[1] == 3 or want.shape[:1] + want.shape[2:]
                != weight.shape[:1] + weight.shape[2:]):
            continue
        channels = want.shape[1]
        mean = weight.mean(dim=1, keepdim=True)
        kept = weight if channels > 3 else weight[:, :0]
        extra = mean.expand(-1, channels - kept.shape[1], -1, -1)
        adapted[key] = torch.cat([kept, extra], dim=1) * (3.0 / channels)
    return adapted


def load_pretrained(model: nn.Module, path: str | PathLike) -> LoadReport:
    """Load a local checkpoint into ``model`` (see the module docstring for what fits)."""
    check_hash_in_name(path)
    state = extract_state_dict(load_checkpoint(path))
    if not state:
        raise SegnestError(f"{path} holds no tensors: it is not a model checkpoint")
    state = adapt_input_channels(model, state)
    state, report = match_state_dict(model, state, source=str(path))
    model.load_state_dict(state, strict=False)
    return report
