"""Configuration: one dataclass per command, whose field names are the CLI flags and the
recipe (YAML) keys: ``--crop-size`` <-> ``crop_size``. Defaults live here and only here.

Precedence, lowest first: dataclass defaults < dataset preset < recipe file (``--config``)
< flags given on the command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from segnest.errors import SegnestError

# Per-dataset settings from the paper's recipe (REFERENCE.md). Eval scales: long side =
# base_size x scale; crop_size is also the sliding-window size.
DATASET_PRESETS: dict[str, dict[str, Any]] = {
    "ade20k": dict(
        base_size=520,
        crop_size=480,
        epochs=180,
        iters=None,
        scales=(0.5, 0.75, 1.0, 1.25, 1.5, 1.75),
    ),
    "cityscapes": dict(
        base_size=1024,
        crop_size=768,
        epochs=240,
        iters=None,
        scales=(0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.25),
    ),
    "folder": dict(base_size=520, crop_size=480, scales=(0.5, 0.75, 1.0, 1.25, 1.5, 1.75)),
    # The CPU recipe: a small ResNeSt-14 that trains in minutes on two cores.
    "mini": dict(backbone="resnest14", stage_width=16, stem_width=16, head_channels=64,
                 base_size=112, crop_size=96, scale_min=0.75, scale_max=1.5, iters=900,
                 batch_size=8, lr=0.02, workers=2, scales=(0.75, 1.0, 1.25)),
}

# ``segnest pretrain --dataset mini``: the bundled 64 px, 8-class set, about 1.5 minutes on
# two CPU cores (no AutoAugment or mixup: they slow learning on this small set).
PRETRAIN_PRESETS: dict[str, dict[str, Any]] = {
    "mini": dict(backbone="resnest14", stage_width=16, stem_width=16, crop_size=64,
                 crop_pct=1.0, batch_size=32, epochs=15, lr=0.05, warmup_epochs=1.0,
                 mixup=0.0, auto_augment="none", workers=2),
}


def help_(text: str, **extra: Any) -> dict[str, Any]:
    return {"help": text, **extra}


# The two training commands save alike (segnest.training.run_state).
CHECKPOINT_INTERVAL = 1000
CHECKPOINT_INTERVAL_HELP = ("save last.pt every N iterations, also mid-epoch (0 = only at "
                            "validations, epoch ends and when stopped)")
KEEP_CHECKPOINTS_HELP = "also keep the K newest periodic checkpoints as iter_N.pt (0 = none)"
RESUME_HELP = ("continue from this checkpoint, or 'auto' (also a bare --resume): the newest "
               "in the work folder")
OVERWRITE_HELP = ("start a new run in a work folder that holds an earlier run's checkpoints, "
                  "deleting them (without it such a run is refused)")


@dataclass
class TrainConfig:
    """``segnest train``: DeepLabV3 on a ResNeSt backbone with the paper's recipe."""

    dataset: str = field(default="ade20k", metadata=help_("ade20k | cityscapes | folder | mini"))
    backbone: str = field(default="resnest50", metadata=help_("backbone name (segnest models)"))
    data_root: str | None = field(
        default=None,
        metadata=help_("dataset root (default: ./data/<dataset>, see datasets/README.md)"),
    )
    config: str | None = field(
        default=None, metadata=help_("recipe YAML; its keys are these flags")
    )
    pretrained: str | None = field(
        default=None, metadata=help_("local ImageNet/pretrain checkpoint for the backbone")
    )
    iters: int | None = field(
        default=None, metadata=help_("training iterations (overrides --epochs)")
    )
    epochs: int | None = field(default=None, metadata=help_("training epochs"))
    batch_size: int = field(default=2, metadata=help_("images per device per step"))
    lr: float | None = field(
        default=None, metadata=help_("base learning rate (default 0.01 x total batch / 16)")
    )
    momentum: float = field(default=0.9, metadata=help_("SGD momentum"))
    weight_decay: float = field(default=1e-4, metadata=help_("SGD weight decay"))
    no_decay_norm: bool = field(
        default=False, metadata=help_("no weight decay on norm layers and biases")
    )
    head_lr_mult: float = field(default=10.0, metadata=help_("lr multiplier of head and aux head"))
    poly_power: float = field(default=0.9, metadata=help_("poly schedule power"))
    min_lr: float = field(default=0.0, metadata=help_("poly schedule floor"))
    warmup_iters: int = field(default=0, metadata=help_("linear warmup iterations"))
    crop_size: int | None = field(default=None, metadata=help_("training crop (square)"))
    base_size: int | None = field(
        default=None, metadata=help_("long side before random scaling; eval long side")
    )
    scale_min: float = field(default=0.5, metadata=help_("random scale lower bound"))
    scale_max: float = field(default=2.0, metadata=help_("random scale upper bound"))
    cat_max_ratio: float = field(
        default=1.0, metadata=help_("re-draw crops where one class covers more than this (1 = off)")
    )
    photometric: bool = field(default=False, metadata=help_("photometric distortion"))
    output_stride: int | None = field(
        default=None, metadata=help_("backbone output stride: 8, 16 or 32 (default 8, the model's)")
    )
    aux: bool = field(default=True, metadata=help_("auxiliary FCN head on layer3"))
    aux_weight: float = field(default=0.2, metadata=help_("weight of the auxiliary loss"))
    head_channels: int | None = field(
        default=None, metadata=help_("ASPP channels (default: the model's, 256)")
    )
    stage_width: int = field(
        default=64,
        metadata=help_("planes of the backbone's first stage, doubled per stage (64 = published)",
                       renamed_from="base_width"),
    )
    stem_width: int | None = field(
        default=None, metadata=help_("backbone stem width (default: the variant's)")
    )
    workers: int = field(default=4, metadata=help_("data loader workers per process"))
    amp: bool = field(default=False, metadata=help_("mixed precision (CUDA only)"))
    compile: bool = field(default=False, metadata=help_("torch.compile the model"))
    checkpoint_activations: bool = field(
        default=False, metadata=help_("recompute backbone activations in backward to save memory")
    )
    work_dir: str | None = field(
        default=None, metadata=help_("output folder (default runs/<dataset>_<backbone>)")
    )
    resume: str | None = field(default=None, metadata=help_(RESUME_HELP))
    overwrite: bool = field(default=False, metadata=help_(OVERWRITE_HELP))
    seed: int = field(default=0, metadata=help_("random seed"))
    val_interval: int | None = field(
        default=None, metadata=help_("validate every N iterations (default: 10 times per run)")
    )
    val_samples: int | None = field(
        default=None, metadata=help_("validate on the first N images only (default all)")
    )
    checkpoint_interval: int = field(
        default=CHECKPOINT_INTERVAL, metadata=help_(CHECKPOINT_INTERVAL_HELP)
    )
    keep_checkpoints: int = field(default=0, metadata=help_(KEEP_CHECKPOINTS_HELP))
    log_interval: int = field(default=10, metadata=help_("scalar logging every N iterations"))
    panels: int = field(default=4, metadata=help_("validation images shown in TensorBoard"))
    tensorboard: bool = field(default=True, metadata=help_("write TensorBoard logs"))
    skip_bad_samples: bool = field(
        default=False, metadata=help_("warn about and skip unreadable samples instead of stopping")
    )
    label_map: str | None = field(
        default=None,
        metadata=help_("folder masks: raw value -> train id, e.g. 255:1,128:2 (other values "
                       "unchanged; a recipe may give a mapping {255: 1})"),
    )
    device: str | None = field(
        default=None, metadata=help_("cpu | cuda | cuda:N (default: cuda if present)")
    )


@dataclass
class InferenceFlags:
    """The inference flags that ``segnest eval`` and ``segnest predict`` share; turned into
    validated settings by ``segnest.inference.settings.InferenceSettings.from_flags``."""

    multi_scale: bool = field(default=False, metadata=help_("average the dataset's eval scales"))
    flip: bool = field(default=False, metadata=help_("add horizontally flipped views"))
    scales: str | None = field(
        default=None, metadata=help_("comma-separated scales, e.g. 0.5,1.0 (implies multi-scale)")
    )
    mode: str = field(default="whole", metadata=help_("whole | slide"))
    base_size: int | None = field(
        default=None, metadata=help_("long side at scale 1.0 (default: the checkpoint's)")
    )
    window_size: int | None = field(
        default=None,
        metadata=help_("sliding-window size (default: the checkpoint's training crop)",
                       renamed_from="crop_size"),
    )
    stride: int | None = field(
        default=None, metadata=help_("sliding-window stride (default 2/3 of the window)")
    )
    fuse_bn: bool = field(default=True, metadata=help_("fold BN into convs (same outputs, faster)"))
    compile: bool = field(
        default=False, metadata=help_("torch.compile with frozen weights (compiles per input size)")
    )
    device: str | None = field(default=None, metadata=help_("cpu | cuda | cuda:N"))


@dataclass
class EvalConfig(InferenceFlags):
    """``segnest eval``: metrics of a checkpoint on a dataset split."""

    checkpoint: str = field(default="", metadata=help_("segnest checkpoint (.pt)", required=True))
    dataset: str | None = field(default=None, metadata=help_("default: the checkpoint's"))
    data_root: str | None = field(default=None, metadata=help_("dataset root"))
    split: str = field(default="val", metadata=help_("train | val"))
    save_pred: str | None = field(default=None, metadata=help_("write predictions here"))
    out: str | None = field(
        default=None, metadata=help_("metrics folder (default next to checkpoint)")
    )
    samples: int | None = field(default=None, metadata=help_("first N images only"))
    skip_bad_samples: bool = field(
        default=False, metadata=help_("warn about and skip unreadable samples instead of stopping")
    )
    workers: int = field(default=2, metadata=help_("data loader workers"))


@dataclass
class PredictConfig(InferenceFlags):
    """``segnest predict``: coloured masks (and overlays) for images of any size and mode."""

    inputs: list[str] = field(default_factory=list, metadata=help_("image files or folders"))
    checkpoint: str = field(default="", metadata=help_("segnest checkpoint (.pt)", required=True))
    out: str = field(default="predictions", metadata=help_("output folder"))
    overlay: bool = field(default=False, metadata=help_("also write image/mask overlays"))
    skip_bad_samples: bool = field(
        default=False, metadata=help_("warn about and skip unreadable samples instead of stopping")
    )


@dataclass
class ExportConfig:
    """``segnest export``: a TorchScript or ONNX inference model from a checkpoint."""

    checkpoint: str = field(default="", metadata=help_("segnest checkpoint (.pt)", required=True))
    format: str = field(default="torchscript", metadata=help_("torchscript | onnx"))
    out: str | None = field(
        default=None, metadata=help_("output file (default next to checkpoint)")
    )
    size: int = field(default=512, metadata=help_("example input side used for tracing/checks"))


@dataclass
class PretrainConfig:
    """``segnest pretrain``: ImageNet-style classification pretraining of a backbone."""

    dataset: str = field(
        default="imagenet", metadata=help_("imagenet (a folder via --data) | mini")
    )
    data: str | None = field(
        default=None, metadata=help_("folder with train/<class>/ and val/<class>/")
    )
    backbone: str = field(default="resnest50", metadata=help_("backbone name"))
    config: str | None = field(default=None, metadata=help_("recipe YAML"))
    epochs: int = field(default=270, metadata=help_("training epochs"))
    batch_size: int = field(default=64, metadata=help_("images per device per step"))
    lr: float | None = field(
        default=None, metadata=help_("base lr (default 0.1 x total batch / 256)")
    )
    momentum: float = field(default=0.9, metadata=help_("SGD momentum"))
    weight_decay: float = field(default=1e-4, metadata=help_("weight decay (not on norm/bias)"))
    warmup_epochs: float = field(default=5.0, metadata=help_("linear warmup epochs"))
    label_smoothing: float = field(default=0.1, metadata=help_("label smoothing"))
    mixup: float = field(default=0.2, metadata=help_("mixup alpha (0 = off)"))
    cutmix: float = field(default=0.0, metadata=help_("cutmix alpha (0 = off)"))
    auto_augment: str = field(
        default="autoaugment", metadata=help_("autoaugment | randaugment | none")
    )
    crop_size: int = field(default=224, metadata=help_("train crop / eval crop"))
    crop_pct: float = field(
        default=0.875, metadata=help_("eval: resize to crop/crop_pct, centre crop")
    )
    dropblock_prob: float = field(default=0.0, metadata=help_("DropBlock on the last two stages"))
    final_drop: float = field(default=0.0, metadata=help_("dropout before fc"))
    last_gamma: bool = field(default=True, metadata=help_("zero-init the last BN gamma per block"))
    stage_width: int = field(
        default=64,
        metadata=help_("planes of the backbone's first stage, doubled per stage (64 = published)",
                       renamed_from="base_width"),
    )
    stem_width: int | None = field(default=None, metadata=help_("backbone stem width"))
    workers: int = field(default=4, metadata=help_("data loader workers per process"))
    amp: bool = field(default=False, metadata=help_("mixed precision (CUDA only)"))
    compile: bool = field(default=False, metadata=help_("torch.compile the model"))
    work_dir: str | None = field(default=None, metadata=help_("output folder"))
    resume: str | None = field(default=None, metadata=help_(RESUME_HELP))
    overwrite: bool = field(default=False, metadata=help_(OVERWRITE_HELP))
    export: str | None = field(
        default=None,
        metadata=help_("also write the bare backbone state dict (official key layout) here"),
    )
    seed: int = field(default=0, metadata=help_("random seed"))
    checkpoint_interval: int = field(
        default=CHECKPOINT_INTERVAL, metadata=help_(CHECKPOINT_INTERVAL_HELP)
    )
    keep_checkpoints: int = field(default=0, metadata=help_(KEEP_CHECKPOINTS_HELP))
    log_interval: int = field(default=10, metadata=help_("scalar logging every N iterations"))
    tensorboard: bool = field(default=True, metadata=help_("write TensorBoard logs"))
    device: str | None = field(default=None, metadata=help_("cpu | cuda | cuda:N"))


@dataclass
class BenchConfig:
    """``segnest bench``: speed, memory and achieved FLOP/s of a model."""

    model: str = field(default="deeplabv3_resnest50", metadata=help_("model name"))
    size: int = field(default=512, metadata=help_("input side"))
    batch: int = field(default=2, metadata=help_("batch size"))
    mode: str = field(default="infer", metadata=help_("infer | train"))
    compile: bool = field(default=False, metadata=help_("torch.compile the model"))
    fuse_bn: bool = field(default=True, metadata=help_("fold BN into convs for inference"))
    checkpoint_activations: bool = field(default=False, metadata=help_("activation checkpointing"))
    warmup: int = field(default=2, metadata=help_("untimed runs"))
    runs: int = field(default=5, metadata=help_("timed runs (median reported)"))
    num_classes: int = field(default=150, metadata=help_("classes of the head"))
    json: bool = field(default=False, metadata=help_("print one JSON object"))
    device: str | None = field(default=None, metadata=help_("cpu | cuda | cuda:N"))


@dataclass
class DemoConfig:
    """``segnest demo``: the whole pipeline on bundled data, in minutes, on a CPU."""

    work_dir: str = field(default="runs/demo", metadata=help_("output folder"))
    pretrain_epochs: int = field(default=15, metadata=help_("classification pretraining epochs"))
    iters: int = field(default=900, metadata=help_("segmentation training iterations"))
    compare_scratch: bool = field(
        default=False,
        metadata=help_("also train from scratch with the same budget and report both"),
    )
    workers: int = field(default=2, metadata=help_("data loader workers"))
    device: str | None = field(default=None, metadata=help_("cpu | cuda | cuda:N"))


def _field_type(f: dataclasses.Field, owner: type) -> Any:
    hints = typing.get_type_hints(owner)
    tp = hints[f.name]
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    return tp


def renamed_keys(cls: type) -> dict[str, str]:
    """Old name -> current name of every renamed field of ``cls`` (flags and recipe keys)."""
    return {f.metadata["renamed_from"]: f.name for f in fields(cls) if "renamed_from" in f.metadata}


def warn_renamed(old: str, new: str, where: str) -> None:
    print(f"segnest: warning: {where} '{old}' is renamed '{new}'; the old name still works "
          "but will be removed", file=sys.stderr)


class _RenamedFlag(argparse.Action):
    """The old spelling of a renamed flag: sets the new field and says so once."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        warn_renamed(option_string, "--" + self.dest.replace("_", "-"), "flag")
        setattr(namespace, self.dest, values)


def add_dataclass_arguments(
    parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()
) -> None:
    """One ``--flag-name`` per field. Defaults are suppressed so that only what the user
    typed overrides the recipe and the presets; a renamed field also takes its old flag."""
    for f in fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        tp = _field_type(f, cls)
        meta = dict(f.metadata)
        required = meta.pop("required", False)
        old_name = meta.pop("renamed_from", None)
        kwargs: dict[str, Any] = dict(dest=f.name, default=argparse.SUPPRESS, **meta)
        if required:
            kwargs["required"] = True
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = tp
            kwargs["metavar"] = f.name.upper() if tp is str else tp.__name__.upper()
        parser.add_argument(flag, **kwargs)
        if old_name is not None and tp is not bool:
            parser.add_argument("--" + old_name.replace("_", "-"), dest=f.name, type=tp,
                                default=argparse.SUPPRESS, action=_RenamedFlag,
                                help=argparse.SUPPRESS)


def load_recipe(path: str | Path, cls: type) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise SegnestError(f"recipe {path} not found; recipes live in experiments/*.yaml")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise SegnestError(f"recipe {path} is not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise SegnestError(f"recipe {path} must be a mapping of flag names to values")
    data = {k.replace("-", "_"): v for k, v in data.items() if k not in ("reference", "notes")}
    for old, new in renamed_keys(cls).items():
        if old in data:
            warn_renamed(old, new, f"recipe {path}: key")
            data.setdefault(new, data.pop(old))
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise SegnestError(
            f"recipe {path}: unknown key(s) {', '.join(unknown)}; valid keys are the flags of "
            f"this command ({', '.join(sorted(known))})"
        )
    return data


def _coerce(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for f in fields(cls):
        if f.name not in values:
            continue
        value, tp = values[f.name], _field_type(f, cls)
        if isinstance(value, dict) and tp is str:
            # A recipe's mapping for a "k:v,k:v" flag (label_map: {255: 1}).
            value = ",".join(f"{key}:{item}" for key, item in value.items())
        if value is not None and tp in (int, float, str) and not isinstance(value, tp):
            try:
                value = tp(value)
            except (TypeError, ValueError) as err:
                raise SegnestError(f"{f.name}: expected {tp.__name__}, got {value!r}") from err
        out[f.name] = value
    return out


def resolve_config(
    cls: type, cli: dict[str, Any], presets: dict[str, dict[str, Any]] | None = None
):
    """Merge defaults < dataset preset < recipe < command line into one ``cls`` instance."""
    recipe = load_recipe(cli["config"], cls) if cli.get("config") else {}
    merged: dict[str, Any] = {}
    dataset = cli.get("dataset") or recipe.get("dataset")
    if presets is not None:
        dataset = dataset or next(f.default for f in fields(cls) if f.name == "dataset")
        known = {f.name for f in fields(cls)}
        merged.update({k: v for k, v in presets.get(dataset, {}).items() if k in known})
    merged.update(recipe)
    merged.update(cli)
    return cls(**_coerce(cls, merged))

