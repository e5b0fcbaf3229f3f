"""The datasets ``segnest train`` and ``segnest eval`` know and the paper's per-dataset
recipe values (REFERENCE.md): the presets under the flags of ``segnest train`` (precedence:
defaults < dataset preset < recipe < flags) and the eval sizes and multi-scale views that
``segnest eval``/``predict`` fall back on. Data, not code: torch-free, so that the command
line reads it before anything heavy is imported, and low enough for the inference library.
"""

from __future__ import annotations

from typing import Any

DATASETS = ("ade20k", "cityscapes", "folder", "mini")

# The CPU model: a small ResNeSt-14 that trains in minutes on two cores (the demo's, and the
# folder preset's on a machine without a GPU).
CPU_MODEL: dict[str, Any] = dict(backbone="resnest14", stage_width=16, stem_width=16,
                                 head_channels=64, batch_size=8, lr=0.02)

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
    # Your own images, 50 epochs: `segnest train` replaces base_size and crop_size with
    # values derived from the train images and, without a GPU, the model with CPU_MODEL
    # (segnest.tasks.segmentation.presets); these stand where nothing can be derived.
    "folder": dict(base_size=520, crop_size=480, epochs=50,
                   scales=(0.5, 0.75, 1.0, 1.25, 1.5, 1.75)),
    "mini": dict(**CPU_MODEL, base_size=112, crop_size=96, scale_min=0.75, scale_max=1.5,
                 iters=900, workers=2, scales=(0.75, 1.0, 1.25)),
}

