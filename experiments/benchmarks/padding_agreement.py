"""How far padding images of different sizes into one batch changes their labels.

Why ``--batch-size`` never pads (segnest/inference/strategies.py): every Split-Attention
block and the ASPP image-pooling branch average over the whole feature map, so the zeros
of the padding reach every pixel. For pairs of generated scenes (segnest.data.mini) of
different sizes, each image is predicted alone and zero-padded (the mean colour in
normalized space) with its partner to their common size in one batch; the script prints
the fraction of labels, inside each image's own area, that equal the batch-1 labels.

Run: python experiments/benchmarks/padding_agreement.py --checkpoint runs/demo/train/best.pt
     (the checkpoint `segnest demo` trains; random weights predict nearly one class
     everywhere and hide the effect)
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F

from segnest.data.mini import render_scene
from segnest.data.transforms import to_normalized_tensors
from segnest.inference.config import InferenceFlags
from segnest.inference.settings import InferenceSettings
from segnest.inference.strategies import inference_model, whole_inference
from segnest.models import model_from_checkpoint
from segnest.runtime.checkpoint import load_checkpoint

PAIRS = (((96, 128), (128, 80)), ((160, 120), (112, 160)), ((128, 128), (96, 160)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    args = parser.parse_args()
    checkpoint = load_checkpoint(args.checkpoint)
    model = inference_model(model_from_checkpoint(checkpoint, source=args.checkpoint))
    classes = int(checkpoint["model_kwargs"]["num_classes"])
    settings = InferenceSettings.from_flags(InferenceFlags(), checkpoint)
    rng = np.random.default_rng(0)
    agree = total = 0
    with torch.inference_mode():
        for sizes in PAIRS:
            images = []
            for size in sizes:
                tensor, _ = to_normalized_tensors(render_scene(rng, *size)[0],
                                                  np.zeros(size, np.uint8),
                                                  settings.mean, settings.std)
                images.append(tensor[None])
            alone = [whole_inference(model, x, classes).argmax(1)[0] for x in images]
            height = max(s[0] for s in sizes)
            width = max(s[1] for s in sizes)
            padded = torch.cat([F.pad(x, (0, width - x.shape[-1], 0, height - x.shape[-2]))
                                for x in images])
            together = whole_inference(model, padded, classes).argmax(1)
            pair_agree = sum(int((together[i, : s[0], : s[1]] == alone[i]).sum())
                             for i, s in enumerate(sizes))
            pair_total = sum(s[0] * s[1] for s in sizes)
            print(f"{sizes[0]} + {sizes[1]} padded to {(height, width)}: "
                  f"{100 * pair_agree / pair_total:.1f}% of the labels equal batch 1")
            agree, total = agree + pair_agree, total + pair_total
    print(f"overall: {100 * agree / total:.1f}%")


if __name__ == "__main__":
    main()
