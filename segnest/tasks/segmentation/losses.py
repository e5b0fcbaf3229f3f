"""The training losses: segmentation cross-entropy with the auxiliary head, as the paper's
recipe takes it (main + ``aux_weight`` x auxiliary, ignore label excluded), optionally with
class weights (:mod:`segnest.tasks.segmentation.class_weights`) and online hard example mining.

Class weights follow ``F.cross_entropy(weight=w)``: the loss is
``sum(w[y_i] * nll_i) / sum(w[y_i])`` over the labelled pixels ``i``. OHEM (``--loss
ohem``, the "OhemCrossEntropy" of the PSPNet/HRNet code and mmsegmentation's
``OHEMPixelSampler``) takes the same weighted mean over the *kept* pixels only: those whose
predicted probability of their true class is below ``thresh``, and at least the ``min_kept``
hardest ones (lowest probability, i.e. highest loss). The selection is a function of the
logits alone (no sampling, nothing random), so a resumed run continues exactly; each head
selects its own pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from segnest.data.transforms import IGNORE_INDEX
from segnest.models.deeplabv3 import DeepLabV3
from segnest.models.pixelwise import upsampled_cross_entropy

# The default share of a batch's pixels that OHEM keeps at least: mmsegmentation's
# Cityscapes recipe keeps 100000 of the 2 x 512 x 1024 pixels of a device's batch, about 1/10;
# an absolute count would keep every pixel of a small crop and turn OHEM off.
OHEM_MIN_KEPT_SHARE = 0.1


@dataclass(frozen=True)
class Ohem:
    """OHEM settings: keep pixels whose true-class probability is below ``thresh``, and at
    least the ``min_kept`` hardest of a batch (None: :data:`OHEM_MIN_KEPT_SHARE` of the
    batch's pixels)."""

    thresh: float = 0.7
    min_kept: int | None = None


def segmentation_loss(outputs: dict[str, torch.Tensor], target: torch.Tensor,
                      aux_weight: float, class_weights: torch.Tensor | None = None,
                      ohem: Ohem | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """CE (or OHEM CE) on the main logits plus ``aux_weight`` x the same on the auxiliary
    logits, at the target's size; returns (total, auxiliary or None); zero for a batch
    without a labelled pixel of positive weight. Logits at a lower resolution
    (``model(x, upsample=False)``) are upsampled inside the loss exactly as DeepLabV3
    would have upsampled them."""
    labelled = target != IGNORE_INDEX
    if class_weights is not None:
        class_weights = class_weights.to(target.device)
        labelled &= class_weights[torch.where(labelled, target, 0)] > 0
    if not bool(labelled.any()):
        # Crops without a labelled pixel: the mean over no pixels is 0/0. They add nothing,
        # through every output so that DDP still sees each parameter used.
        zero = sum(logits.sum() for logits in outputs.values()) * 0.0
        return zero, (zero if "aux" in outputs else None)

    def criterion(logits: torch.Tensor) -> torch.Tensor:
        if ohem is not None:
            return ohem_cross_entropy(logits, target, ohem, class_weights)
        return upsampled_cross_entropy(logits, target, IGNORE_INDEX, DeepLabV3.ALIGN_CORNERS,
                                       class_weights)

    loss = criterion(outputs["out"])
    aux = None
    if "aux" in outputs:
        aux = criterion(outputs["aux"])
        loss = loss + aux_weight * aux
    return loss, aux


def ohem_cross_entropy(logits: torch.Tensor, target: torch.Tensor, ohem: Ohem,
                       class_weights: torch.Tensor | None = None) -> torch.Tensor:
    """The (class-weighted) mean cross-entropy over the pixels OHEM keeps (module
    docstring); 0 when it keeps none of positive weight.

    The selection needs every pixel's loss at full size, so lower-resolution logits are
    upsampled first (``F.interpolate``, as DeepLabV3 does): this path holds the full-size
    logits, their log-softmax and their gradient, like the unfused GPU path.
    """
    if logits.shape[-2:] != target.shape[-2:]:
        logits = F.interpolate(logits.float(), size=target.shape[-2:], mode="bilinear",
                               align_corners=DeepLabV3.ALIGN_CORNERS)
    nll = F.cross_entropy(logits.float(), target, ignore_index=IGNORE_INDEX, reduction="none")
    valid = target != IGNORE_INDEX
    keep = ohem_keep(nll.detach(), valid, ohem)
    weight = keep.float()
    if class_weights is not None:
        weight = weight * class_weights.to(logits.device)[torch.where(valid, target, 0)]
    # Where no kept pixel has weight, the numerator is 0 too: a zero loss, as for a batch
    # without labels.
    return (nll * weight).sum() / weight.sum().clamp_min(torch.finfo(weight.dtype).tiny)


def ohem_keep(nll: torch.Tensor, valid: torch.Tensor, ohem: Ohem) -> torch.Tensor:
    """The pixels OHEM keeps: labelled ones whose true-class probability ``exp(-nll)`` is
    below ``ohem.thresh``, or among the ``min_kept`` lowest (ties at the cut all kept; all
    labelled pixels when fewer)."""
    prob = torch.exp(-nll)
    keep = valid & (prob < ohem.thresh)
    min_kept = (ohem.min_kept if ohem.min_kept is not None
                else int(OHEM_MIN_KEPT_SHARE * nll.numel()))
    labelled = prob[valid]
    if min_kept > 0 and labelled.numel():
        cut = torch.kthvalue(labelled, min(min_kept, labelled.numel())).values
        keep |= valid & (prob <= cut)
    return keep

