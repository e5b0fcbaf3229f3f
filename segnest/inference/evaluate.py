"""Evaluation: one routine (``evaluate``) for ``segnest eval`` and for training's validation.

Each image is evaluated at its original resolution: the inference strategy
(:mod:`segnest.inference.strategies`, settings from :mod:`segnest.inference.settings`)
resizes it, averages the views at their working resolution and makes the labels at the
image's size band by band (memory bounded by the working resolution); they go into one
dataset-level confusion matrix (summed over all ranks; see :mod:`segnest.inference.metrics`
for the metric conventions). ``--batch-size`` images of equal working size (whole mode) or
windows (slide mode) share a forward pass; images are never padded, so the metrics do not
depend on it.

``segnest eval`` and ``predict`` run the checkpoint's model with its batch norms folded into
the convolutions (``--no-fuse-bn`` turns that off) and, with ``--compile``, compiled with
frozen weights (:func:`segnest.inference.strategies.inference_model`).

``--save-pred`` holds exactly the label files a benchmark reads (see ``prediction_path``);
their coloured previews go to the sibling folder ``<save-pred>_color`` with the same
relative names, and with ``--save-confidence`` the confidence maps (8-bit, round(255 x the
largest class probability averaged over the views)) to ``<save-pred>_confidence``, also with
the same relative names. TensorBoard: each evaluation setting is a run of its own,
``tb/eval_<split>[_ms][_flip]`` beside the training run or in ``--out``
(:mod:`segnest.inference.tensorboard`). Before evaluating, ``segnest eval`` refuses a
metrics folder (``--out``) or ``--save-pred`` that is, lies in or contains the dataset's
image or ground-truth folders (:mod:`segnest.inference.outputs`), or a metrics folder inside
``--save-pred``, and creates the folders, so that a location it cannot write fails at once.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from segnest.data import Cityscapes, build_dataset, recorded_data_root
from segnest.data.bad_samples import (
    BadSample,
    BadSamplePolicy,
    python_warning,
    skipped_warning,
)
from segnest.data.census import take_census, unknown_colours_warning
from segnest.errors import SegnestError
from segnest.inference.backends import is_exported_model, load_exported_model
from segnest.inference.config import EvalConfig
from segnest.inference.metrics import (
    ConfusionMatrix,
    format_table,
    metric_warnings,
    save_results,
)
from segnest.inference.outputs import (
    dataset_folders,
    is_within,
    prepare_folder,
    refuse_overlap,
    resolved,
)
from segnest.inference.settings import InferenceSettings
from segnest.inference.strategies import inference_model, segment
from segnest.inference.tensorboard import (
    HEADLINE_METRICS,
    METRIC_TAGS,
    eval_run_name,
    log_config,
    log_hparams,
    log_results_card,
    log_segmentation_results,
    run_dir,
    segmentation_hparams,
    session_name,
    write_run_atomically,
)
from segnest.inference.visualize import (
    LEGEND_NAME,
    colorize,
    confidence_image,
    denormalize,
    display_rgb,
    make_panel,
    save_legend,
    save_png,
)
from segnest.models import model_from_checkpoint
from segnest.runtime.checkpoint import load_checkpoint
from segnest.runtime.console import progress_bar
from segnest.runtime.distributed import (
    all_reduce_sum,
    get_rank,
    get_world_size,
    init_distributed,
)
from segnest.runtime.precision import precision_name, resolve_precision
from segnest.runtime.record import CheckpointRecord
from segnest.runtime.threads import threads_beside_workers
from segnest.schema import FlagNames, validate

EVAL_PANELS = 4


# ---------------------------------------------------------------------------- evaluation


class ForwardTimer:
    """Calls the model and adds up the wall time spent inside its forward passes.

    On CUDA the device is synchronised around each call, so asynchronous kernels are
    counted in the forward time and not in whatever runs next.
    """

    def __init__(self, model: nn.Module | Any, device: torch.device) -> None:
        self.model = model
        self.sync = device.type == "cuda"
        self.seconds = 0.0
        self.calls = 0

    def __call__(self, x: torch.Tensor) -> Any:
        if self.sync:
            torch.cuda.synchronize(x.device)
        start = time.perf_counter()
        out = self.model(x)
        if self.sync:
            torch.cuda.synchronize(x.device)
        self.seconds += time.perf_counter() - start
        self.calls += 1
        return out


class _EvalSamples(Dataset):
    """This rank's share of the dataset as (index, display image uint8, model input,
    mask, error). The model input is the image file's array when the dataset can ``load``
    it (normalized and resized by the inference strategy), else the item's normalized
    tensor.

    Loading errors travel as data (:class:`~segnest.data.bad_samples.BadSample`), so that
    DataLoader workers do not die on a bad file and the main process decides whether to
    skip it (:class:`~segnest.data.bad_samples.BadSamplePolicy`).
    """

    def __init__(self, dataset: Any, indices: Sequence[int], mean: Sequence[float],
                 std: Sequence[float]) -> None:
        self.dataset = dataset
        self.indices = list(indices)
        self.mean, self.std = mean, std

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> tuple:
        index = self.indices[position]
        try:
            if hasattr(self.dataset, "load"):
                image, mask = self.dataset.load(index)
                tensor = image
                target = torch.from_numpy(np.ascontiguousarray(mask)).long()
                image = display_rgb(image)
            else:
                item = self.dataset[index]
                tensor, target = item["image"], item["mask"]
                image = display_rgb(denormalize(tensor, self.mean, self.std))
        except SegnestError as err:
            return BadSample(index, str(err))
        return index, image, tensor, target


def _single(batch: list) -> Any:
    return batch[0]


def _sample_name(dataset: Any, index: int) -> str:
    return dataset.name(index) if hasattr(dataset, "name") else f"{index:06d}"


def prediction_path(dataset: Any, index: int) -> Path:
    """Where the prediction of sample ``index`` goes, relative to ``--save-pred``.

    Cityscapes keeps the benchmark's ``<city>/<city>_<seq>_<frame>_leftImg8bit.png``
    naming (the server matches ``<city>_<seq>_<frame>*.png``); other datasets use the
    sample name (ADE20K: the image stem, as the scene-parsing benchmark expects).
    """
    name = _sample_name(dataset, index)
    if isinstance(dataset, Cityscapes):
        return Path(f"{name}_leftImg8bit.png")
    return Path(f"{name}.png")


def preview_folder(save_pred: str | os.PathLike) -> Path:
    """Where the coloured previews of ``--save-pred`` go: the sibling ``<name>_color``.

    Not inside ``--save-pred``: the Cityscapes evaluator globs every PNG below the
    prediction folder and needs exactly one per ground-truth file, and a benchmark server
    takes the folder as it is.
    """
    root = resolved(save_pred)
    return root.with_name(root.name + "_color")


def confidence_folder(save_pred: str | os.PathLike) -> Path:
    """Where ``--save-confidence`` writes: the sibling ``<name>_confidence`` of
    ``--save-pred``, for the same reason as :func:`preview_folder`."""
    root = resolved(save_pred)
    return root.with_name(root.name + "_confidence")


def _save_prediction(dataset: Any, index: int, pred: np.ndarray, root: Path,
                     previews: Path, confidence: torch.Tensor | None) -> None:
    relative = prediction_path(dataset, index)
    if hasattr(dataset, "to_label_file"):
        labels = dataset.to_label_file(pred)
    else:
        labels = pred.astype(np.uint8 if pred.max(initial=0) <= 255 else np.uint16)
    save_png(root / relative, np.ascontiguousarray(labels))
    save_png(previews / relative, colorize(pred, dataset.palette, dataset.ignore_index))
    if confidence is not None:
        save_png(confidence_folder(root) / relative, confidence_image(confidence))


def evaluate(
    model: nn.Module | Any,
    dataset: Any,
    settings: InferenceSettings,
    device: torch.device | str,
    *,
    samples: int | None = None,
    panels: int = 0,
    save_pred: str | Path | None = None,
    progress: bool = True,
    keep_bar: bool = True,
    skip_bad_samples: bool = False,
    workers: int = 0,
    batch_size: int = 1,
    save_confidence: bool = False,
) -> tuple[dict[str, Any], list[np.ndarray]]:
    """Metrics of ``model`` on ``dataset`` (its first ``samples`` images, default all).

    Under torch.distributed, rank ``r`` evaluates the indices ``i = r (mod world)`` and the
    confusion matrix is summed over ranks, so every rank returns the same metrics. Returns
    the metrics (``ConfusionMatrix.compute`` plus ``timing`` and ``skipped_samples``) and up
    to ``panels`` image | ground truth | prediction panels of this rank's first images.
    ``dataset`` needs ``load(i)`` (or items with normalized ``image`` and ``mask``),
    ``num_classes``, ``palette`` and ``ignore_index``; ``workers`` load images in parallel.
    ``batch_size`` is that of :func:`segnest.inference.strategies.segment` (the results
    do not depend on it); ``save_confidence`` writes confidence maps beside ``save_pred``
    (:func:`confidence_folder`). ``keep_bar=False`` clears the finished bar (a
    validation inside training, whose own bar and result line follow).
    """
    device = torch.device(device)
    rank, world = get_rank(), get_world_size()
    count = len(dataset) if samples is None else min(int(samples), len(dataset))
    indices = range(rank, count, world)
    num_classes = int(dataset.num_classes)
    ignore_index = int(getattr(dataset, "ignore_index", 255))
    matrix = ConfusionMatrix(num_classes, ignore_index=ignore_index, device=device)
    timer = ForwardTimer(model, device)
    out_root = Path(save_pred) if save_pred is not None else None
    previews = preview_folder(save_pred) if save_pred is not None else None
    loader = DataLoader(_EvalSamples(dataset, indices, settings.mean, settings.std),
                        batch_size=1, shuffle=False, num_workers=workers, collate_fn=_single)
    built_panels: list[np.ndarray] = []
    bad_samples = BadSamplePolicy(skip_bad_samples, warn=python_warning)
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    start = time.perf_counter()
    try:
        with torch.inference_mode():
            bar = progress_bar(loader, desc="eval", unit="img", leave=keep_bar,
                               enabled=progress and rank == 0)

            def readable() -> Iterator[tuple[tuple, Any]]:
                for item in bar:
                    if isinstance(item, BadSample):
                        bad_samples.check(item.error, f"sample {item.index}")
                        continue
                    index, image, model_input, target = item
                    yield (index, image, target), model_input

            for (index, image, target), pred, confidence in segment(
                    timer, readable(), num_classes, settings, batch_size=batch_size,
                    confidence=save_confidence and out_root is not None, device=device):
                matrix.update(pred.to(device, non_blocking=True),
                              target.to(device, non_blocking=True))
                if len(built_panels) < panels or out_root is not None:
                    pred_np = pred.numpy()
                    if len(built_panels) < panels:
                        built_panels.append(make_panel(image, target.numpy(), pred_np,
                                                       dataset.palette, ignore_index,
                                                       class_names=dataset.classes))
                    if out_root is not None:
                        _save_prediction(dataset, index, pred_np, out_root, previews,
                                         confidence)
            bar.close()
    finally:
        if was_training and hasattr(model, "train"):
            model.train()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    total = time.perf_counter() - start

    matrix.all_reduce()
    results = matrix.compute()
    # The slowest rank sets the wall time; its forward share stays below its own total.
    spent = torch.tensor([total, timer.seconds], dtype=torch.float64, device=device)
    if world > 1:
        torch.distributed.all_reduce(spent, op=torch.distributed.ReduceOp.MAX)
    skipped = bad_samples.total(device)
    images = int(all_reduce_sum(torch.tensor([len(indices)], device=device))[0]) - skipped
    total_s, forward_s = (float(v) for v in spent.cpu())
    results["timing"] = {
        "total_s": total_s,
        "forward_s": forward_s,
        "images": images,
        "forward_calls": timer.calls,
        "total_over_forward": total_s / forward_s if forward_s > 0 else None,
    }
    results["skipped_samples"] = skipped
    return results, built_panels


# ---------------------------------------------------------------------------- command


def _run_name(cfg: EvalConfig, settings: InferenceSettings) -> str:
    return eval_run_name(cfg.split, len(settings.scales) > 1, settings.flip)


def _default_out_dir(cfg: EvalConfig, settings: InferenceSettings) -> Path:
    return Path(cfg.checkpoint).resolve().parent / _run_name(cfg, settings)


def _tensorboard_run(cfg: EvalConfig, settings: InferenceSettings) -> Path:
    """``<out>/tb/<run>`` with ``--out``, else ``<checkpoint folder>/tb/<run>``: beside the
    training run when the checkpoint is in its work folder (see
    :mod:`segnest.inference.tensorboard`)."""
    root = resolved(cfg.out) if cfg.out else Path(cfg.checkpoint).resolve().parent
    return run_dir(root, _run_name(cfg, settings))


def _prepare_outputs(cfg: EvalConfig, out_dir: Path, dataset: Any) -> None:
    """Refuse outputs in the dataset or a metrics folder inside --save-pred; create them."""
    data = dataset_folders(dataset)
    refuse_overlap(out_dir, data, "--out")
    if cfg.save_pred:
        folders = {"--save-pred": resolved(cfg.save_pred),
                   "--save-pred's colour previews": preview_folder(cfg.save_pred)}
        if cfg.save_confidence:
            folders["--save-confidence's maps"] = confidence_folder(cfg.save_pred)
        for role, folder in folders.items():
            refuse_overlap(folder, data, role)
            if is_within(out_dir, folder):
                raise SegnestError(
                    f"--out {out_dir} lies in {folder}, which must hold only predictions; "
                    "choose a metrics folder outside --save-pred"
                )
        for role, folder in folders.items():
            prepare_folder(folder, role)
    prepare_folder(out_dir, "--out")


def check_same_classes(trained: Sequence[str] | None, dataset: Any, source: str) -> None:
    """Refuse a dataset whose class list differs from the one the model was trained on
    (names and order): every IoU would be printed under another class's name. A model
    that records no class names has nothing to compare."""
    if not trained:
        return
    trained, listed = [str(name) for name in trained], [str(name) for name in dataset.classes]
    if trained == listed:
        return
    where = getattr(dataset, "classes_path", None) or f"the {type(dataset).__name__} dataset"
    if len(trained) != len(listed):
        raise SegnestError(
            f"{source} was trained on {len(trained)} classes but {where} lists {len(listed)}; "
            "evaluate on data labelled with the model's classes")
    index = next(i for i, (a, b) in enumerate(zip(trained, listed, strict=True)) if a != b)
    order = (" (the same names in another order)" if sorted(trained) == sorted(listed)
             else "")
    raise SegnestError(
        f"{source} was trained on other classes than {where} lists{order}: class {index} is "
        f"{trained[index]!r} in the model but {listed[index]!r} in the dataset, so every IoU "
        f"would carry the wrong name; list the classes as the model has them "
        f"({', '.join(trained[:8])}{' ...' if len(trained) > 8 else ''}) with the masks "
        "using those ids")


def _colour_mask_warnings(dataset: Any) -> list[str]:
    """Colour masks turn pixels of colours no class has into ignore, so the metrics would
    cover a subset of the pixels (anti-aliased edges, JPEG damage); the label census
    (cached, as training's) counts them."""
    if getattr(dataset, "mask_colours", None) is None:
        return []
    census = take_census(dataset)
    return [unknown_colours_warning(census)] if census.unknown_colours else []


def _trained_lr(checkpoint: dict[str, Any]) -> dict[str, float]:
    """``{"lr": base lr}`` the checkpoint's run trained with (its scheduler's, which holds
    the default the run computed when no --lr was given), or nothing when not recorded."""
    base = (CheckpointRecord.read(checkpoint).scheduler or {}).get("base_lrs")
    return {"lr": float(base[0])} if base else {}


def run_eval(cfg: EvalConfig) -> dict[str, Any]:
    """``segnest eval``: metrics of a checkpoint; writes metrics.json/metrics.md, TensorBoard
    logs and (with ``--save-pred``) prediction PNGs. Returns the metrics."""
    cfg = validate(cfg, FlagNames())  # a command's settings: named as its flags
    if is_exported_model(cfg.checkpoint):
        # An ONNX or OpenVINO export: its metadata stands in for the checkpoint.
        model, checkpoint = load_exported_model(cfg.checkpoint, precision=cfg.precision,
                                                device=cfg.device, compile=cfg.compile)
    else:
        checkpoint = load_checkpoint(cfg.checkpoint)
        model = model_from_checkpoint(checkpoint, source=str(cfg.checkpoint))
    record = CheckpointRecord.read(checkpoint)
    trained_dataset = record.dataset
    dataset_name = cfg.dataset or trained_dataset
    if not dataset_name:
        raise SegnestError(
            f"checkpoint {cfg.checkpoint} does not name its dataset; pass --dataset"
        )
    data_root = cfg.data_root
    if data_root is None and dataset_name == trained_dataset and record.trained("data_root"):
        data_root = str(recorded_data_root(record.trained("data_root"), cfg.checkpoint,
                                           record.trained("work_dir")))
    settings = InferenceSettings.from_flags(cfg, checkpoint, dataset_name)
    info = init_distributed(cfg.device)
    precision = resolve_precision(cfg.precision, info.device)
    # Masks of the dataset trained on are read with the label map training used.
    label_map = None
    if dataset_name == trained_dataset:
        label_map = record.trained("label_map")
    in_channels = record.in_channels
    dataset = build_dataset(dataset_name, data_root, cfg.split, label_map=label_map,
                            in_channels=in_channels)
    check_same_classes(record.classes, dataset, f"checkpoint {cfg.checkpoint}")
    data_warnings = _colour_mask_warnings(dataset)
    out_dir = resolved(cfg.out) if cfg.out else _default_out_dir(cfg, settings)
    _prepare_outputs(cfg, out_dir, dataset)
    runner = (model if "exported" in checkpoint else
              inference_model(model.to(info.device), fuse=cfg.fuse_bn, compile=cfg.compile,
                              precision=precision))

    with threads_beside_workers(info.device, cfg.workers):
        results, panels = evaluate(
            runner, dataset, settings, info.device, samples=cfg.samples,
            panels=EVAL_PANELS if info.is_main else 0, save_pred=cfg.save_pred,
            progress=True, workers=cfg.workers, skip_bad_samples=cfg.skip_bad_samples,
            batch_size=cfg.batch_size, save_confidence=cfg.save_confidence,
        )
    if info.is_main:
        timing = results["timing"]
        results["warnings"] = data_warnings + metric_warnings(results, dataset.classes)
        print(format_table(results, dataset.classes))
        for warning in results["warnings"]:
            print(f"warning: {warning}")
        print(
            f"{dataset_name} {cfg.split}: {timing['images']} images, {settings.describe()}; "
            f"{timing['total_s']:.1f} s total, "
            f"{timing['forward_s']:.1f} s in forward passes"
        )
        extra = {
            "checkpoint": str(Path(cfg.checkpoint).resolve()),
            **({"exported": record.exported} if record.exported is not None else {}),
            "iteration": record.iteration,
            "dataset": dataset_name,
            "data_root": str(dataset.root) if hasattr(dataset, "root") else data_root,
            "split": cfg.split,
            "samples": cfg.samples,
            "inference": asdict(settings),
            "device": str(info.device),
            "world_size": info.world_size,
            "precision": precision_name(precision),
        }
        json_path, _ = save_results(results, dataset.classes, out_dir, extra=extra)
        step = int(record.iteration or 0)

        tensorboard_run = _tensorboard_run(cfg, settings)

        def fill(writer: Any) -> None:
            log_config(writer, {**asdict(cfg), **extra}, step)
            log_segmentation_results(writer, results, dataset.classes, dataset.palette,
                                     panels, step)
            log_results_card(writer, f"{tensorboard_run.name} ({settings.describe()}, "
                             f"iteration {step})", results, step)
            evaluation = {**extra, **_trained_lr(checkpoint)}
            log_hparams(writer, segmentation_hparams(record.config, evaluation),
                        [tag for tag, key in zip(METRIC_TAGS, HEADLINE_METRICS, strict=True)
                         if not math.isnan(results[key])],
                        name=session_name(tensorboard_run.name.replace("_", " "),
                                          Path(cfg.checkpoint).resolve().parent))

        write_run_atomically(tensorboard_run, fill)
        if skipped := skipped_warning(results["skipped_samples"]):
            print(skipped)
        print(f"metrics written to {json_path}; TensorBoard run {tensorboard_run}")
        if cfg.save_pred:
            previews = preview_folder(cfg.save_pred)
            if any(prediction_path(dataset, i) == Path(LEGEND_NAME) for i in range(len(dataset))):
                print(f"warning: no {LEGEND_NAME} in {previews}: a sample's preview has that name")
            else:
                save_legend(previews, dataset.classes, dataset.palette)
            print(f"predictions written to {cfg.save_pred}, coloured previews to "
                  f"{preview_folder(cfg.save_pred)}")
            if cfg.save_confidence:
                print(f"confidence maps written to {confidence_folder(cfg.save_pred)}")
    return results
