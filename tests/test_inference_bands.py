"""Specs for labels made band by band at the image's size, exact batches and confidence."""

import weakref

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_inference import NUM_CLASSES, Recorder, conv_model
from torch.utils._python_dispatch import TorchDispatchMode

from segnest.data.transforms import MEAN, STD, to_normalized_tensors
from segnest.inference import strategies
from segnest.inference.resample import bilinear_taps, resize_image, upsample_band
from segnest.inference.settings import InferenceSettings
from segnest.inference.strategies import infer, segment
from segnest.models import create_model

SIZES = [(37, 53), (64, 48), (41, 29), (64, 48), (30, 30)]
SETTINGS = {
    "whole": InferenceSettings(base_size=40),
    "multi-scale + flip": InferenceSettings(scales=(0.75, 1.0, 1.5), flip=True, base_size=40),
    "slide + flip": InferenceSettings(mode="slide", scales=(0.75, 1.25), flip=True,
                                      base_size=48, window_size=32, stride=20),
}


@pytest.fixture(autouse=True)
def no_grad():
    with torch.inference_mode():
        yield


def photos(sizes=SIZES, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (*size, 3), dtype=np.uint8) for size in sizes]


def full_resolution(model, photo, settings, num_classes=NUM_CLASSES):
    """The path eval and predict took before: the normalized image at full size, every
    scale's probabilities interpolated to it, averaged; then argmax and max."""
    tensor, _ = to_normalized_tensors(photo, np.zeros(photo.shape[:2]), MEAN, STD)
    probs = infer(model, tensor[None], num_classes, settings)[0]
    return probs.argmax(0), probs.amax(0)


def banded(model, images, settings, batch_size=1, num_classes=NUM_CLASSES):
    return [(labels, best) for _, labels, best in segment(
        model, enumerate(images), num_classes, settings, batch_size=batch_size,
        confidence=True)]


@pytest.mark.parametrize("in_size,out_size", [((7, 9), (31, 45)), ((33, 41), (10, 13)),
                                               ((1, 3), (4, 2)), ((65, 17), (8, 200))])
def test_band_upsampling_equals_interpolate_up_and_down_at_odd_sizes(in_size, out_size):
    probs = torch.rand(4, *in_size)
    expected = F.interpolate(probs[None], out_size, mode="bilinear", align_corners=False)[0]
    rows, cols = bilinear_taps(in_size[0], out_size[0]), bilinear_taps(in_size[1], out_size[1])
    classes_last = probs.permute(1, 2, 0).contiguous()
    bands = [upsample_band(classes_last, rows, cols, y0, min(out_size[0], y0 + 3))
             for y0 in range(0, out_size[0], 3)]
    torch.testing.assert_close(torch.cat(bands).permute(2, 0, 1), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
@pytest.mark.parametrize("out_size", [(20, 31), (97, 55), (37, 53)])
def test_resized_image_equals_normalizing_then_interpolating(dtype, out_size):
    rng = np.random.default_rng(1)
    photo = (rng.random((37, 53, 3)) * (1 if dtype == np.float32 else np.iinfo(dtype).max)
             ).astype(dtype)
    tensor, _ = to_normalized_tensors(photo, np.zeros((37, 53)), MEAN, STD)
    expected = F.interpolate(tensor[None], out_size, mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(resize_image(photo, out_size, MEAN, STD), expected,
                               atol=1e-5, rtol=0)  # values up to ~2.6


@pytest.mark.parametrize("name", list(SETTINGS))
def test_banded_labels_and_confidence_equal_the_full_resolution_path(name):
    settings, model = SETTINGS[name], conv_model()
    for photo, (labels, best) in zip(photos(), banded(model, photos(), settings), strict=True):
        expected_labels, expected_best = full_resolution(model, photo, settings)
        assert labels.dtype == torch.uint8 and labels.shape == photo.shape[:2]
        assert len(expected_labels.unique()) > 1  # a spec that can fail
        torch.testing.assert_close(labels.long(), expected_labels, atol=0, rtol=0)
        torch.testing.assert_close(best, expected_best, atol=1e-5, rtol=0)


def test_banded_labels_equal_the_full_resolution_path_for_a_resnest():
    torch.manual_seed(0)
    model = create_model("deeplabv3_resnest14", num_classes=NUM_CLASSES, stage_width=8,
                         stem_width=8, head_channels=16).eval()
    settings = SETTINGS["multi-scale + flip"]
    for photo, (labels, best) in zip(photos(SIZES[:3]), banded(model, photos(SIZES[:3]),
                                                               settings), strict=True):
        expected_labels, expected_best = full_resolution(model, photo, settings)
        torch.testing.assert_close(labels.long(), expected_labels, atol=0, rtol=0)
        torch.testing.assert_close(best, expected_best, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", list(SETTINGS))
def test_batches_of_mixed_sizes_equal_batch_one_and_are_never_padded(name):
    settings, model = SETTINGS[name], Recorder(conv_model())
    single = banded(model, photos(), settings)
    model.inputs.clear()
    batched = banded(model, photos(), settings, batch_size=3)
    # Two 64x48 photos share forward passes in whole mode; windows are pooled in slide mode.
    assert max(len(x) for x in model.inputs) > (2 if settings.flip else 1)
    window = settings.window_size
    for x in model.inputs:  # every input is one image's working size or one window
        if settings.mode == "slide":
            assert tuple(x.shape[-2:]) == (window, window)
    for (labels, best), (labels_1, best_1) in zip(batched, single, strict=True):
        torch.testing.assert_close(labels, labels_1, atol=0, rtol=0)
        torch.testing.assert_close(best, best_1, atol=1e-5, rtol=0)


def test_batches_keep_the_order_of_the_images():
    keys = [key for key, _, _ in segment(conv_model(), enumerate(photos()), NUM_CLASSES,
                                         SETTINGS["whole"], batch_size=2)]
    assert keys == list(range(len(SIZES)))


class LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an operation returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(value, torch.Tensor):
                self.largest = max(self.largest, value.numel())
        return out


def test_labels_never_hold_a_full_resolution_tensor_of_all_classes(monkeypatch):
    monkeypatch.setattr(strategies, "BAND_BYTES", 2**16)
    model, classes = conv_model(), NUM_CLASSES
    settings = InferenceSettings(scales=(0.5, 1.0), flip=True, base_size=32)
    photo = photos([(300, 400)])[0]
    full_size = classes * 300 * 400
    with LargestTensor() as banded_path:
        banded(model, [photo], settings)
    with LargestTensor() as full_path:
        full_resolution(model, photo, settings)
    assert full_path.largest >= full_size  # what the spec guards against
    # The largest tensors are now the H x W labels and confidence.
    assert banded_path.largest <= 300 * 400


def test_batch_size_below_one_is_refused():
    with pytest.raises(Exception, match="batch size must be at least 1"):
        next(segment(conv_model(), enumerate(photos()), NUM_CLASSES, SETTINGS["whole"],
                     batch_size=0))


class PeakLiveBytes(TorchDispatchMode):
    """The largest number of bytes that the tensors made by operations hold at once
    (storages counted once however many views share them)."""

    def __init__(self):
        super().__init__()
        self.live, self.current, self.peak = {}, 0, 0

    def _release(self, key):
        self.live[key][0] -= 1
        if self.live[key][0] == 0:
            self.current -= self.live.pop(key)[1]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(value, torch.Tensor) and value.untyped_storage().nbytes():
                key = value.untyped_storage().data_ptr()
                if key not in self.live:
                    self.live[key] = [0, value.untyped_storage().nbytes()]
                    self.current += self.live[key][1]
                    self.peak = max(self.peak, self.current)
                self.live[key][0] += 1
                weakref.finalize(value, self._release, key)
        return out


def test_memory_held_for_multi_scale_does_not_grow_with_the_number_of_scales(monkeypatch):
    monkeypatch.setattr(strategies, "BAND_BYTES", 2**14)
    torch.manual_seed(0)
    model = create_model("deeplabv3_resnest14", num_classes=NUM_CLASSES, stage_width=8,
                         stem_width=8, head_channels=16).eval()
    photo = photos([(120, 160)])[0]
    peaks = []
    for views in (1, 6):  # the same working size again and again: only the count grows
        settings = InferenceSettings(scales=(1.0,) * views, flip=True, base_size=64)
        with PeakLiveBytes() as meter:
            banded(model, [photo], settings)
        peaks.append(meter.peak)
    working_probs = NUM_CLASSES * 48 * 64 * 4  # one view's probabilities at working size
    # Holding each scale's working-size probabilities would add 5 of these.
    assert peaks[1] - peaks[0] < working_probs
