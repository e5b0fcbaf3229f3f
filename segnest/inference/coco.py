"""COCO results and evaluation for the detection models, with pycocotools as the reference.

:class:`CocoResults` turns each image's detections into COCO result entries as they come
(``bbox`` as [x, y, width, height], the dataset's own category ids, ``score``, and for
mask models ``segmentation`` as compressed RLE). Masks are pasted and encoded one at a
time, so a model's low-resolution mask probabilities never become N full-size masks at
once (:func:`encode_masks`). Under DDP each rank keeps its own images' entries and
:meth:`CocoResults.gather` collects them.

:func:`evaluate_coco` runs pycocotools' COCOeval on the collected entries and returns, in
percent, the 12 standard numbers per IoU type (``AP, AP50, AP75, APs, APm, APl, AR1,
AR10, AR100, ARs, ARm, ARl``) and the per-class AP (AP at IoU 0.50:0.95, all areas,
100 detections, averaged over recall points that are defined: detectron2's table).
A number COCOeval leaves undefined (-1: no ground truth of that size, or of that class)
is ``None``, never a made-up value. :func:`write_coco_results` writes the entries as the
JSON list the COCO evaluation server takes.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from typing import Any

import numpy as np
import torch
from torchvision.models.detection.roi_heads import paste_masks_in_image

from segnest.data.bad_samples import BadSamplePolicy
from segnest.data.coco import require_pycocotools
from segnest.errors import SegnestError
from segnest.runtime.distributed import all_gather_objects
from segnest.runtime.files import write_text_atomic

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl",
              "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
IOU_TYPES = ("bbox", "segm")
MASK_THRESHOLD = 0.5


def encode_masks(mask_probs: torch.Tensor, boxes: torch.Tensor, height: int, width: int,
                 threshold: float = MASK_THRESHOLD) -> list[dict[str, Any]]:
    """Compressed RLEs of the detections' masks at ``height`` x ``width``: each
    low-resolution probability map (N x 1 x M x M) pasted into its box, thresholded and
    encoded before the next, so memory holds one full-size mask at a time."""
    from pycocotools import mask as mask_utils

    encoded = []
    for probability, box in zip(mask_probs, boxes, strict=True):
        pasted = paste_masks_in_image(probability[None], box[None], (height, width))[0, 0]
        binary = (pasted >= threshold).to(torch.uint8).numpy()
        rle = mask_utils.encode(np.asfortranarray(binary))
        rle["counts"] = rle["counts"].decode("ascii")
        encoded.append(rle)
    return encoded


def encode_full_masks(masks: torch.Tensor, threshold: float = MASK_THRESHOLD
                      ) -> list[dict[str, Any]]:
    """Compressed RLEs of full-size mask probabilities (N x 1 x H x W)."""
    from pycocotools import mask as mask_utils

    encoded = []
    for mask in masks:
        binary = (mask[0] >= threshold).to(torch.uint8).numpy()
        rle = mask_utils.encode(np.asfortranarray(binary))
        rle["counts"] = rle["counts"].decode("ascii")
        encoded.append(rle)
    return encoded


class CocoResults:
    """COCO result entries, added image by image (see the module docstring).

    ``category_ids[label - 1]`` is the dataset's id of model label ``label``.
    """

    def __init__(self, category_ids: list[int]) -> None:
        require_pycocotools()
        self.category_ids = list(category_ids)
        self.entries: list[dict[str, Any]] = []
        self.image_ids: list[int] = []

    def add(self, image_id: int, prediction: dict[str, torch.Tensor], height: int,
            width: int) -> None:
        """One image's detections: ``boxes`` (x1, y1, x2, y2 at the image's size),
        ``labels``, ``scores`` and optionally ``mask_probs`` (low resolution, pasted here)
        or ``masks`` (already full size)."""
        self.image_ids.append(int(image_id))
        boxes = prediction["boxes"].detach().float().cpu()
        if "mask_probs" in prediction:
            masks = encode_masks(prediction["mask_probs"].detach().float().cpu(), boxes,
                                 height, width)
        elif "masks" in prediction:
            masks = encode_full_masks(prediction["masks"].detach().float().cpu())
        else:
            masks = None
        xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
        labels = prediction["labels"].tolist()
        scores = prediction["scores"].tolist()
        for number, (box, label, score) in enumerate(zip(xywh, labels, scores, strict=True)):
            entry = {"image_id": int(image_id), "category_id": self.category_ids[label - 1],
                     "bbox": [round(v, 2) for v in box], "score": round(float(score), 5)}
            if masks is not None:
                entry["segmentation"] = masks[number]
            self.entries.append(entry)

    def gather(self) -> None:
        """Collect every rank's entries and image ids on every rank (image order kept)."""
        gathered = all_gather_objects((self.image_ids, self.entries))
        if len(gathered) > 1:
            self.image_ids = [i for ids, _ in gathered for i in ids]
            self.entries = [e for _, entries in gathered for e in entries]

    @property
    def has_masks(self) -> bool:
        return any("segmentation" in entry for entry in self.entries)


@contextlib.contextmanager
def low_resolution_masks(model: torch.nn.Module):
    """Within the block the R-CNN ``model`` returns ``mask_probs`` (the head's 28 x 28
    probabilities) instead of pasting full-size ``masks``."""
    transform = model.transform
    previous = transform.paste_masks
    transform.paste_masks = False
    try:
        yield model
    finally:
        transform.paste_masks = previous


@torch.no_grad()
def collect_coco_results(model: torch.nn.Module, dataset, device: torch.device | str,
                         rank: int = 0, world_size: int = 1,
                         bad_samples: BadSamplePolicy | None = None) -> CocoResults:
    """Run the R-CNN ``model`` (eval mode) over this rank's share of ``dataset`` (a
    ``CocoDetection``: every ``world_size``-th image from ``rank``) and gather every
    rank's results. An image that cannot be read goes to ``bad_samples`` (default: stop);
    a skipped one is not among the results' ``image_ids``, so the evaluation leaves it
    out instead of counting its objects as missed."""
    bad_samples = bad_samples or BadSamplePolicy(skip=False, what="image(s)")
    results = CocoResults(dataset.category_ids)
    was_training = model.training
    model.eval()
    try:
        with low_resolution_masks(model):
            for index in range(rank, len(dataset), world_size):
                try:
                    image, target = dataset[index]
                except SegnestError as err:
                    bad_samples.check(str(err), f"image {index}")
                    continue
                prediction = model([image.to(device)])[0]
                results.add(int(target["image_id"]), prediction, *image.shape[-2:])
    finally:
        model.train(was_training)
    results.gather()
    return results


def write_coco_results(path: str | os.PathLike, entries: list[dict[str, Any]]) -> None:
    """The entries as a COCO results JSON list, written atomically."""
    write_text_atomic(path, json.dumps(entries))


def _percent(value: float) -> float | None:
    return None if value < 0 else round(float(value) * 100, 4)


def _per_class_ap(evaluator, category_names: dict[int, str]) -> dict[str, float | None]:
    # precision: [IoU thresholds, recall points, categories, areas, max detections]
    precision = evaluator.eval["precision"]
    table = {}
    for index, category_id in enumerate(evaluator.params.catIds):
        values = precision[:, :, index, 0, -1]
        defined = values[values > -1]
        table[category_names[category_id]] = (round(float(defined.mean()) * 100, 4)
                                              if defined.size else None)
    return table


def evaluate_coco(annotation_file: str | os.PathLike, entries: list[dict[str, Any]],
                  iou_types: tuple[str, ...], image_ids: list[int] | None = None
                  ) -> dict[str, dict[str, Any]]:
    """COCOeval of ``entries`` against ``annotation_file`` for each IoU type: the 12
    standard numbers and ``per_class`` AP, in percent (None where undefined).
    ``image_ids`` limits the evaluation to those images (all of the file's by default)."""
    require_pycocotools()
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        ground_truth = COCO(str(annotation_file))
    names = {c["id"]: c["name"] for c in ground_truth.loadCats(ground_truth.getCatIds())}
    metrics: dict[str, dict[str, Any]] = {}
    for iou_type in iou_types:
        if iou_type not in IOU_TYPES:
            raise ValueError(f"iou_type must be one of {IOU_TYPES}, got '{iou_type}'")
        usable = [e for e in entries if iou_type == "bbox" or "segmentation" in e]
        with contextlib.redirect_stdout(io.StringIO()):
            detections = (ground_truth.loadRes(entries_for(usable, iou_type))
                          if usable else _empty_results(ground_truth))
            evaluator = COCOeval(ground_truth, detections, iou_type)
            if image_ids is not None:
                evaluator.params.imgIds = sorted(set(image_ids))
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        result: dict[str, Any] = {name: _percent(value)
                                  for name, value in zip(STAT_NAMES, evaluator.stats,
                                                         strict=True)}
        result["per_class"] = _per_class_ap(evaluator, names)
        metrics[iou_type] = result
    return metrics


def entries_for(entries: list[dict[str, Any]], iou_type: str) -> list[dict[str, Any]]:
    """The fields COCOeval should see for ``iou_type``. For ``segm`` the box is dropped:
    given both, ``loadRes`` takes the box area as the instance area and so sorts masks
    into small/medium/large by their boxes (detectron2's COCOEvaluator drops it too, and
    the authors' numbers come from it). For ``bbox`` the mask is dropped (unused)."""
    drop = "bbox" if iou_type == "segm" else "segmentation"
    return [{k: v for k, v in e.items() if k != drop} for e in entries]


def _empty_results(ground_truth):
    """A results object without detections (``loadRes`` refuses an empty list); COCOeval
    then gives 0 where ground truth exists and -1 where it does not, as for any results."""
    from pycocotools.coco import COCO

    empty = COCO()
    empty.dataset = {"images": ground_truth.dataset["images"],
                     "categories": ground_truth.dataset["categories"], "annotations": []}
    empty.createIndex()
    return empty


def headline(metrics: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    """``bbox_AP`` and ``segm_AP`` (those evaluated), the top-level keys of metrics.json."""
    return {f"{iou_type}_AP": values["AP"] for iou_type, values in metrics.items()}


def format_table(metrics: dict[str, dict[str, Any]]) -> str:
    """The 12 numbers per IoU type and the per-class AP, as a Markdown table."""
    def show(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.2f}"

    lines = ["| type | " + " | ".join(STAT_NAMES) + " |",
             "|" + "---|" * (len(STAT_NAMES) + 1)]
    for iou_type, values in metrics.items():
        lines.append(f"| {iou_type} | " + " | ".join(show(values[n]) for n in STAT_NAMES) + " |")
    types = list(metrics)
    lines += ["", "| class | " + " | ".join(f"{t} AP" for t in types) + " |",
              "|---|" + "---|" * len(types)]
    for name in metrics[types[0]]["per_class"]:
        lines.append(f"| {name} | " + " | ".join(show(metrics[t]["per_class"][name])
                                                 for t in types) + " |")
    return "\n".join(lines)
