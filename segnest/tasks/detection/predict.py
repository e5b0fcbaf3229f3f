"""``segnest predict`` with a detection checkpoint: each image's detections (boxes, classes,
scores and, for mask models, masks as COCO RLE) in ``<out>/<stem>.json`` and drawn over the
image in ``<out>/<stem>.jpg``, both written atomically, by
:class:`~segnest.inference.detection.DetectionPredictor` (what ``segnest.load_model``
returns for such a checkpoint) at its default score threshold. Inputs, output names and the
checks on ``--out`` are segmentation's predict's (:mod:`segnest.inference.predict`).
"""

from __future__ import annotations

import json
from pathlib import Path

from segnest.data.bad_samples import BadSamplePolicy, python_warning
from segnest.inference.config import PredictConfig
from segnest.inference.detection import DetectionPredictor
from segnest.inference.outputs import prepare_folder
from segnest.inference.predict import (
    check_outputs,
    collect_images,
    readable_images,
)
from segnest.inference.visualize import save_jpeg
from segnest.runtime.checkpoint import load_checkpoint
from segnest.runtime.console import progress_bar
from segnest.runtime.files import write_text_atomic
from segnest.schema import FlagNames, validate


def output_names(stem: Path) -> list[Path]:
    """The detections (JSON) and the drawing (JPEG) of one input, relative to --out."""
    return [stem.with_name(stem.name + ".json"), stem.with_name(stem.name + ".jpg")]


def run_detection_predict(cfg: PredictConfig) -> list[Path]:
    """Detect in every input image; returns the JSON paths, one per image read."""
    cfg = validate(cfg, FlagNames())
    images = collect_images(cfg.inputs, skip=cfg.out)
    out = prepare_folder(check_outputs(cfg, images, output_names), "--out")
    predictor = DetectionPredictor.from_checkpoint(load_checkpoint(cfg.checkpoint), cfg.device,
                                                   source=str(cfg.checkpoint))
    bad_images = BadSamplePolicy(cfg.skip_bad_samples, "image(s)", warn=python_warning)
    bar = progress_bar(total=len(images), desc="predict", unit="img")
    written: list[Path] = []
    for (stem, image), _ in readable_images(images, predictor.read, bad_images, bar):
        detections = predictor.predict(image)
        json_path, drawing = (out / name for name in output_names(stem))
        write_text_atomic(json_path, json.dumps(detections.to_json()) + "\n")
        save_jpeg(drawing, predictor.draw(image, detections))
        written.append(json_path)
        bar.update(1)
    bar.close()
    print(f"wrote the detections of {len(written)} image(s) to {out}: <name>.json (boxes "
          f"x1 y1 x2 y2 in pixels, classes, scores{', masks as COCO RLE' * predictor.has_masks})"
          f" and <name>.jpg (drawn); scores below {predictor.score_threshold} left out")
    if warning := bad_images.summary(bad_images.count):
        print(warning)
    return written
