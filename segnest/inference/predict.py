"""``segnest predict``: coloured masks, train-id masks and overlays for arbitrary images.

Inputs are image files or folders (searched recursively). Any image mode (RGB, grey,
RGBA, palette, 16-bit) is read as RGB. For an input ``<stem>`` the outputs are
``<out>/<stem>.png`` (colour mask in the checkpoint's palette), ``<out>/<stem>_mask.png``
(uint8 train ids), with ``--overlay`` ``<out>/<stem>_overlay.jpg`` and with
``--save-confidence`` ``<out>/<stem>_confidence.png`` (8-bit, round(255 x the largest class
probability averaged over the views)); ``<out>/legend.png``
names the colours (an input named ``legend`` gets a suffix instead). Images found in a
folder keep their sub-folder below ``<out>``; names that would collide get a suffix. The
inference settings are those of ``segnest eval`` (see :mod:`segnest.inference.settings`);
each image is read and predicted by :class:`segnest.inference.predictor.Predictor`, the
class behind ``segnest.load_model``, ``--batch-size`` of them at a time (whole mode: those
of equal working size share a forward pass; slide mode: windows; never padded, so the
masks do not depend on it).

``--out`` may be a sub-folder of an input folder: images below ``--out`` are never read as
inputs. It may not be an input folder itself, nor make an output land in an input folder or
on an input file or the checkpoint (:mod:`segnest.inference.outputs`); that is checked, and
``--out`` created, before the checkpoint is loaded.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from segnest.data.bad_samples import BadSamplePolicy, python_warning
from segnest.data.base import ARRAY_SUFFIX, IMAGE_SUFFIXES
from segnest.errors import SegnestError
from segnest.inference.config import PredictConfig
from segnest.inference.outputs import (
    identities,
    is_within,
    prepare_folder,
    refuse_input_file,
    resolved,
)
from segnest.inference.predictor import Predictor
from segnest.inference.visualize import (
    LEGEND_NAME,
    confidence_image,
    save_jpeg,
    save_legend,
    save_png,
)
from segnest.runtime.console import progress_bar
from segnest.runtime.distributed import resolve_device
from segnest.runtime.precision import resolve_precision
from segnest.schema import FlagNames, validate


def _output_names(stem: Path) -> tuple[Path, Path, Path, Path]:
    """Colour mask, train-id mask, overlay and confidence paths (relative) for one input."""
    return (stem.with_name(stem.name + ".png"), stem.with_name(stem.name + "_mask.png"),
            stem.with_name(stem.name + "_overlay.jpg"),
            stem.with_name(stem.name + "_confidence.png"))


def _written_names(cfg: PredictConfig, stem: Path) -> list[Path]:
    """The outputs this run writes for one input (relative to --out)."""
    color, mask, overlay_name, confidence = _output_names(stem)
    return [color, mask] + [overlay_name] * cfg.overlay + [confidence] * cfg.save_confidence


def collect_images(inputs: Sequence[str | Path],
                   skip: str | Path | None = None) -> list[tuple[Path, Path]]:
    """``(image file, output stem relative to --out)`` for every input image, in order.

    A file given directly is named by its stem; files found in a folder by their path
    relative to that folder. When two inputs would write the same file, the later one gets
    its extension (``photo_png``) and, if needed, a number appended. An input folder that
    holds ``skip`` (the output folder) is read without the files below ``skip``, so that a
    run writing into a sub-folder of its input never reads its own masks back.
    """
    if not inputs:
        raise SegnestError("no inputs given; pass image files or folders, e.g. "
                           "segnest predict photo.jpg --checkpoint best.pt")
    skip_folder = resolved(skip) if skip is not None else None
    found: list[tuple[Path, Path]] = []
    for raw in inputs:
        path = Path(raw)
        if path.is_dir():
            skipped = _below_folder(skip_folder, resolved(path))
            files = sorted(p for p in path.rglob("*")
                           if p.is_file() and p.suffix.lower() in (*IMAGE_SUFFIXES, ARRAY_SUFFIX)
                           and not skipped(p))
            if not files:
                raise SegnestError(
                    f"input folder {path} holds no images ({', '.join(IMAGE_SUFFIXES)}); "
                    "pass a folder with images or the image files themselves"
                )
            found.extend((f, f.relative_to(path).with_suffix("")) for f in files)
        elif path.is_file():
            found.append((path, Path(path.stem)))
        else:
            raise SegnestError(f"input {path} does not exist; pass existing image files or "
                               "folders")
    used: set[Path] = {Path(LEGEND_NAME)}  # save_legend's file, beside the masks
    named: list[tuple[Path, Path]] = []
    for file, stem in found:
        candidate = stem
        if any(name in used for name in _output_names(candidate)):
            candidate = stem.with_name(f"{stem.name}_{file.suffix.lstrip('.').lower()}")
        number = 2
        base = candidate
        while any(name in used for name in _output_names(candidate)):
            candidate = base.with_name(f"{base.name}_{number}")
            number += 1
        used.update(_output_names(candidate))
        named.append((file, candidate))
    return named


def _below_folder(skip: Path | None, scanned: Path) -> Callable[[Path], bool]:
    """Whether a file found in ``scanned`` lies below ``skip``; only a ``skip`` strictly
    inside ``scanned`` can hold such files (parent folders resolved once each)."""
    if skip is None or skip == scanned or not is_within(skip, scanned):
        return lambda file: False
    parents: dict[Path, bool] = {}

    def below(file: Path) -> bool:
        if file.parent not in parents:
            parents[file.parent] = is_within(resolved(file.parent), skip)
        return parents[file.parent]

    return below


def check_outputs(cfg: PredictConfig, images: list[tuple[Path, Path]],
                  written_names: Callable[[Path], list[Path]] | None = None) -> Path:
    """Refuse an --out that would replace or mix with an input; returns --out resolved.
    ``written_names``: the files (relative to --out) written for an output stem, by
    default a segmentation's."""
    written_names = written_names or (lambda stem: _written_names(cfg, stem))
    out = resolved(cfg.out)
    folders = [resolved(raw) for raw in cfg.inputs if Path(raw).is_dir()]
    for folder in folders:
        if out == folder:
            raise SegnestError(
                f"--out {cfg.out} is the input folder {folder}; the masks would be mixed with "
                f"the images; choose another folder, e.g. --out {folder / 'predictions'}"
            )
    inputs = identities({file: f"the input image {file}" for file, _ in images})
    inputs.update(identities({cfg.checkpoint: f"the checkpoint {cfg.checkpoint}"}))
    refuse_input_file(out / LEGEND_NAME, inputs, "--out")
    for _, stem in images:
        for name in written_names(stem):
            target = out / name
            refuse_input_file(target, inputs, "--out")
            for folder in folders:
                # Below --out is never read, so only outputs outside it can pollute an input.
                if is_within(target, folder) and not is_within(out, folder):
                    raise SegnestError(
                        f"--out {cfg.out} would put {target} into the input folder {folder}; "
                        "choose an --out outside that folder or a sub-folder of it"
                    )
    return out


def what_predict_wrote(cfg: PredictConfig, predictor: Predictor, count: int, out: Path) -> str:
    """The closing lines of ``segnest predict``: which file holds what, the legend, the
    classes and the size the images were segmented at."""
    shown = ", ".join(predictor.classes[:12]) + (", ..." if predictor.num_classes > 12 else "")
    files = [f"  <name>.png             colour mask (colours named in {out / LEGEND_NAME})",
             f"  <name>_mask.png        class ids 0-{predictor.num_classes - 1} as grey levels "
             "(looks black in a viewer; read it as an array)"]
    if cfg.overlay:
        files.append("  <name>_overlay.jpg     the colour mask blended over the image")
    if cfg.save_confidence:
        files.append("  <name>_confidence.png  255 x the predicted class's probability")
    return "\n".join([
        f"wrote {count} prediction(s) to {out}:", *files,
        f"the model ({predictor.name}) knows {predictor.num_classes} classes: {shown}",
        f"images were segmented at {predictor.settings.working_size()} and the labels "
        "resized to each image's size (--base-size sets the working size)"])


def readable_images(images: Sequence[tuple[Path, Path]], read: Callable[[Path], Any],
                    bad_images: BadSamplePolicy, bar: Any
                    ) -> Iterator[tuple[tuple[Path, Any], Path]]:
    """``((stem, image read), file)`` for each ``(file, stem)`` of :func:`collect_images`
    that ``read`` can read; the others go to ``bad_images`` (counted on ``bar``)."""
    for file, stem in images:
        try:
            image = read(file)
        except SegnestError as err:
            bad_images.check(str(err), str(file))
            bar.update(1)
            continue
        yield (stem, image), file


def run_predict(cfg: PredictConfig) -> list[Path]:
    """Predict every input image; returns the colour mask paths, one per input."""
    cfg = validate(cfg, FlagNames())  # a command's settings: named as its flags
    resolve_precision(cfg.precision, resolve_device(cfg.device))  # refused before any file
    images = collect_images(cfg.inputs, skip=cfg.out)
    prepare_folder(check_outputs(cfg, images), "--out")
    predictor = Predictor.load(cfg.checkpoint, cfg)
    out = Path(cfg.out)
    written: list[Path] = []
    bar = progress_bar(total=len(images), desc="predict", unit="img")
    bad_images = BadSamplePolicy(cfg.skip_bad_samples, "image(s)", warn=python_warning)

    def readable() -> Iterator[tuple[tuple[Path, np.ndarray], np.ndarray]]:
        for (stem, image), _ in readable_images(images, predictor.read, bad_images, bar):
            yield (stem, image), image

    for (stem, image), mask, confidence in predictor.segment(
            readable(), confidence=cfg.save_confidence):
        color_path, mask_path, overlay_path, confidence_path = (
            out / name for name in _output_names(stem))
        save_png(color_path, predictor.colorize(mask))
        save_png(mask_path, mask)
        if cfg.overlay:
            save_jpeg(overlay_path, predictor.overlay(image, mask))
        if confidence is not None:
            save_png(confidence_path, confidence_image(confidence))
        written.append(color_path)
        bar.update(1)
    bar.close()
    save_legend(out, predictor.classes, predictor.palette)
    print(what_predict_wrote(cfg, predictor, len(written), out))
    if warning := bad_images.summary(bad_images.count):
        print(warning)
    return written
