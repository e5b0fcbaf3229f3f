"""``segnest pretrain``'s settings: the shared training flags (:class:`TrainingConfig`),
those of classification pretraining with their rules, and its dataset presets.

Torch-free: the command line imports it to build its flags."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from segnest.engine.config import TrainingConfig, backbone_fits, lr_rule_text, work_dirs_text
from segnest.errors import SegnestError
from segnest.schema import MIN_INPUT_SIZE, Names, help_

PRETRAIN_DATASETS = ("imagenet", "mini")
# The policies segnest.data.classification implements (it checks them for library callers).
AUTO_AUGMENT_CHOICES = ("autoaugment", "randaugment", "none")
# The base learning rate without --lr: (lr, batch) of ImageNet training, linear in the total
# batch (segnest.engine.config.linear_lr).
PRETRAIN_LR_RULE = (0.1, 256)
# Images per device per step without --batch-size (and a preset that sets it).
PRETRAIN_BATCH_SIZE = 64

# ``segnest pretrain --dataset mini``: the bundled 64 px, 8-class set, about 1.5 minutes on
# two CPU cores (no AutoAugment or mixup: they slow learning on this small set).
PRETRAIN_PRESETS: dict[str, dict[str, Any]] = {
    "mini": dict(backbone="resnest14", stage_width=16, stem_width=16, crop_size=64,
                 crop_pct=1.0, batch_size=32, epochs=15, lr=0.05, warmup_epochs=1.0,
                 mixup=0.0, auto_augment="none", workers=2),
}


def _warmup_within_epochs(cfg: PretrainConfig, names: Names) -> None:
    if cfg.warmup_epochs > cfg.epochs:
        raise SegnestError(f"{names.show('warmup_epochs', cfg.warmup_epochs)} is longer than "
                           f"the run ({names.show('epochs', cfg.epochs)}); lower the warmup")


def _imagenet_needs_data(cfg: PretrainConfig, names: Names) -> None:
    if cfg.dataset == "imagenet" and not cfg.data_root:
        raise SegnestError("--dataset imagenet needs --data-root: a folder with train/<class>/ and "
                           "val/<class>/ image folders (ImageNet layout)")


@dataclass
class PretrainConfig(TrainingConfig):
    """``segnest pretrain``: ImageNet-style classification pretraining of a backbone."""

    checks = (_warmup_within_epochs, _imagenet_needs_data, backbone_fits)
    help_presets = PRETRAIN_PRESETS

    dataset: str = field(
        default="imagenet",
        metadata=help_("imagenet (a folder via --data-root) or the bundled mini set",
                       choices=PRETRAIN_DATASETS),
    )
    data_root: str | None = field(
        default=None, metadata=help_("folder with train/<class>/ and val/<class>/",
                                     renamed_from="data")
    )
    epochs: int = field(default=270, metadata=help_("training epochs", min=1))
    batch_size: int = field(default=PRETRAIN_BATCH_SIZE,
                            metadata=help_("images per device per step", min=1))
    lr: float | None = field(
        default=None, metadata=help_("base lr", above=0,
                                     default_shown=lr_rule_text(PRETRAIN_LR_RULE,
                                                                PRETRAIN_BATCH_SIZE))
    )
    weight_decay: float = field(
        default=1e-4, metadata=help_("weight decay (not on norm/bias)", min=0)
    )
    warmup_epochs: float = field(default=5.0, metadata=help_("linear warmup epochs", min=0))
    label_smoothing: float = field(
        default=0.1, metadata=help_("label smoothing", min=0, below=1)
    )
    mixup: float = field(default=0.2, metadata=help_("mixup alpha (0 = off)", min=0))
    cutmix: float = field(default=0.0, metadata=help_("cutmix alpha (0 = off)", min=0))
    auto_augment: str = field(
        default="autoaugment",
        metadata=help_("augmentation policy", choices=AUTO_AUGMENT_CHOICES),
    )
    crop_size: int = field(
        default=224, metadata=help_("train crop / eval crop", min=MIN_INPUT_SIZE)
    )
    crop_pct: float = field(
        default=0.875,
        metadata=help_("eval: resize to crop/crop_pct, centre crop", above=0, max=1),
    )
    dropblock_prob: float = field(
        default=0.0, metadata=help_("DropBlock on the last two stages", min=0, below=1)
    )
    final_drop: float = field(
        default=0.0, metadata=help_("dropout before fc", min=0, below=1)
    )
    last_gamma: bool = field(default=True, metadata=help_("zero-init the last BN gamma per block"))
    work_dir: str | None = field(
        default=None, metadata=help_("output folder", default_shown=work_dirs_text(
            "runs/pretrain_{}_{}", PRETRAIN_PRESETS, "imagenet", "resnest50")))
    export: str | None = field(
        default=None,
        metadata=help_("also write the bare backbone state dict (official key layout) here"),
    )
    skip_bad_samples: bool = field(
        default=False, metadata=help_("warn about and skip unreadable samples instead of stopping")
    )
