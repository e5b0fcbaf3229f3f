"""The settings every training command shares (:class:`TrainingConfig`), declared once with
their validation; a task's settings (``segnest/tasks/<task>/config.py``) subclass it, add
their own fields and rules, and redeclare a shared field only where its default differs.
:func:`segnest.engine.trainer.fit` reads these fields for every task.

Torch-free: the command line imports it to build its flags."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from segnest.errors import SegnestError
from segnest.schema import DEVICE, DEVICE_HELP, PRECISION_HELP, PRECISIONS, Names, help_

# NumPy's seed range; it also keeps the samplers' seed arithmetic within 64 bits.
MAX_SEED = 2**32 - 1
CHECKPOINT_INTERVAL = 1000
TRAIN_PRECISION_HELP = PRECISION_HELP + " (default: fp32, fp16 with --amp)"
AMP_HELP = "the same as --precision fp16: fp16 autocast with a gradient scaler, CUDA only"
# --stem-width's default, the backbone's own (segnest.models.resnest.RESNEST_VARIANTS; a test
# holds this text to the table).
STEM_WIDTH_SHOWN = ("the backbone's: 32 for resnest14/26/50, the resnest50_fast variants and "
                    "resnet50d/101d; 64 for resnest101/200/269")


def linear_lr(rule: tuple[float, int], total_batch: int) -> float:
    """The learning rate a task's ``rule`` (lr, the batch it is stated for) gives a total
    batch (batch size x processes): ``lr x total_batch / batch``."""
    lr, batch = rule
    return lr * total_batch / batch


def lr_rule_text(rule: tuple[float, int], batch_size: int) -> str:
    """``--lr``'s default in --help: the number at the default batch, then the rule."""
    return (f"{linear_lr(rule, batch_size):g} at batch {batch_size} on one process: "
            f"lr = {rule[0]:g} x total batch / {rule[1]}")


def work_dirs_text(pattern: str, presets: dict[str, dict[str, Any]], dataset: str,
                   backbone: str) -> str:
    """The default work folders in --help: ``pattern`` filled for the default dataset and
    each preset that changes the backbone."""
    shown = [pattern.format(dataset, backbone)]
    shown += [f"{name}: {pattern.format(name.split()[0], preset['backbone'])}"
              for name, preset in presets.items() if "backbone" in preset]
    return f"{pattern.format('<dataset>', '<backbone>')}: " + "; ".join(shown)


def _amp_alias(cfg: TrainingConfig, names: Names) -> None:
    if cfg.amp and cfg.precision not in (None, "fp16"):
        amp = names.show("amp", cfg.amp).removesuffix(" true")  # the bare flag as typed
        raise SegnestError(f"{amp} means {names.name('precision')} fp16 but "
                           f"{names.show('precision', cfg.precision)} is given too; give one "
                           "of them")


def backbone_fits(cfg: TrainingConfig, names: Names) -> None:
    """The backbone exists and ``stage_width`` splits into its radix x cardinality groups
    (the Split-Attention convolutions need whole channels per group)."""
    from segnest.models.resnest import RESNEST_VARIANTS, stage_width_fits  # torch: last

    if cfg.backbone not in RESNEST_VARIANTS:
        raise SegnestError(f"unknown {names.show('backbone', cfg.backbone)}; choose one of: "
                           f"{', '.join(RESNEST_VARIANTS)}")
    variant = RESNEST_VARIANTS[cfg.backbone]
    if stage_width_fits(variant, cfg.stage_width):
        return
    lower = next((w for w in range(cfg.stage_width - 1, 0, -1) if stage_width_fits(variant, w)),
                 None)
    upper = next(w for w in range(cfg.stage_width + 1, 64 * cfg.stage_width + 64)
                 if stage_width_fits(variant, w))
    nearest = f"{lower} or {upper}" if lower else str(upper)
    raise SegnestError(f"{names.show('stage_width', cfg.stage_width)} does not fit "
                       f"{cfg.backbone}: its blocks split the channels into radix "
                       f"{variant.get('radix', 0)} x {variant.get('groups', 1)} groups; "
                       f"use {nearest}")


@dataclass
class TrainingConfig:
    """The flags of every training command (a task's config adds its own)."""

    # Cross-field rules (segnest.schema.validate); a task's own run before these. A task
    # whose backbones are ResNeSt's variants lists ``backbone_fits`` last (it imports torch).
    checks = (_amp_alias,)

    dataset: str = field(default="", metadata=help_("dataset"))
    backbone: str = field(default="resnest50", metadata=help_("backbone name (segnest models)"))
    data_root: str | None = field(default=None, metadata=help_("dataset root"))
    config: str | None = field(
        default=None, metadata=help_("recipe YAML; its keys are these flags")
    )
    epochs: int | None = field(default=None, metadata=help_("training epochs", min=1))
    batch_size: int = field(default=2, metadata=help_("images per device per step", min=1))
    lr: float | None = field(default=None, metadata=help_("base learning rate", above=0))
    momentum: float = field(default=0.9, metadata=help_("SGD momentum", min=0, below=1))
    weight_decay: float = field(default=1e-4, metadata=help_("SGD weight decay", min=0))
    stage_width: int = field(
        default=64,
        metadata=help_("planes of the backbone's first stage, doubled per stage (64 = published)",
                       renamed_from="base_width", min=1),
    )
    stem_width: int | None = field(default=None, metadata=help_(
        "backbone stem width", min=1, default_shown=STEM_WIDTH_SHOWN))
    workers: int = field(default=4, metadata=help_("data loader workers per process", min=0))
    precision: str | None = field(
        default=None, metadata=help_(TRAIN_PRECISION_HELP, choices=PRECISIONS))
    amp: bool = field(default=False, metadata=help_(AMP_HELP))
    compile: bool = field(default=False, metadata=help_("torch.compile the model"))
    work_dir: str | None = field(default=None, metadata=help_("output folder"))
    resume: str | None = field(default=None, metadata=help_(
        "continue from this checkpoint, or 'auto' (also a bare --resume): the newest in the "
        "work folder", const="auto"))
    overwrite: bool = field(default=False, metadata=help_(
        "start a new run in a work folder that holds an earlier run's checkpoints, deleting "
        "them (without it such a run is refused)"))
    seed: int = field(default=0, metadata=help_("random seed", min=0, max=MAX_SEED))
    checkpoint_interval: int = field(default=CHECKPOINT_INTERVAL, metadata=help_(
        "save last.pt every N iterations, also mid-epoch (0 = only at validations, epoch ends "
        "and when stopped)", min=0))
    keep_checkpoints: int = field(default=0, metadata=help_(
        "also keep the K newest periodic checkpoints as iter_N.pt (0 = none)", min=0))
    log_interval: int = field(
        default=10, metadata=help_("scalar logging every N iterations", min=1)
    )
    tensorboard: bool = field(default=True, metadata=help_("write TensorBoard logs"))
    device: str | None = field(default=None, metadata=help_(DEVICE_HELP, pattern=DEVICE))


def _training_length(cfg: IterationTrainingConfig, names: Names) -> None:
    if cfg.iters is None and cfg.epochs is None:
        raise SegnestError(f"give the training length with {names.name('iters')} or "
                           f"{names.name('epochs')}")


def _warmup_within_iters(cfg: IterationTrainingConfig, names: Names) -> None:
    # The schedule accepts warmup == iters (the whole run warms up); longer cannot run.
    if cfg.iters is not None and cfg.warmup_iters > cfg.iters:
        raise SegnestError(f"{names.show('warmup_iters', cfg.warmup_iters)} is longer than "
                           f"the run ({names.show('iters', cfg.iters)}); lower the warmup")


@dataclass
class IterationTrainingConfig(TrainingConfig):
    """The flags of a training command counted in iterations (optimizer steps) that starts
    from backbone weights and validates during the run: segmentation and detection."""

    checks = (_training_length, _warmup_within_iters)

    pretrained: str | None = field(
        default=None, metadata=help_("backbone weights: a checkpoint file or ImageNet weights "
                                     "by name (resnest50, timm:resnest14d.gluon_in1k, ...; "
                                     "see docs/recipes.md)")
    )
    iters: int | None = field(
        default=None, metadata=help_("training iterations (overrides --epochs)", min=1,
                                     default_shown="from --epochs")
    )
    warmup_iters: int = field(default=0, metadata=help_("linear warmup iterations", min=0))
    val_interval: int | None = field(
        default=None, metadata=help_("validate every N iterations (default: a tenth of the run)",
                                     min=1))
    val_samples: int | None = field(
        default=None, metadata=help_("validate on the first N images only (default all)", min=1)
    )
    panels: int = field(
        default=4, metadata=help_("validation images shown in TensorBoard", min=0)
    )
