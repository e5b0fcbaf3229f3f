"""Evaluating a detection checkpoint (:func:`run_detection_eval`, for ``segnest eval`` to
call on a checkpoint whose task is detection): COCO AP on the validation set the run
used (or another in COCO layout with ``--data-root``), ``metrics.json``/``metrics.md``
in ``--out``, and with ``--save-pred`` the COCO results JSON the evaluation server takes.

``metrics.json`` holds ``bbox_AP`` (and ``segm_AP`` for mask models) at its top level,
in percent, then per IoU type the 12 standard numbers and the per-class AP; a number
COCOeval leaves undefined is null.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from segnest.data.bad_samples import BadSamplePolicy
from segnest.data.coco import CocoDetection, CocoSource, coco_source
from segnest.errors import SegnestError
from segnest.inference.coco import (
    collect_coco_results,
    evaluate_coco,
    format_table,
    headline,
    write_coco_results,
)
from segnest.models.factory import model_from_checkpoint
from segnest.runtime.distributed import DistInfo, broadcast_object, init_distributed
from segnest.runtime.files import write_text_atomic
from segnest.runtime.record import CheckpointRecord


def evaluate_detection(model: nn.Module, dataset: CocoDetection, device: torch.device,
                       dist: DistInfo, samples: int | None = None,
                       bad_samples: BadSamplePolicy | None = None
                       ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """COCO metrics (``bbox_AP``/``segm_AP`` at the top, the 12 numbers and per-class AP
    under ``bbox``/``segm``) and the result entries, over every image or the first
    ``samples`` (those ``bad_samples`` skipped left out); evaluated once on rank 0 and
    shared."""
    if samples is not None:
        dataset = _first_images(dataset, samples)
    results = collect_coco_results(model, dataset, device, dist.rank, dist.world_size,
                                   bad_samples)
    metrics = None
    if dist.is_main:
        iou_types = ("bbox", "segm") if model.has_masks else ("bbox",)
        per_type = evaluate_coco(dataset.source.annotations, results.entries, iou_types,
                                 image_ids=[int(i) for i in results.image_ids])
        metrics = {**headline(per_type), **per_type}
    return broadcast_object(metrics), results.entries


def _first_images(dataset: CocoDetection, count: int) -> CocoDetection:
    subset = CocoDetection.__new__(CocoDetection)
    subset.__dict__.update(dataset.__dict__)
    subset.images = dataset.images[:count]
    return subset


def evaluation_source(checkpoint: dict[str, Any], data_root: str | None, split: str,
                      source: str) -> CocoSource:
    """The validation annotations the run recorded, or ``split`` under ``data_root``."""
    if data_root:
        return coco_source(data_root, split)
    record = CheckpointRecord.read(checkpoint)
    recorded = record.val_annotations, record.val_images
    if not all(recorded):
        raise SegnestError(f"{source} records no validation set; pass --data-root (a folder "
                           "in COCO layout)")
    return coco_source(annotations=recorded[0], images=recorded[1])


def run_detection_eval(checkpoint: dict[str, Any], checkpoint_path: str, out: str | None,
                       save_pred: str | None, device: str | None = None,
                       data_root: str | None = None, split: str = "val",
                       samples: int | None = None, skip_bad_samples: bool = False
                       ) -> dict[str, Any]:
    """Evaluate a detection checkpoint; returns the metrics written to metrics.json."""
    model = model_from_checkpoint(checkpoint, source=checkpoint_path, task="detection")
    source = evaluation_source(checkpoint, data_root, split, checkpoint_path)
    dataset = CocoDetection(source)
    record = CheckpointRecord.read(checkpoint)
    if dataset.category_ids != (record.category_ids or dataset.category_ids):
        raise SegnestError(f"{source.annotations} has other categories than {checkpoint_path} "
                           "was trained on; evaluate on a set with the same 'categories'")
    out_dir = Path(out or Path(checkpoint_path).with_suffix("").parent / "eval")
    info = init_distributed(device)
    bad_images = BadSamplePolicy(skip_bad_samples, "image(s)", show=info.is_main)
    metrics, entries = evaluate_detection(model.to(info.device), dataset, info.device, info,
                                          samples, bad_images)
    skipped = bad_images.total(info.device)
    if not info.is_main:
        return metrics
    per_type = {k: v for k, v in metrics.items() if k in ("bbox", "segm")}
    print(format_table(per_type))
    payload = {**metrics, "checkpoint": str(Path(checkpoint_path).resolve()),
               "iteration": record.iteration, "annotations": str(source.annotations),
               "images": (len(dataset) if samples is None else min(samples, len(dataset)))
               - skipped, "skipped_samples": skipped,
               "device": str(info.device), "world_size": info.world_size}
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out_dir / "metrics.json", json.dumps(payload, indent=2) + "\n")
    write_text_atomic(out_dir / "metrics.md", format_table(per_type) + "\n")
    if save_pred:
        write_coco_results(save_pred, entries)
        print(f"wrote {len(entries)} detections to {save_pred}")
    if warning := bad_images.summary(skipped):
        print(warning)
    print(f"metrics in {out_dir / 'metrics.json'}")
    return metrics
