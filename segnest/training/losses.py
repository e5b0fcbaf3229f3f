"""The training losses: segmentation cross-entropy with the auxiliary head, as the paper's
recipe takes it (main + ``aux_weight`` x auxiliary, ignore label excluded)."""

from __future__ import annotations

import torch

from segnest.data.transforms import IGNORE_INDEX
from segnest.models.deeplabv3 import DeepLabV3
from segnest.models.pixelwise import upsampled_cross_entropy


def segmentation_loss(outputs: dict[str, torch.Tensor], target: torch.Tensor,
                      aux_weight: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """CE on the main logits plus ``aux_weight`` x CE on the auxiliary logits, at the
    target's size; returns (total, auxiliary or None); zero for a batch without labelled
    pixels. Logits at a lower resolution
    (``model(x, upsample=False)``) are upsampled inside the loss exactly as DeepLabV3
    would have upsampled them."""
    if not bool((target != IGNORE_INDEX).any()):
        # Crops without a labelled pixel: the mean over no pixels is 0/0. They add nothing,
        # through every output so that DDP still sees each parameter used.
        zero = sum(logits.sum() for logits in outputs.values()) * 0.0
        return zero, (zero if "aux" in outputs else None)

    def criterion(logits: torch.Tensor) -> torch.Tensor:
        return upsampled_cross_entropy(logits, target, IGNORE_INDEX, DeepLabV3.ALIGN_CORNERS)

    loss = criterion(outputs["out"])
    aux = None
    if "aux" in outputs:
        aux = criterion(outputs["aux"])
        loss = loss + aux_weight * aux
    return loss, aux
