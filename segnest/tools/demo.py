"""``segnest demo``: the whole pipeline on the bundled mini data, in minutes, on a CPU.

Four stages, each an ordinary segnest command run in-process with the mini recipe:
generate the data, pretrain a small ResNeSt on the mini classification set, train
DeepLabV3 from it on the mini segmentation set, evaluate with multi-scale + flip. Every
stage resumes from its work folder, so running the demo again after Ctrl-C continues
where it stopped. ``--task detection`` trains Mask R-CNN-ResNeSt-14 on the mini detection
set instead and reports its COCO box and mask AP (:func:`run_detection_demo`).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from segnest.commands.config import resolve_config
from segnest.data.mini import (
    MINI_CLASSES,
    ensure_mini_classification,
    ensure_mini_detection,
    ensure_mini_segmentation,
)
from segnest.engine.workdir import LAST_CHECKPOINT_NAME
from segnest.errors import RunStopped
from segnest.inference.config import EvalConfig
from segnest.inference.evaluate import run_eval
from segnest.inference.metrics import percent
from segnest.presets import DATASET_PRESETS
from segnest.runtime.checkpoint import load_checkpoint
from segnest.runtime.distributed import resolve_device
from segnest.runtime.precision import resolve_precision
from segnest.tasks.classification.config import PRETRAIN_PRESETS, PretrainConfig
from segnest.tasks.classification.task import run_pretrain
from segnest.tasks.detection.config import DETECTION_PRESETS, DetectionConfig
from segnest.tasks.detection.evaluate import run_detection_eval
from segnest.tasks.detection.task import run_detection
from segnest.tasks.segmentation.config import TrainConfig
from segnest.tasks.segmentation.task import run_train
from segnest.tools.config import DemoConfig


def _stage(number: int, text: str) -> float:
    print(f"\n[{number}/4] {text}", flush=True)
    return time.perf_counter()


def what_next(checkpoint: Path) -> str:
    """The demo's last words: what its model can recognise, and the own-data path."""
    return "\n".join([
        f"the demo model knows only the mini set's {len(MINI_CLASSES)} synthetic classes "
        f"({', '.join(MINI_CLASSES)}): on a photo it answers with those, e.g.",
        f"  segnest predict PHOTO.jpg --checkpoint {checkpoint} --out predictions",
        "for your own classes, put images and masks in a folder (images/{train,val}, "
        "masks/{train,val}, classes.txt; see datasets/README.md) and train on it:",
        "  segnest train --dataset folder --data-root DIR"])


def _train_config(cfg: DemoConfig, work_dir: Path, pretrained: str | None) -> TrainConfig:
    iters = {} if cfg.iters is None else {"iters": cfg.iters}
    return resolve_config(TrainConfig, dict(
        dataset="mini", **iters, workers=cfg.workers, device=cfg.device,
        work_dir=str(work_dir), pretrained=pretrained, resume="auto",
        precision=cfg.precision), DATASET_PRESETS)


def _stop_if_interrupted(result: dict[str, Any]) -> None:
    """A stage stopped by Ctrl-C or SIGTERM has saved its checkpoint: end the demo there
    (the CLI says how to continue) instead of running the next stage on a half-trained
    model."""
    if result.get("interrupted"):
        raise RunStopped(result.get("signal"))


def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    # Refused before the first stage, not after minutes of pretraining.
    resolve_precision(cfg.precision, resolve_device(cfg.device))
    if cfg.task == "detection":
        return run_detection_demo(cfg)
    root = Path(cfg.work_dir)
    started = time.perf_counter()
    timings: dict[str, float] = {}

    t = _stage(1, "generating the bundled mini datasets (once; cached afterwards)")
    seg_root, cls_root = ensure_mini_segmentation(), ensure_mini_classification()
    print(f"      segmentation: {seg_root}\n      classification: {cls_root}")
    timings["data_s"] = time.perf_counter() - t

    t = _stage(2, "pretraining a small ResNeSt-14 on the mini classification set")
    backbone_path = root / "pretrain" / "backbone.pth"
    pretrain = run_pretrain(resolve_config(PretrainConfig, dict(
        dataset="mini", epochs=cfg.pretrain_epochs, workers=cfg.workers, device=cfg.device,
        work_dir=str(root / "pretrain"), export=str(backbone_path), resume="auto",
        precision=cfg.precision),
        PRETRAIN_PRESETS))
    _stop_if_interrupted(pretrain)
    print(f"      top-1 {pretrain['top1']:.1f}% on the mini validation set")
    timings["pretrain_s"] = time.perf_counter() - t

    t = _stage(3, "training DeepLabV3-ResNeSt-14 on the mini segmentation set from the "
                  "pretrained backbone")
    train_dir = root / "train"
    _stop_if_interrupted(run_train(_train_config(cfg, train_dir, str(backbone_path))))
    timings["train_s"] = time.perf_counter() - t

    scratch = None
    if cfg.compare_scratch:
        t = _stage(3, "the same training from scratch, for comparison")
        scratch_dir = root / "train_scratch"
        _stop_if_interrupted(run_train(_train_config(cfg, scratch_dir, None)))
        scratch = run_eval(EvalConfig(checkpoint=str(scratch_dir / LAST_CHECKPOINT_NAME),
                                      multi_scale=True, flip=True, workers=cfg.workers,
                                      device=cfg.device, precision=cfg.precision,
                                      out=str(root / "eval_scratch")))
        timings["scratch_s"] = time.perf_counter() - t

    t = _stage(4, "evaluating with multi-scale + flip")
    results = run_eval(EvalConfig(checkpoint=str(train_dir / LAST_CHECKPOINT_NAME),
                                  multi_scale=True, flip=True, workers=cfg.workers,
                                  device=cfg.device, precision=cfg.precision,
                                  out=str(root / "eval")))
    timings["eval_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - started

    stages = ", ".join(f"{k[:-2]} {v:.0f} s" for k, v in timings.items() if k != "total_s")
    print(f"\ndemo finished in {timings['total_s'] / 60:.1f} min ({stages}): mini val mIoU "
          f"{percent(results['mIoU'])}, pixAcc {percent(results['pixAcc'])} "
          "(multi-scale + flip)")
    if scratch is not None:
        print(f"from scratch with the same budget: mIoU {percent(scratch['mIoU'])}")
    print(f"look at the curves and predicted masks with:  tensorboard --logdir {root}")
    print(what_next(train_dir / LAST_CHECKPOINT_NAME))
    return {"results": results, "pretrain": pretrain, "scratch": scratch, "timings": timings}


def run_detection_demo(cfg: DemoConfig) -> dict[str, Any]:
    """``segnest demo --task detection``: Mask R-CNN-ResNeSt-14 trained on the mini
    detection set with its preset (``segnest train --model mask_rcnn --dataset mini``),
    then its box and mask AP on the mini validation set, as ``segnest eval`` computes them.
    Training resumes from its work folder when the demo runs again."""
    root = Path(cfg.work_dir) / "detection"
    started = time.perf_counter()
    print("\n[1/3] generating the bundled mini detection set (once; cached afterwards)",
          flush=True)
    print(f"      {ensure_mini_detection()}")
    print("\n[2/3] training Mask R-CNN-ResNeSt-14 on it from scratch", flush=True)
    # A shortened demo (--iters) keeps the preset's warmup only where it fits.
    warmup = DETECTION_PRESETS["mini"]["warmup_iters"]
    iters = {} if cfg.iters is None else {"iters": cfg.iters,
                                          "warmup_iters": min(warmup, cfg.iters)}
    train_cfg = resolve_config(DetectionConfig, dict(
        model="mask_rcnn", dataset="mini", **iters, workers=cfg.workers, device=cfg.device,
        work_dir=str(root / "train"), resume="auto", precision=cfg.precision),
        DETECTION_PRESETS)
    trained = run_detection(train_cfg)
    _stop_if_interrupted(trained)
    train_s = time.perf_counter() - started
    print("\n[3/3] evaluating the last checkpoint with pycocotools", flush=True)
    last = root / "train" / LAST_CHECKPOINT_NAME
    metrics = run_detection_eval(load_checkpoint(last), str(last), out=str(root / "eval"),
                                 save_pred=None, device=cfg.device)
    total_s = time.perf_counter() - started
    print(f"\ndetection demo finished in {total_s / 60:.1f} min (training {train_s:.0f} s): "
          f"mini val box AP {metrics['bbox_AP']:.2f}, mask AP {metrics['segm_AP']:.2f} "
          f"(COCO AP@[.5:.95], percent)")
    print(f"look at the curves and the ground truth | prediction panels with:  tensorboard "
          f"--logdir {root}\npredict with it from Python: segnest.load_model('{last}')")
    return {"metrics": metrics, "train": trained,
            "timings": {"train_s": train_s, "total_s": total_s}}
