"""Seconds per training iteration of Mask R-CNN-ResNeSt-50-FPN at 800 px, batch 2, on this
CPU: the authors' recipe (``recipe="authors"``: BN in stages 2-4, FPN and heads, 4conv+1fc
box head, ROIAlignV2, L1 losses, 1000 post-NMS proposals, 512 RoIs per image), random
weights, synthetic images (800 x 1067, the short side at the test/training size 800) with
five boxes and masks each, SGD with momentum; forward, backward and the step.

Prints the CPU, its threads and the load average beside the median of the timed
iterations (after untimed warm-up ones): the machine may be shared.

Run: python experiments/benchmarks/detection_train_step.py [--iters 3] [--warmup 1]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from segnest.models import create_model
from segnest.runtime.tuning import cpu_model

HEIGHT, WIDTH, BATCH, OBJECTS, CLASSES = 800, 1067, 2, 5, 80


def synthetic_batch(generator: torch.Generator) -> tuple[list, list]:
    images, targets = [], []
    for _ in range(BATCH):
        images.append(torch.rand(3, HEIGHT, WIDTH, generator=generator))
        corner = torch.rand(OBJECTS, 2, generator=generator) * torch.tensor([WIDTH * 0.6,
                                                                              HEIGHT * 0.6])
        size = torch.rand(OBJECTS, 2, generator=generator) * 200 + 40
        boxes = torch.cat([corner, corner + size], dim=1)
        masks = torch.zeros(OBJECTS, HEIGHT, WIDTH, dtype=torch.uint8)
        for mask, (x1, y1, x2, y2) in zip(masks, boxes.int().tolist(), strict=True):
            mask[y1:y2, x1:x2] = 1
        targets.append({"boxes": boxes, "masks": masks,
                        "labels": torch.randint(1, CLASSES + 1, (OBJECTS,), generator=generator)})
    return images, targets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    args = parser.parse_args()
    torch.manual_seed(0)
    # A fixed 800 px short side, so that every iteration costs the same.
    model = create_model("mask_rcnn_resnest50", num_classes=CLASSES, train_min_size=(800,),
                         train_size_sampling="choice").train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0025,
                                momentum=0.9, weight_decay=1e-4)
    images, targets = synthetic_batch(torch.Generator().manual_seed(0))
    seconds = []
    for index in range(args.warmup + args.iters):
        started = time.perf_counter()
        loss = sum(model(images, targets).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if index >= args.warmup:
            seconds.append(time.perf_counter() - started)
    load = ", ".join(f"{value:.2f}" for value in os.getloadavg())
    print(f"CPU: {cpu_model()}, {os.cpu_count()} logical CPUs, torch threads "
          f"{torch.get_num_threads()}, load average after the run {load}")
    print(f"Mask R-CNN-ResNeSt-50-FPN training iteration, batch {BATCH} at {HEIGHT}x{WIDTH}: "
          f"median {statistics.median(seconds):.1f} s of {len(seconds)} "
          f"({', '.join(f'{s:.1f}' for s in seconds)}) after {args.warmup} warm-up; "
          f"{BATCH / statistics.median(seconds):.2f} images/s")


if __name__ == "__main__":
    main()
