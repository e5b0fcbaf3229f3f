"""What every segmentation dataset shares: image/mask reading, validation, the sample dict.

A dataset adapter only has to list its ``(image, mask)`` pairs, say how a raw mask maps to
train ids (``_to_train_ids``, and ``label_mapping_id`` naming that mapping for caches) and
how a sample is named. Reading any image mode at full precision (8-bit, 16-bit, N-channel
arrays), and checking every sample happens here, lazily in ``load``, so that a bad file
is reported by name when it is first used instead of giving a silently wrong result.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from segnest.data.transforms import IGNORE_INDEX, to_normalized_tensors
from segnest.errors import SegnestError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
# HxWxN NumPy arrays: inputs with channels other than RGB (multispectral, RGB-D).
ARRAY_SUFFIX = ".npy"

# Pillow's modes that hold more than 8 bits per channel in a single band.
_WIDE_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")
# Modes a mask may have: one integer value per pixel.
_LABEL_MODES = ("1", "L", "P", "I", "I;16", "I;16B", "I;16L", "I;16N")

# (image, mask) -> (image tensor, mask tensor); see segnest.data.transforms.
SampleTransform = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def default_data_root(dataset: str) -> Path:
    """Where a dataset lives when no root is given: ``$SEGNEST_DATA/<dataset>`` or
    ``./data/<dataset>``."""
    base = os.environ.get("SEGNEST_DATA")
    return Path(base) / dataset if base else Path("data") / dataset


def recorded_data_root(root: str, checkpoint: str | os.PathLike,
                       work_dir: str | None = None) -> Path:
    """The dataset folder a checkpoint's config records as ``root``. segnest 0.1 stored a
    relative ``--data-root`` as typed, relative to the folder training ran in; it is looked
    for in the current folder, then in that folder where the recorded (relative)
    ``work_dir`` tells it (``<there>/runs/x/best.pt`` for ``runs/x``), then beside the
    checkpoint's folder and each folder above it. Not found: one SegnestError naming where
    it looked."""
    path = Path(root).expanduser()
    if path.is_absolute():
        return path
    folder = Path(checkpoint).resolve().parent
    tried = [Path.cwd() / path]
    run = Path(work_dir) if work_dir else None
    if run is not None and not run.is_absolute() and run.parts and (
            folder.parts[-len(run.parts):] == run.parts):
        tried.append(Path(*folder.parts[:-len(run.parts)]) / path)
    tried += [parent / path for parent in (folder, *folder.parents)]
    for candidate in dict.fromkeys(tried):
        if candidate.is_dir():
            if candidate != tried[0]:
                print(f"segnest: checkpoint {checkpoint} records the data root '{root}' "
                      f"relative to the folder it was trained in; using {candidate}")
            return candidate
    raise SegnestError(
        f"checkpoint {checkpoint} records the data root '{root}' relative to the folder it "
        f"was trained in, and it is not at {tried[0]} nor at {root} beside {folder} or a "
        f"folder above it; pass the dataset folder with --data-root")


def missing_layout_error(looked_at: Path, layout: str, own_data: bool = False
                         ) -> SegnestError:
    """The error for a dataset root or split folder that is not there. ``own_data``: a
    user's folder dataset, which SEGNEST_DATA (a home for the public datasets) does not
    name."""
    where = ("pass your dataset folder with --data-root (a relative path is read from the "
             "current folder)" if own_data
             else "pass the right root with --data-root or set SEGNEST_DATA")
    return SegnestError(f"dataset folder not found: {looked_at}; expected layout {layout}; "
                        f"{where} (see datasets/README.md)")


def open_image(path: Path) -> Image.Image:
    """Open and fully decode an image, turning any decoding failure into a SegnestError."""
    try:
        image = Image.open(path)
        image.load()
    except FileNotFoundError as err:
        raise SegnestError(f"file not found: {path}") from err
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise SegnestError(
            f"cannot read image {path} ({err}); the file is corrupt or truncated, "
            "replace or remove it"
        ) from err
    return image


def open_rgb_image(path: str | os.PathLike) -> Image.Image:
    """Read an image file of any mode (grey, palette, RGBA, 16-bit, ...) as an RGB image.

    No EXIF rotation is applied: annotations are aligned with the stored pixels.
    """
    return rgb_image(open_image(Path(path)))


def rgb_image(image: Image.Image) -> Image.Image:
    """A decoded image of any mode as RGB: 16-bit and float grey scaled to 8 bits,
    transparency dropped."""
    if image.mode == "RGB":
        return image
    if image.mode in _WIDE_MODES:
        values = np.asarray(image, dtype=np.float64)
        # 16-bit data is scaled to 8 bits; float images are taken to be on a 0-255 scale.
        if image.mode != "F":
            values = values / 257.0
        grey = np.clip(np.rint(values), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    if image.mode in ("P", "PA", "LA", "RGBA"):
        # Palette images with transparency must go through RGBA; alpha is then dropped.
        return image.convert("RGBA").convert("RGB")
    return image.convert("RGB")


def read_rgb_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image file of any mode as an HxWx3 uint8 RGB array."""
    return np.asarray(open_rgb_image(path), dtype=np.uint8).copy()


def _is_16bit_colour(path: Path) -> bool:
    """Whether ``path`` stores 16-bit RGB(A): Pillow decodes those to 8 bits, OpenCV does not."""
    try:
        with Image.open(path) as image:
            return image.mode in ("RGB", "RGBA") and any(
                ";16" in str(tile.args) for tile in image.tile)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return False  # open_image names the problem


def _read_array(path: Path) -> np.ndarray:
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise SegnestError(f"cannot read array {path} ({err}); save it with numpy.save as "
                           "an HxWxN array") from err
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.dtype.kind not in "uif":
        raise SegnestError(f"array {path} has shape {array.shape} and dtype {array.dtype}; "
                           "image arrays are HxWxN numbers (uint8, uint16 or float)")
    if array.dtype not in (np.uint8, np.uint16):
        array = array.astype(np.float32)
        check_unit_range(array, f"array {path}")
    return np.ascontiguousarray(array)


# Float images hold 0-1 values; rounding and resampling may overshoot by less than one
# 8-bit step, while a 0-255 image (np.float32(photo), cv2's astype) goes far beyond.
UNIT_RANGE_SLACK = 1.0 / 255.0


def check_unit_range(image: np.ndarray, where: str) -> None:
    """Refuse a float image that is not finite or not on the 0-1 scale float images are
    read on (:func:`~segnest.data.transforms.pixel_scale`): a 0-255 float image would be
    taken as 255 times too bright and predicted without a word."""
    if image.dtype.kind != "f" or image.size == 0:
        return
    low, high = float(np.min(image)), float(np.max(image))
    if not (np.isfinite(low) and np.isfinite(high)):
        raise SegnestError(f"{where} holds NaN or infinite values; replace them (e.g. "
                           "np.nan_to_num) before predicting or training")
    if low < -UNIT_RANGE_SLACK or high > 1.0 + UNIT_RANGE_SLACK:
        raise SegnestError(f"{where} is float with values from {low:g} to {high:g}, but float "
                           "images must lie on a 0-1 scale; divide a 0-255 image by 255 (or "
                           "pass it as uint8), or rescale the values to 0-1")


def read_image(path: str | os.PathLike, in_channels: int = 3) -> np.ndarray:
    """Read an input image at full precision as HxWx``in_channels``: uint8 for 8-bit files,
    uint16 for 16-bit PNG/TIFF (grey ones repeated to RGB), float32 on a 0-1 scale for float
    images. ``.npy`` files hold HxWxN arrays (uint8, uint16, or floats taken as already
    scaled); other files give 3 channels. :func:`~segnest.data.transforms.pixel_scale`
    says how each dtype maps to 0-1."""
    path = Path(path)
    if path.suffix.lower() == ARRAY_SUFFIX:
        image = _read_array(path)
    elif _is_16bit_colour(path):
        decoded = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        if decoded is None or decoded.ndim != 3:
            raise SegnestError(f"cannot read 16-bit image {path}; the file is corrupt or "
                               "truncated, replace or remove it")
        image = np.ascontiguousarray(decoded[..., 2::-1])  # BGR(A) -> RGB
    else:
        image = image_array(open_image(path))
    if image.shape[2] != in_channels:
        how = ("store inputs with other channel counts as HxWxN .npy arrays"
               if path.suffix.lower() != ARRAY_SUFFIX else "fix the array or --in-channels")
        raise SegnestError(f"image {path} has {image.shape[2]} channel(s) but --in-channels is "
                           f"{in_channels}; {how}")
    return image


def image_array(image: Image.Image) -> np.ndarray:
    """A decoded Pillow image as :func:`read_image` reads it: 16-bit grey as uint16 and
    float grey as float32 (0-1), each repeated to 3 channels; any other mode as RGB uint8."""
    if image.mode in _WIDE_MODES:
        values = np.asarray(image)
        if image.mode == "F":  # float images are on a 0-255 scale, as Pillow writes them
            grey = np.clip(values.astype(np.float32) / 255.0, 0.0, 1.0)
        else:
            grey = np.clip(values, 0, 65535).astype(np.uint16)
        return np.repeat(grey[..., None], 3, axis=2)
    return np.asarray(rgb_image(image), dtype=np.uint8).copy()


def read_label_image(path: str | os.PathLike) -> np.ndarray:
    """Read a single-channel label PNG (8- or 16-bit, grey or palette indices) as int64."""
    return label_values(open_image(Path(path)), path)


def label_values(image: Image.Image, path: str | os.PathLike, hint: str = "") -> np.ndarray:
    """The values of an opened single-channel mask as int64; ``hint`` ends the refusal of
    other modes (the folder dataset says how it reads colour masks)."""
    if image.mode not in _LABEL_MODES:
        raise SegnestError(
            f"mask {path} is a {image.mode} image; masks must be single-channel PNGs "
            f"holding one class id per pixel (grey or palette indices), not colour images{hint}"
        )
    return np.asarray(image).astype(np.int64)


class SegmentationDataset(Dataset):
    """Pairs of images and masks; ``__getitem__`` returns a dict ready for a DataLoader.

    Subclasses fill ``samples`` and may override ``_to_train_ids`` (raw mask values to
    train ids, 255 = ignore) and ``name``.
    """

    ignore_index = IGNORE_INDEX

    def __init__(
        self,
        root: Path,
        split: str,
        samples: Sequence[tuple[Path, Path | None]],
        classes: Sequence[str],
        palette: np.ndarray,
        transform: SampleTransform | None = None,
    ) -> None:
        if not samples:
            raise SegnestError(
                f"no images found for split '{split}' under {root}; check the folder "
                "layout (see datasets/README.md)"
            )
        palette = np.asarray(palette, dtype=np.uint8)
        if palette.shape != (len(classes), 3):
            raise ValueError(
                f"palette has shape {palette.shape}, expected ({len(classes)}, 3)"
            )
        self.root = Path(root)
        self.split = split
        self.samples: list[tuple[Path, Path | None]] = list(samples)
        self.classes: list[str] = list(classes)
        self.num_classes = len(self.classes)
        self.palette = palette
        self.transform = transform
        # Channels every input image must have (read_image); only folder datasets change it.
        self.in_channels = 3

    def __len__(self) -> int:
        return len(self.samples)

    def name(self, index: int) -> str:
        """Stem used for prediction file names."""
        return self.samples[index][0].stem

    def _read_raw_mask(self, mask_path: Path) -> np.ndarray:
        """A mask file's values as stored (HxW); a dataset may also return HxWx3 colours."""
        return read_label_image(mask_path)

    def _to_train_ids(self, raw: np.ndarray, mask_path: Path) -> np.ndarray:
        """Map raw mask values to train ids; by default the file holds train ids already."""
        return raw

    def label_mapping_id(self) -> str:
        """Names everything that decides how raw mask values become train ids, so that a
        cache of label counts (segnest.data.census) is not reused across mappings."""
        return f"{type(self).__name__}/{self.num_classes}"

    def read_mask(self, mask_path: Path) -> tuple[np.ndarray, np.ndarray]:
        """(raw values as stored, train ids) of one mask file, unchecked: ``load`` refuses
        values outside the classes, the census (segnest.data.census) counts them."""
        raw = self._read_raw_mask(mask_path)
        return raw, self._to_train_ids(raw, mask_path)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Return the image (:func:`read_image`) and its int64 train-id mask at original size.

        A sample without a mask (e.g. a test split) gets a mask that is all ignore.
        """
        image_path, mask_path = self.samples[index]
        image = read_image(image_path, self.in_channels)
        if mask_path is None:
            return image, np.full(image.shape[:2], self.ignore_index, dtype=np.int64)
        mask = self.read_mask(mask_path)[1].astype(np.int64)
        if mask.shape != image.shape[:2]:
            raise SegnestError(
                f"size mismatch: image {image_path} is {image.shape[1]}x{image.shape[0]} but "
                f"mask {mask_path} is {mask.shape[1]}x{mask.shape[0]} (WxH); they must match"
            )
        bad = (mask != self.ignore_index) & ((mask < 0) | (mask >= self.num_classes))
        if bad.any():
            values = np.unique(mask[bad])
            shown = ", ".join(str(v) for v in values[:10]) + (" ..." if len(values) > 10 else "")
            raise SegnestError(
                f"mask {mask_path} has values outside the {self.num_classes} classes "
                f"after label mapping: {shown}; fix the mask or the class list "
                f"(valid train ids are 0..{self.num_classes - 1} and {self.ignore_index} "
                "for ignore)"
            )
        return image, mask

    def __getitem__(self, index: int) -> dict:
        image, mask = self.load(index)
        if self.transform is None:
            image_tensor, mask_tensor = to_normalized_tensors(image, mask)
        else:
            image_tensor, mask_tensor = self.transform(image=image, mask=mask, index=index)
        return {
            "image": image_tensor,
            "mask": mask_tensor,
            "name": self.name(index),
            "index": index,
        }
