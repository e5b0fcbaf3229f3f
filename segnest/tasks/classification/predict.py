"""``segnest predict`` with a classification checkpoint (``segnest pretrain``): the top-5
classes of each photo with their probabilities, named with the checkpoint's classes.

Each image's classes are printed (``photo.jpg: golden retriever 0.812, ...``) and written to
``<out>/<stem>.json``, atomically; the inputs, their names in ``--out`` and the checks that
``--out`` neither is an input folder nor replaces an input file or the checkpoint are
those of segmentation's predict (:mod:`segnest.inference.predict`), and a rerun replaces
the JSON files it wrote before. Unreadable images follow ``--skip-bad-samples``.
"""

from __future__ import annotations

import json
from pathlib import Path

from tqdm import tqdm

from segnest.data.bad_samples import BadSamplePolicy, python_warning
from segnest.inference.classification import ClassifierPredictor
from segnest.inference.config import PredictConfig
from segnest.inference.outputs import prepare_folder
from segnest.inference.predict import (
    check_outputs,
    collect_images,
    readable_images,
)
from segnest.runtime.checkpoint import load_checkpoint
from segnest.runtime.console import progress_bar
from segnest.runtime.distributed import resolve_device
from segnest.runtime.files import write_text_atomic
from segnest.runtime.precision import resolve_precision
from segnest.schema import FlagNames, validate


def json_name(stem: Path) -> Path:
    return stem.with_name(stem.name + ".json")


def run_classification_predict(cfg: PredictConfig) -> list[Path]:
    """Classify every input image; returns the JSON paths, one per image classified."""
    cfg = validate(cfg, FlagNames())
    resolve_precision(cfg.precision, resolve_device(cfg.device))  # refused before any file
    images = collect_images(cfg.inputs, skip=cfg.out)
    out = prepare_folder(check_outputs(cfg, images, lambda stem: [json_name(stem)]), "--out")
    predictor = ClassifierPredictor.from_checkpoint(
        load_checkpoint(cfg.checkpoint), str(cfg.checkpoint), cfg.device, fuse_bn=cfg.fuse_bn,
        compile=cfg.compile, precision=cfg.precision)
    bad_images = BadSamplePolicy(cfg.skip_bad_samples, "image(s)", warn=python_warning)
    bar = progress_bar(total=len(images), desc="predict", unit="img")
    written: list[Path] = []
    for (stem, image), file in readable_images(images, predictor.read, bad_images, bar):
        top = predictor.predict(image)
        path = out / json_name(stem)
        write_text_atomic(path, json.dumps({
            "image": str(file), "model": predictor.name,
            "checkpoint": str(Path(cfg.checkpoint).resolve()),
            "top": top.to_json()}, indent=2) + "\n")
        written.append(path)
        bar.update(1)
        tqdm.write(f"{file}: {top}")  # above a progress bar on a terminal
    bar.close()
    print(f"wrote the top-{predictor.top_k} classes of {len(written)} image(s) to {out} "
          f"(<name>.json); the model ({predictor.name}) knows {predictor.num_classes} classes")
    if warning := bad_images.summary(bad_images.count):
        print(warning)
    return written
