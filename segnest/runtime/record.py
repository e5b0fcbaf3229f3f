"""What a segnest checkpoint holds, as one typed record: the only place that knows the
checkpoint's keys. :meth:`CheckpointRecord.read` takes the dict ``load_checkpoint`` returns
(or the metadata record of an exported model) and :meth:`CheckpointRecord.state` gives the
dict ``save_checkpoint`` writes; every other module reads and writes fields.

Layouts it reads:

- segnest 0.1 (``tests/data/release-0.1.0-*.pt``): no ``task`` (the model name says it),
  ``model_kwargs`` with ``base_width`` (now ``stage_width``), no ``inference`` record (the
  training ``config`` gives its base and crop size), the best metric as a fraction without
  ``metric_unit``;
- this version: all of the fields below. A key no field names (a task's own record, the best
  value under its ``BestMetric.checkpoint_key``) is kept in ``extra`` and written back.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

# Keyword arguments renamed since they were first written into checkpoints.
RENAMED_MODEL_KWARGS = {"base_width": "stage_width"}


def canonical_model_kwargs(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """``model_kwargs`` as stored in a checkpoint, with renamed arguments under their
    current names."""
    return {RENAMED_MODEL_KWARGS.get(k, k): v for k, v in kwargs.items()}


@dataclass
class CheckpointRecord:
    """The fields of a segnest checkpoint (None or empty: not recorded)."""

    # What the model is: rebuilt by segnest.models.model_from_checkpoint.
    task: str | None = None
    model_name: str | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)  # current argument names
    weights: Mapping[str, Any] | None = None  # the model's state dict ("model")
    # What it was trained on and with.
    config: dict[str, Any] = field(default_factory=dict)  # the training command's settings
    dataset: str | None = None
    classes: list[str] | None = None
    palette: list[list[int]] | None = None
    inference: dict[str, Any] | None = None  # InferenceSettings as trained
    class_weights: list[float] | None = None
    precision: str | None = None
    # The hardware decisions training ran with (what -> chosen: the ASPP's per-dilation
    # precision, the segmentation loss's path), which a resumed run takes over.
    hardware: dict[str, str] | None = None
    # Where the run stood.
    iteration: int | None = None
    position: int | None = None
    epoch: int | None = None
    iters_per_epoch: int | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    best_metric: str | None = None
    best_iteration: int | None = None
    metric_unit: str | None = None
    segnest_version: str | None = None
    # What resuming restores.
    optimizer: dict[str, Any] | None = None
    scheduler: dict[str, Any] | None = None
    scaler: dict[str, Any] | None = None
    rng: list[dict[str, Any]] | None = None
    # Detection: the COCO categories and the validation set the run used.
    category_ids: list[int] | None = None
    val_annotations: str | None = None
    val_images: str | None = None
    # An exported model's format and quantization (backends.load_exported_model).
    exported: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    # Fields the checkpoint stored as None (``class_weights: None``): written back so.
    stored_empty: set[str] = field(default_factory=set, repr=False)

    @classmethod
    def read(cls, state: Mapping[str, Any]) -> CheckpointRecord:
        """The record of a loaded checkpoint dict, of any layout segnest wrote."""
        known = {f.name for f in dataclasses.fields(cls)} - {"weights", "extra", "stored_empty"}
        values = {key: state[key] for key in known if state.get(key) is not None}
        values["model_kwargs"] = canonical_model_kwargs(state.get("model_kwargs") or {})
        values["config"] = dict(state.get("config") or {})
        values["metrics"] = dict(state.get("metrics") or {})
        extra = {k: v for k, v in state.items() if k not in known and k != "model"}
        empty = {key for key in known if key in state and state[key] is None}
        return cls(**values, weights=state.get("model"), extra=extra, stored_empty=empty)

    def state(self) -> dict[str, Any]:
        """The dict to save: every recorded field under its key (the weights under
        ``model``), then ``extra``."""
        out = dict(self.extra)
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in ("weights", "extra", "stored_empty"):
                continue
            if value is not None or f.name in self.stored_empty:
                out[f.name] = value
        if self.weights is not None:
            out["model"] = self.weights
        return out

    @property
    def in_channels(self) -> int:
        """Channels of the model's input images (3 where not recorded)."""
        return int(self.model_kwargs.get("in_chans", 3))

    @property
    def num_classes(self) -> int:
        """Classes of the model's output (from its arguments, else the class names); 0
        where neither is recorded."""
        return int(self.model_kwargs.get("num_classes") or len(self.classes or ()))

    def trained(self, name: str) -> Any:
        """The training command's setting ``name`` (None where not recorded)."""
        return self.config.get(name)

    def inference_sizes(self) -> dict[str, Any]:
        """The inference settings training recorded; segnest 0.1 recorded none, and its
        training config gives the same two sizes."""
        if self.inference is not None:
            return dict(self.inference)
        return {"base_size": self.trained("base_size"), "window_size": self.trained("crop_size")}
