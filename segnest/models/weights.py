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

Weights by name (``NAMED_WEIGHTS``, ``resolve_pretrained``): ``resnest50`` etc. are the
authors' ImageNet files, fetched into torch.hub's checkpoint folder from the URLs the official
package and its torch.hub entry point use; ``timm:resnest14d.gluon_in1k`` etc. are timm's
ImageNet weights on the Hugging Face hub, whose layers match segnest's backbones at full
width (timm's ``resnest14d``/``resnest26d``/``resnest50d``/``resnest101e``... are segnest's
``resnest14``/``resnest26``/``resnest50``/``resnest101``...). Caches, offline mode and hash
checks: :mod:`segnest.runtime.hub`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path

import torch
from torch import nn

from segnest.errors import SegnestError
from segnest.runtime.checkpoint import load_checkpoint
from segnest.runtime.hub import (
    cached_hf_file,
    cached_url_file,
    check_sha256_prefix,
    find_hf_file,
    torch_hub_checkpoint_dir,
)

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
# The official package (resnest 0.0.5 on PyPI) downloads from the second; the repository's
# torch.hub entry point (hubconf.py on master) from the first.
OFFICIAL_URL_FORMATS = (
    "https://github.com/zhanghang1989/ResNeSt/releases/download/weights_step1/{}",
    "https://s3.us-west-1.wasabisys.com/resnest/torch/{}",
)
TIMM_PREFIX = "timm:"
# timm model name -> the segnest backbone with the same layers (and state-dict keys).
TIMM_BACKBONES = {
    "resnest14d": "resnest14",
    "resnest26d": "resnest26",
    "resnest50d": "resnest50",
    "resnest50d_1s4x24d": "resnest50_fast_1s4x24d",
    "resnest50d_4s2x40d": "resnest50_fast_4s2x40d",
    "resnest101e": "resnest101",
    "resnest200e": "resnest200",
    "resnest269e": "resnest269",
}
# timm's pretrained tags: the Gluon-trained small models, the authors' weights otherwise.
TIMM_TAGS = {name: "gluon_in1k" if name in ("resnest14d", "resnest26d") else "in1k"
             for name in TIMM_BACKBONES}
# timm publishes both; safetensors needs its package, the pickle one only torch.
TIMM_FILES = ("model.safetensors", "pytorch_model.bin")


@dataclass(frozen=True)
class NamedWeights:
    """ImageNet weights that ``--pretrained`` takes by name."""

    name: str
    backbone: str  # the segnest backbone they fit, at its full (default) width
    origin: str  # who trained them, for messages

    def _hub_file(self) -> tuple[str, tuple[str, ...]]:
        files = TIMM_FILES if _has_safetensors() else TIMM_FILES[1:]
        return f"timm/{self.name[len(TIMM_PREFIX):]}", files

    def cached(self) -> Path | None:
        """The file if it is in its cache already (nothing is downloaded or checked)."""
        if self.name.startswith(TIMM_PREFIX):
            return find_hf_file(*self._hub_file())
        path = torch_hub_checkpoint_dir() / OFFICIAL_WEIGHTS[self.name]
        return path if path.is_file() else None

    def fetch(self) -> Path:
        """The file in its cache, downloaded first if needed (see segnest.runtime.hub)."""
        if self.name.startswith(TIMM_PREFIX):
            return cached_hf_file(*self._hub_file(), what=self.name)
        file_name = OFFICIAL_WEIGHTS[self.name]
        return cached_url_file(tuple(f.format(file_name) for f in OFFICIAL_URL_FORMATS),
                               file_name, _HASH_IN_NAME.search(file_name).group(1),
                               what=f"{self.name} ({file_name})")


def _named_weights() -> dict[str, NamedWeights]:
    named = {name: NamedWeights(name, name, "the ResNeSt authors") for name in OFFICIAL_WEIGHTS}
    for model, backbone in TIMM_BACKBONES.items():
        full = f"{TIMM_PREFIX}{model}.{TIMM_TAGS[model]}"
        named[full] = NamedWeights(full, backbone, "timm")
    return named


NAMED_WEIGHTS = _named_weights()
# Short spellings: ``timm:resnest14d`` (timm's default tag) and the official file names.
_ALIASES = {**{f"{TIMM_PREFIX}{m}": f"{TIMM_PREFIX}{m}.{t}" for m, t in TIMM_TAGS.items()},
            **{file: name for name, file in OFFICIAL_WEIGHTS.items()}}


def _has_safetensors() -> bool:
    try:
        import safetensors  # noqa: F401
    except ImportError:
        return False
    return True


def named_weights(spec: str | PathLike) -> NamedWeights | None:
    """The named weights ``spec`` stands for; None for a local file (an existing path wins
    over a name, as before names existed)."""
    spec = str(spec)
    if Path(spec).expanduser().exists():
        return None
    return NAMED_WEIGHTS.get(_ALIASES.get(spec, spec))


def resolve_pretrained(spec: str | PathLike) -> Path:
    """The local file for ``--pretrained``: a path as given, or named weights from their
    cache (fetched once); anything else is one SegnestError listing the names."""
    named = named_weights(spec)
    if named is not None:
        return named.fetch()
    path = Path(spec).expanduser()
    looks_like_a_name = str(spec).startswith(TIMM_PREFIX) or (
        len(path.parts) == 1 and not path.suffix)
    if not path.exists() and looks_like_a_name:
        raise SegnestError(
            f"--pretrained {spec}: no such file, nor weights segnest knows by that name; "
            f"pass a checkpoint path or one of: {', '.join(NAMED_WEIGHTS)}")
    return path


@dataclass
class LoadReport:
    loaded: int
    skipped: list[str] = field(default_factory=list)
    prefix: str = ""
    path: Path | None = None  # the file read (a named weights' place in its cache)


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
    check_sha256_prefix(path, expected, "the download is corrupted or incomplete, or another "
                        "file was given this name: delete it and download it again (if the "
                        "suffix is not a hash, rename the file)")


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


def _read_weights(path: Path) -> dict:
    if path.suffix != ".safetensors":
        return load_checkpoint(path)
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise SegnestError(f"{path} is a safetensors file and the safetensors package is not "
                           "installed: pip install 'segnest[hub]'") from None
    try:
        return load_file(str(path))
    except Exception as error:  # safetensors raises its own error types on damaged files
        raise SegnestError(f"{path} cannot be read as safetensors ({error})") from error


def load_pretrained(model: nn.Module, spec: str | PathLike) -> LoadReport:
    """Load weights into ``model``: a local checkpoint, or named weights (``resnest50``,
    ``timm:resnest14d.gluon_in1k``, ... fetched once into their cache). See the module
    docstring for what fits."""
    named = named_weights(spec)
    path = resolve_pretrained(spec)
    if named is None:  # named weights are checked in their cache by resolve_pretrained
        check_hash_in_name(path)
    state = extract_state_dict(_read_weights(path))
    if not state:
        raise SegnestError(f"{path} holds no tensors: it is not a model checkpoint")
    state = adapt_input_channels(model, state)
    try:
        state, report = match_state_dict(model, state, source=str(path))
    except SegnestError as error:
        if named is None:
            raise
        raise SegnestError(
            f"--pretrained {named.name} holds {named.origin}'s ImageNet {named.backbone} at "
            f"its full width; it does not fit this model: use --backbone {named.backbone} "
            f"without --stage-width/--stem-width ({error})") from None
    model.load_state_dict(state, strict=False)
    report.path = path
    return report
