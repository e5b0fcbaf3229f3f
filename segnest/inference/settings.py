"""How an image becomes class probabilities: the inference settings, built and validated
in one place for ``segnest eval``, ``segnest predict`` and training's validation.

- single scale (the default): one view whose long side is ``base_size`` (scale 1.0), as in
  the reference evaluation's single-scale numbers;
- ``--multi-scale``: the dataset preset's scales (long side = ``base_size`` x scale);
  ``--scales 0.5,1.0`` (``scales=(0.5, 1.0)`` from Python) picks them explicitly (and
  implies multi-scale);
- ``--flip`` adds the mirrored view of every scale;
- ``--mode slide``: sliding windows of ``--window-size`` with ``--stride`` (default 2/3 of
  the window), as the reference evaluates images larger than its crop.

Each value comes from the flag when given, else from the settings the checkpoint was
trained with (``segnest train`` stores its ``base_size`` and, as the window, its crop
size), else from the dataset preset. The per-channel mean and std always come from the
checkpoint (ImageNet's for checkpoints that predate them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from segnest.data.transforms import MEAN, STD, channel_statistics
from segnest.errors import SegnestError
from segnest.inference.config import INFERENCE_MODES, InferenceFlags
from segnest.presets import DATASET_PRESETS
from segnest.runtime.record import CheckpointRecord
from segnest.schema import validate


@dataclass(frozen=True)
class InferenceSettings:
    """A validated inference strategy; field names match the flags."""

    mode: str = "whole"
    scales: tuple[float, ...] = (1.0,)
    flip: bool = False
    base_size: int | None = None
    window_size: int | None = None
    stride: int | None = None
    # Per-channel normalization on a 0-1 scale, as the model was trained with.
    mean: tuple[float, ...] = MEAN
    std: tuple[float, ...] = STD

    def __post_init__(self) -> None:
        if self.mode not in INFERENCE_MODES:
            raise SegnestError(f"mode {self.mode!r} is not an inference mode; use one of "
                               f"{', '.join(INFERENCE_MODES)}")
        if not self.scales or any(isinstance(s, bool) or not isinstance(s, int | float)
                                  or not math.isfinite(s) or s <= 0 for s in self.scales):
            raise SegnestError(f"scales must be positive numbers, got {list(self.scales)}")
        for name, value in (("base_size", self.base_size), ("window_size", self.window_size),
                            ("stride", self.stride)):
            if value is not None and (isinstance(value, bool) or int(value) != value
                                      or value < 1):
                raise SegnestError(f"{name} must be a positive number of pixels, got {value}")
        if self.mode == "slide":
            if self.window_size is None:
                raise SegnestError("mode 'slide' needs a window size; give window_size "
                                   "(--window-size)")
            if self.stride is not None and self.stride > self.window_size:
                raise SegnestError(
                    f"stride {self.stride} is larger than window_size {self.window_size} "
                    "and would skip pixels; use a stride of at most the window size")

    @property
    def views(self) -> int:
        return len(self.scales) * (2 if self.flip else 1)

    def describe(self) -> str:
        scales = ",".join(f"{s:g}" for s in self.scales)
        return f"scales {scales}{' + flip' if self.flip else ''}, {self.mode}"

    def working_size(self) -> str:
        """The size the model sees an image at, for people: ``long side 112 px`` (one
        scale), ``long side 84-140 px (3 scales + flip)``, or the image's own size."""
        if self.base_size is None:
            sides = "the image's own size" + (
                "" if self.scales == (1.0,) else f" x {','.join(f'{s:g}' for s in self.scales)}")
        else:
            lengths = sorted(round(self.base_size * scale) for scale in self.scales)
            span = f"{lengths[0]}" if len(set(lengths)) == 1 else f"{lengths[0]}-{lengths[-1]}"
            sides = f"long side {span} px"
            if len(self.scales) > 1:
                sides += f" ({len(self.scales)} scales)"
        if self.flip:
            sides += " + flip"
        if self.mode == "slide":
            sides += f", in {self.window_size} px windows"
        return sides

    @classmethod
    def for_training(cls, cfg: Any) -> InferenceSettings:
        """Validation during ``segnest train``: single scale at the recipe's base size; the
        recipe's crop is recorded as the window for a later ``--mode slide``."""
        mean, std = channel_statistics(cfg.in_channels, cfg.mean, cfg.std)
        return cls(base_size=cfg.base_size, window_size=cfg.crop_size, mean=mean, std=std)

    @classmethod
    def from_flags(cls, flags: InferenceFlags, checkpoint: dict[str, Any],
                   dataset: str | None = None) -> InferenceSettings:
        """Settings of an eval/predict command (see the module docstring). ``dataset``
        (default: the checkpoint's) names the preset that supplies the multi-scale scales."""
        flags = validate(flags)  # typed values, in Python terms
        dataset = dataset or CheckpointRecord.read(checkpoint).dataset
        preset = DATASET_PRESETS.get(dataset, {}) if dataset else {}
        stored = stored_settings(checkpoint)
        if flags.scales:
            scales = tuple(flags.scales)
        elif flags.multi_scale:
            if "scales" not in preset:
                raise SegnestError(
                    f"multi-scale: no preset scales for dataset {dataset!r}; give them as "
                    "scales (--scales 0.5,0.75,1.0,1.25,1.5,1.75)")
            scales = tuple(float(s) for s in preset["scales"])
        else:
            scales = (1.0,)
        window = _first_given(flags.window_size, stored.get("window_size"),
                              preset.get("crop_size"))
        # Whole-image inference keeps only what was typed (validated, unused).
        return cls(
            mode=flags.mode, scales=scales, flip=bool(flags.flip),
            base_size=_first_given(flags.base_size, stored.get("base_size"),
                                   preset.get("base_size")),
            window_size=window if flags.mode == "slide" else flags.window_size,
            stride=flags.stride,
            mean=tuple(stored.get("mean") or MEAN), std=tuple(stored.get("std") or STD),
        )


def _first_given(*values: Any) -> Any:
    return next((value for value in values if value is not None), None)


def stored_settings(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """The inference settings a training checkpoint recorded (segnest 0.1's: from its
    training config, :meth:`CheckpointRecord.inference_sizes`)."""
    return CheckpointRecord.read(checkpoint).inference_sizes()
