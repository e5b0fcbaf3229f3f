"""``segnest eval`` of a classification checkpoint (``segnest pretrain``): top-1 and top-5
accuracy and a per-class accuracy table on an image folder.

The folder has one sub-folder per class, the layout pretraining reads: ``--data-root``
holding ``<split>/<class>/*.jpg`` (``--split``, default val), or the class folders
themselves. Without ``--data-root`` the folder the run trained on (its ``data_root``, the
bundled set for ``--dataset mini``). Classes are matched to the model's by name, so the
folder may hold any subset of them in any order; a class folder the model does not know is
refused with one line, as every accuracy would otherwise be computed against a wrong label.
Images are prepared exactly as :class:`~segnest.inference.classification.ClassifierPredictor`
(what ``segnest predict`` and ``load_model`` run) prepares them; under torchrun each process
takes every N-th image and the counts are summed.

``metrics.json`` (top-level ``top1``, ``top5``, ``mean_class_top1`` in percent, then
``per_class``) and ``metrics.md`` go to ``--out`` (default ``<checkpoint folder>/eval_<split>``),
written atomically; ``--out`` may not be, lie in or contain the image folder.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Subset
from torchvision import datasets

from segnest.data.bad_samples import BadSamplePolicy, GuardedSamples, collate_guarded
from segnest.data.base import IMAGE_SUFFIXES, open_rgb_image
from segnest.data.mini import ensure_mini_classification
from segnest.errors import SegnestError
from segnest.inference.classification import ClassifierPredictor
from segnest.inference.config import EvalConfig
from segnest.inference.outputs import prepare_folder, refuse_overlap, resolved
from segnest.inference.tensorboard import eval_run_name
from segnest.runtime.checkpoint import load_checkpoint
from segnest.runtime.distributed import init_distributed
from segnest.runtime.files import write_text_atomic
from segnest.runtime.threads import threads_beside_workers
from segnest.schema import FlagNames, validate
from segnest.tasks.classification.task import accuracy, count_hits

LAYOUT = "<folder>/<class>/*.jpg (or <folder>/<split>/<class>/*.jpg)"


class ModelLabels:
    """Folder class index -> the model's class index (a picklable target transform)."""

    def __init__(self, mapping: list[int]) -> None:
        self.mapping = mapping

    def __call__(self, index: int) -> int:
        return self.mapping[index]


def image_folder(cfg: EvalConfig, checkpoint: dict[str, Any]) -> Path:
    """The folder of class sub-folders to evaluate on (see the module docstring)."""
    config = checkpoint.get("config") or {}
    if cfg.data_root:
        root = Path(cfg.data_root).expanduser()
    elif config.get("dataset") == "mini":
        root = ensure_mini_classification()
    elif config.get("data_root") or config.get("data"):  # segnest 0.1 wrote "data"
        root = Path(config.get("data_root") or config["data"])
    else:
        raise SegnestError(f"{cfg.checkpoint} does not record the folder it was trained on; "
                           f"pass --data-root (layout {LAYOUT})")
    if not root.is_dir():
        raise SegnestError(f"image folder {root} not found; pass --data-root with the layout "
                           f"{LAYOUT}")
    return root / cfg.split if (root / cfg.split).is_dir() else root


def folder_classes(folder: Path) -> list[str]:
    """The class sub-folders of ``folder`` (sorted, as pretraining lists them); one line
    when there are none."""
    classes = sorted(entry.name for entry in folder.iterdir() if entry.is_dir())
    if classes:
        return classes
    loose = any(p.suffix.lower() in IMAGE_SUFFIXES for p in folder.iterdir())
    found = "holds images but no class sub-folders" if loose else "holds no class sub-folders"
    raise SegnestError(f"{folder} {found}; classification eval needs one sub-folder per class, "
                       f"named as the model's classes: {LAYOUT}")


def model_labels(listed: list[str], trained: list[str], folder: Path, source: str) -> list[int]:
    """The model's class index of each class folder, matched by name."""
    unknown = [name for name in listed if name not in trained]
    if unknown:
        shown = ", ".join(unknown[:5]) + (" ..." if len(unknown) > 5 else "")
        known = ", ".join(trained[:8]) + (" ..." if len(trained) > 8 else "")
        raise SegnestError(
            f"{folder} has {len(unknown)} class folder(s) that {source} was not trained on "
            f"({shown}); its {len(trained)} classes are {known}; remove those folders or "
            "rename them to the model's class names")
    return [trained.index(name) for name in listed]


def class_table(counts: torch.Tensor, classes: list[str], k: int) -> tuple[list[dict], str]:
    """Per-class rows (classes with images only) and the printed table."""
    rows = [{"class": name, "images": int(total), "top1": 100.0 * hits1 / total,
             f"top{k}": 100.0 * hitsk / total}
            for name, (hits1, hitsk, total) in zip(classes, counts.tolist(), strict=True)
            if total > 0]
    width = max([len("class"), *(len(row["class"]) for row in rows)])
    lines = [f"| {'class':<{width}} | images |  top-1 |  top-{k} |",
             f"|{'-' * (width + 2)}|-------:|-------:|-------:|"]
    lines += [f"| {row['class']:<{width}} | {row['images']:>6} | {row['top1']:6.2f} | "
              f"{row[f'top{k}']:6.2f} |" for row in rows]
    return rows, "\n".join(lines)


def run_classification_eval(cfg: EvalConfig) -> dict[str, Any]:
    """``segnest eval`` of a ``segnest pretrain`` checkpoint; returns the metrics written to
    metrics.json."""
    cfg = validate(cfg, FlagNames())
    checkpoint = load_checkpoint(cfg.checkpoint)
    source = str(cfg.checkpoint)
    folder = image_folder(cfg, checkpoint)
    listed = folder_classes(folder)
    out_dir = resolved(cfg.out) if cfg.out else (
        Path(cfg.checkpoint).resolve().parent / eval_run_name(cfg.split, False, False))
    refuse_overlap(out_dir, {resolved(folder): "the image folder"}, "--out")
    info = init_distributed(cfg.device)
    predictor = ClassifierPredictor.from_checkpoint(
        checkpoint, source, str(info.device), fuse_bn=cfg.fuse_bn, compile=cfg.compile,
        precision=cfg.precision)
    labels = model_labels(listed, predictor.classes, folder, source)
    dataset = datasets.ImageFolder(str(folder), transform=predictor.transform,
                                   target_transform=ModelLabels(labels), loader=open_rgb_image,
                                   allow_empty=True)
    if not len(dataset):
        raise SegnestError(f"{folder} holds no images in its class folders "
                           f"({', '.join(IMAGE_SUFFIXES)}); layout {LAYOUT}")
    prepare_folder(out_dir, "--out")
    count = len(dataset) if cfg.samples is None else min(cfg.samples, len(dataset))
    shard = Subset(dataset, range(info.rank, count, info.world_size))
    loader = DataLoader(GuardedSamples(shard), batch_size=cfg.batch_size, shuffle=False,
                        num_workers=cfg.workers, collate_fn=collate_guarded)
    bad_images = BadSamplePolicy(cfg.skip_bad_samples, "image(s)", show=info.is_main)
    with threads_beside_workers(info.device, cfg.workers):
        counts = count_hits(predictor.model, loader, info.device, predictor.num_classes,
                            bad_samples=bad_images).cpu()
    skipped = bad_images.total(info.device)
    k = min(5, predictor.num_classes)
    rows, table = class_table(counts, predictor.classes, k)
    present = [row["top1"] for row in rows]
    metrics = {**accuracy(counts), "mean_class_top1": sum(present) / len(present)
               if present else math.nan, "per_class": rows}
    if not present:
        raise SegnestError(f"every image of {folder} was skipped as unreadable; nothing "
                           "was evaluated")
    if not info.is_main:
        return metrics
    headline = (f"top-1 {metrics['top1']:.2f}%  top-{k} {metrics['top5']:.2f}%  mean class "
                f"top-1 {metrics['mean_class_top1']:.2f}%")
    print(table)
    print(headline)
    print(f"{folder}: {int(counts[:, 2].sum())} images of {len(rows)} of the model's "
          f"{predictor.num_classes} classes, {predictor.crop[0]} px centre crop, "
          f"{info.world_size} x {info.device}")
    if warning := bad_images.summary(skipped):
        print(warning)
    payload = {**metrics, "top_k": k, "images": int(counts[:, 2].sum()),
               "skipped_samples": skipped, "checkpoint": str(Path(cfg.checkpoint).resolve()),
               "model": predictor.name, "iteration": checkpoint.get("iteration"),
               "data_root": str(resolved(folder)), "split": cfg.split, "samples": cfg.samples,
               "device": str(info.device), "world_size": info.world_size,
               "precision": cfg.precision}
    write_text_atomic(out_dir / "metrics.json",
                      json.dumps(payload, indent=2, allow_nan=False, default=str) + "\n")
    write_text_atomic(out_dir / "metrics.md", f"{table}\n\n{headline}\n")
    print(f"metrics written to {out_dir / 'metrics.json'}")
    return metrics
