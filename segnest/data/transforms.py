"""Segmentation augmentation on albumentations, reproducible per sample.

Every random draw for a sample comes from a generator seeded by (seed, epoch, index): the
same sample in the same epoch is augmented identically whichever worker or process loads
it, so a resumed run sees exactly the samples the interrupted one would have seen. The
train pipeline follows the paper's recipe (random long side in ``scale_range`` x base size,
pad, crop, flip) with mmsegmentation's ``cat_max_ratio`` crop and photometric distortion.
"""

from __future__ import annotations

import os
import random
from collections.abc import Sequence

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import albumentations as A  # noqa: E402
import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from segnest.errors import SegnestError  # noqa: E402

# The label of pixels that no loss or metric counts, in every pipeline.
IGNORE_INDEX = 255
# ImageNet statistics on a 0-1 scale, as the backbones were pretrained with.
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)




def pixel_scale(dtype: np.dtype) -> float:
    """What a pixel value is divided by to lie in [0, 1]: 255 for 8-bit, 65535 for 16-bit
    images; float arrays are taken as already scaled."""
    return {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0}.get(np.dtype(dtype), 1.0)


def to_unit_range(image: np.ndarray) -> np.ndarray:
    """An HxWxC image of any supported dtype as float32 on a 0-1 scale."""
    return image.astype(np.float32) / pixel_scale(image.dtype)


def to_normalized_tensors(image: np.ndarray, mask: np.ndarray,
                          mean: Sequence[float] = MEAN, std: Sequence[float] = STD,
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """HxWxC image (uint8, uint16 or float32 on a 0-1 scale) and HxW mask -> float32 CHW
    tensor normalized per channel with ``mean``/``std`` (0-1 scale) and int64 HW tensor."""
    normalized = (to_unit_range(image) - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    image_tensor = torch.from_numpy(np.ascontiguousarray(normalized.transpose(2, 0, 1)))
    return image_tensor, torch.from_numpy(np.ascontiguousarray(mask)).long()


def _as_cv_mask(mask: np.ndarray) -> np.ndarray:
    """OpenCV cannot warp int64 arrays; train ids (<= 255) fit in uint8, wider ids in uint16."""
    return mask.astype(np.uint8 if mask.max(initial=0) <= 255 else np.uint16)


def _sample_seed(seed: int, epoch: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0])


class RandomRescaleLongSide(A.DualTransform):
    """Resize so the long side is ``base_size`` x U(scale_range), keeping the aspect ratio
    (image bilinear, mask nearest)."""

    def __init__(self, base_size: int, scale_range: tuple[float, float], p: float = 1.0):
        super().__init__(p=p)
        self.base_size = base_size
        self.scale_range = scale_range

    def get_params_dependent_on_data(self, params: dict, data: dict) -> dict:
        height, width = data["image"].shape[:2]
        long_side = self.base_size * self.random_generator.uniform(*self.scale_range)
        factor = long_side / max(height, width)
        return {"size": (max(1, round(height * factor)), max(1, round(width * factor)))}

    def apply(self, img: np.ndarray, size: tuple[int, int], **params) -> np.ndarray:
        return cv2.resize(img, (size[1], size[0]), interpolation=cv2.INTER_LINEAR)

    def apply_to_mask(self, mask: np.ndarray, size: tuple[int, int], **params) -> np.ndarray:
        return cv2.resize(mask, (size[1], size[0]), interpolation=cv2.INTER_NEAREST)


class CatMaxRatioCrop(A.DualTransform):
    """Random crop; with ``cat_max_ratio < 1`` retry (up to 10 draws, mmsegmentation's rule)
    while one class covers ``cat_max_ratio`` or more of the labelled pixels in the crop.

    The input must be at least the crop size (pad first).
    """

    attempts = 10

    def __init__(self, height: int, width: int, cat_max_ratio: float, ignore_index: int,
                 p: float = 1.0):
        super().__init__(p=p)
        self.height = height
        self.width = width
        self.cat_max_ratio = cat_max_ratio
        self.ignore_index = ignore_index

    def _draw_corner(self, shape: tuple[int, ...]) -> tuple[int, int]:
        top = int(self.random_generator.integers(0, shape[0] - self.height + 1))
        left = int(self.random_generator.integers(0, shape[1] - self.width + 1))
        return top, left

    def get_params_dependent_on_data(self, params: dict, data: dict) -> dict:
        mask = data["mask"]
        top, left = self._draw_corner(mask.shape)
        if self.cat_max_ratio < 1.0:
            for _ in range(self.attempts - 1):
                crop = mask[top:top + self.height, left:left + self.width]
                _, counts = np.unique(crop[crop != self.ignore_index], return_counts=True)
                if len(counts) > 1 and counts.max() / counts.sum() < self.cat_max_ratio:
                    break
                top, left = self._draw_corner(mask.shape)
        return {"top": top, "left": left}

    def apply(self, img: np.ndarray, top: int, left: int, **params) -> np.ndarray:
        return img[top:top + self.height, left:left + self.width]

    def apply_to_mask(self, mask: np.ndarray, top: int, left: int, **params) -> np.ndarray:
        return mask[top:top + self.height, left:left + self.width]


class PhotometricDistortion(A.ImageOnlyTransform):
    """mmsegmentation's photometric distortion: each step with probability 1/2 — brightness
    +-32, contrast x[0.5, 1.5] (before or after the HSV steps, chosen at random), saturation
    x[0.5, 1.5], hue +-18 (OpenCV's 0-180 hue scale)."""

    def __init__(self, brightness_delta: int = 32, contrast_range=(0.5, 1.5),
                 saturation_range=(0.5, 1.5), hue_delta: int = 18, p: float = 1.0):
        super().__init__(p=p)
        self.brightness_delta = brightness_delta
        self.contrast_range = contrast_range
        self.saturation_range = saturation_range
        self.hue_delta = hue_delta

    def get_params(self) -> dict:
        rng = self.random_generator

        def maybe(value: float, neutral: float) -> float:
            return value if rng.random() < 0.5 else neutral

        return {
            "brightness": maybe(rng.uniform(-self.brightness_delta, self.brightness_delta), 0.0),
            "contrast": maybe(rng.uniform(*self.contrast_range), 1.0),
            "contrast_first": bool(rng.random() < 0.5),
            "saturation": maybe(rng.uniform(*self.saturation_range), 1.0),
            "hue": int(maybe(rng.integers(-self.hue_delta, self.hue_delta + 1), 0)),
        }

    def apply(self, img: np.ndarray, brightness: float, contrast: float, contrast_first: bool,
              saturation: float, hue: int, **params) -> np.ndarray:
        if img.dtype != np.uint8 or img.shape[-1] != 3:
            # Its deltas and the HSV round trip are defined on 8-bit RGB only.
            raise SegnestError(
                f"--photometric works on 8-bit RGB images only; this image is "
                f"{img.dtype} with {img.shape[-1]} channel(s); drop --photometric")
        pixels = img.astype(np.float32) + brightness
        if contrast_first:
            pixels *= contrast
        if saturation != 1.0 or hue != 0:
            hsv = cv2.cvtColor(np.clip(pixels, 0, 255).astype(np.uint8), cv2.COLOR_RGB2HSV)
            hsv = hsv.astype(np.int32)
            hsv[..., 1] = np.clip(np.rint(hsv[..., 1] * saturation), 0, 255)
            hsv[..., 0] = (hsv[..., 0] + hue) % 180
            pixels = cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2RGB).astype(np.float32)
        if not contrast_first:
            pixels *= contrast
        return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)


def _crop_hw(crop_size: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(crop_size, int):
        return crop_size, crop_size
    height, width = crop_size
    return int(height), int(width)


class SegTrainTransform:
    """Training augmentation; call as ``t(image=rgb_uint8, mask=train_ids, index=i)``.

    Returns a float32 CHW normalized image tensor and an int64 HW mask tensor, both of
    ``crop_size``. Call ``set_epoch`` at the start of every epoch (in every worker's copy,
    which a DataLoader re-creates each epoch unless workers are persistent).
    """

    def __init__(
        self,
        base_size: int,
        crop_size: int | tuple[int, int],
        scale_range: tuple[float, float] = (0.5, 2.0),
        cat_max_ratio: float = 1.0,
        hflip: float = 0.5,
        photometric: bool = True,
        ignore_index: int = IGNORE_INDEX,
        seed: int = 0,
        mean: Sequence[float] = MEAN,
        std: Sequence[float] = STD,
    ) -> None:
        self.mean, self.std = tuple(mean), tuple(std)
        crop_height, crop_width = _crop_hw(crop_size)
        self.crop_size = (crop_height, crop_width)
        self.seed = seed
        self.epoch = 0
        steps = [
            RandomRescaleLongSide(base_size, tuple(scale_range)),
            # Pad bottom/right so the crop always fits: image black, mask ignored.
            A.PadIfNeeded(
                min_height=crop_height, min_width=crop_width, position="top_left",
                border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=ignore_index,
            ),
            CatMaxRatioCrop(crop_height, crop_width, cat_max_ratio, ignore_index),
            A.HorizontalFlip(p=hflip),
        ]
        if photometric:
            steps.append(PhotometricDistortion())
        self.pipeline = A.Compose(steps)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __call__(self, image: np.ndarray, mask: np.ndarray, index: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        self.pipeline.set_random_seed(_sample_seed(self.seed, self.epoch, index))
        out = self.pipeline(image=image, mask=_as_cv_mask(mask))
        return to_normalized_tensors(out["image"], out["mask"], self.mean, self.std)


class SegEvalTransform:
    """Evaluation transform: normalize only, keep the original size (inference resizes)."""

    def __init__(self, mean: Sequence[float] = MEAN, std: Sequence[float] = STD) -> None:
        self.mean, self.std = tuple(mean), tuple(std)

    def __call__(self, image: np.ndarray, mask: np.ndarray, index: int | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        return to_normalized_tensors(image, mask, self.mean, self.std)


def channel_statistics(in_channels: int, mean: str | Sequence[float] | None,
                       std: str | Sequence[float] | None
                       ) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The per-channel (mean, std) on a 0-1 scale from ``--mean``/``--std`` (comma lists);
    ImageNet's for 3 channels when not given. Other channel counts must give both: no
    statistics are guessed for channels a pretrained backbone never saw."""
    values = {}
    for flag, text, default in (("--mean", mean, MEAN), ("--std", std, STD)):
        if text is None:
            if in_channels != 3:
                raise SegnestError(
                    f"--in-channels {in_channels} needs {flag}: {in_channels} comma-separated "
                    "per-channel values on a 0-1 scale (e.g. computed over the train images)")
            values[flag] = default
            continue
        parts = text.split(",") if isinstance(text, str) else list(text)
        try:
            numbers = tuple(float(part) for part in parts)
        except ValueError:
            numbers = ()
        if len(numbers) != in_channels or not all(np.isfinite(numbers)):
            raise SegnestError(f"{flag} {text!r} must be {in_channels} comma-separated numbers, "
                               f"one per input channel (--in-channels {in_channels})")
        if flag == "--std" and min(numbers) <= 0:
            raise SegnestError(f"--std {text!r} has a value <= 0; standard deviations are "
                               "positive")
        values[flag] = numbers
    return tuple(values["--mean"]), tuple(values["--std"])


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: seed numpy and ``random`` from torch's worker seed, so
    that any code drawing from the global generators differs per worker yet is seeded."""
    worker_seed = torch.initial_seed() % 2**32
    np.random.seed(worker_seed)
    random.seed(worker_seed)
