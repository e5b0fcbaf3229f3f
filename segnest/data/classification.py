"""Image classification data for backbone pretraining: an ImageNet-style folder tree
(``<root>/{train,val}/<class>/<image>``) read with torchvision's ImageFolder."""

from __future__ import annotations

import os
from pathlib import Path

from PIL import Image
from torchvision import datasets
from torchvision import transforms as T

from segnest.data.base import open_rgb_image
from segnest.data.transforms import MEAN, STD
from segnest.errors import SegnestError

LAYOUT = "<root>/train/<class>/*.jpg and <root>/val/<class>/*.jpg"
AUTO_AUGMENT_CHOICES = ("autoaugment", "randaugment", "none")


def _load_rgb(path: str) -> Image.Image:
    return open_rgb_image(path)


def build_classification_dataset(root: str | os.PathLike, split: str,
                                 transform: T.Compose | None = None) -> datasets.ImageFolder:
    """ImageFolder over ``root/split``; a corrupt image raises SegnestError naming it."""
    folder = Path(root) / split
    if not folder.is_dir():
        raise SegnestError(
            f"classification folder not found: {folder}; expected layout {LAYOUT} "
            "(pass the folder with --data)"
        )
    try:
        return datasets.ImageFolder(str(folder), transform=transform, loader=_load_rgb)
    except FileNotFoundError as err:
        raise SegnestError(
            f"no images found under {folder} ({err}); expected layout {LAYOUT}"
        ) from err


def build_transforms(crop_size: int, crop_pct: float, auto_augment: str,
                     crop_scale: tuple[float, float]) -> tuple[T.Compose, T.Compose]:
    """Pretraining's (train, eval) transforms. Train: RandomResizedCrop over ``crop_scale``
    of the area, flip, AutoAugment (ImageNet policy) / RandAugment / none, normalise.
    Eval: resize the short side to ``crop_size / crop_pct``, centre crop, normalise."""
    if auto_augment not in AUTO_AUGMENT_CHOICES:
        raise SegnestError(f"unknown --auto-augment '{auto_augment}'; use "
                           f"{', '.join(AUTO_AUGMENT_CHOICES)}")
    steps: list = [T.RandomResizedCrop(crop_size, scale=crop_scale), T.RandomHorizontalFlip()]
    if auto_augment == "autoaugment":
        steps.append(T.AutoAugment(T.AutoAugmentPolicy.IMAGENET))
    elif auto_augment == "randaugment":
        steps.append(T.RandAugment())
    steps += [T.ToTensor(), T.Normalize(MEAN, STD)]
    eval_transform = T.Compose([
        T.Resize(int(round(crop_size / crop_pct))),
        T.CenterCrop(crop_size),
        T.ToTensor(),
        T.Normalize(MEAN, STD),
    ])
    return T.Compose(steps), eval_transform
