"""Specs for whole-image, sliding-window and multi-scale + flip inference."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from segnest.errors import SegnestError
from segnest.inference.settings import InferenceSettings
from segnest.inference.strategies import (
    infer,
    multi_scale_inference,
    predict_logits,
    slide_inference,
    whole_inference,
)

NUM_CLASSES = 5


def conv_model(seed=0, kernel=3):
    """A small deterministic fully convolutional net (3x3 by default, 1x1 = pointwise)."""
    torch.manual_seed(seed)
    padding = kernel // 2
    return nn.Sequential(
        nn.Conv2d(3, 8, kernel, padding=padding),
        nn.ReLU(),
        nn.Conv2d(8, NUM_CLASSES, kernel, padding=padding),
    ).eval()


def mirror_symmetric_model(seed=0):
    """A 3x3 conv net whose kernels are left-right symmetric, hence flip-equivariant."""
    model = conv_model(seed)
    with torch.no_grad():
        for layer in model:
            if isinstance(layer, nn.Conv2d):
                layer.weight.copy_((layer.weight + layer.weight.flip(-1)) / 2)
    return model


class Recorder(nn.Module):
    """Wraps a model and keeps every input it sees."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.inputs = []

    def forward(self, x):
        self.inputs.append(x.clone())
        return self.model(x)


def image(height=40, width=48, batch=1, seed=1):
    torch.manual_seed(seed)
    return torch.randn(batch, 3, height, width)


@pytest.fixture(autouse=True)
def no_grad():
    with torch.inference_mode():
        yield


def test_whole_inference_returns_probabilities_at_input_size():
    probs = whole_inference(conv_model(), image(batch=2), NUM_CLASSES)
    assert probs.shape == (2, NUM_CLASSES, 40, 48)
    assert torch.allclose(probs.sum(1), torch.ones(2, 40, 48), atol=1e-6)
    assert probs.min() >= 0


def test_slide_with_one_window_covering_the_image_equals_whole():
    model, x = conv_model(), image(40, 48)
    slide = slide_inference(model, x, NUM_CLASSES, crop_size=(40, 48), stride=(20, 24))
    assert torch.equal(slide, whole_inference(model, x, NUM_CLASSES))


def test_overlapping_windows_of_a_pointwise_model_equal_whole():
    model, x = conv_model(kernel=1), image(64, 80)
    slide = slide_inference(model, x, NUM_CLASSES, crop_size=32, stride=20)
    assert torch.allclose(slide, whole_inference(model, x, NUM_CLASSES), atol=1e-6)


def test_overlapping_windows_average_softmax_probabilities():
    model, x = conv_model(), image(32, 48)
    slide = slide_inference(model, x, NUM_CLASSES, crop_size=32, stride=16)
    left = whole_inference(model, x[..., :32], NUM_CLASSES)
    right = whole_inference(model, x[..., 16:], NUM_CLASSES)
    expected = torch.cat(
        [left[..., :16], (left[..., 16:] + right[..., :16]) / 2, right[..., 16:]], dim=-1
    )
    assert torch.allclose(slide, expected, atol=1e-6)


def test_last_window_ends_at_the_image_edge_without_padding():
    recorder, x = Recorder(conv_model(kernel=1)), image(64, 52)
    slide_inference(recorder, x, NUM_CLASSES, crop_size=32, stride=20)
    # rows start at 0, 20, 32 (= 64 - 32); columns at 0, 20 (= 52 - 32)
    origins = [(top, left) for top in (0, 20, 32) for left in (0, 20)]
    assert len(recorder.inputs) == len(origins)
    for window, (top, left) in zip(recorder.inputs, origins):
        assert torch.equal(window, x[:, :, top : top + 32, left : left + 32])


def test_padding_of_an_image_smaller_than_the_crop_never_leaks():
    model, x = conv_model(kernel=1), image(24, 40)
    slide = slide_inference(model, x, NUM_CLASSES, crop_size=48, stride=32)
    assert slide.shape == (1, NUM_CLASSES, 24, 40)
    assert torch.allclose(slide, whole_inference(model, x, NUM_CLASSES), atol=1e-6)


def test_stride_larger_than_crop_is_refused():
    with pytest.raises(SegnestError, match="stride"):
        slide_inference(conv_model(), image(64, 64), NUM_CLASSES, crop_size=32, stride=40)


def test_single_scale_one_is_exactly_whole_inference():
    model, x = conv_model(), image()
    assert torch.equal(
        multi_scale_inference(model, x, NUM_CLASSES), whole_inference(model, x, NUM_CLASSES)
    )


def test_scales_resize_the_long_side_to_base_size_times_scale():
    recorder = Recorder(conv_model())
    probs = multi_scale_inference(
        recorder, image(32, 64), NUM_CLASSES, scales=(0.5, 1.0), base_size=48
    )
    assert [tuple(x.shape[-2:]) for x in recorder.inputs] == [(12, 24), (24, 48)]
    assert probs.shape == (1, NUM_CLASSES, 32, 64)


def test_multi_scale_averages_the_probabilities_of_each_scale():
    model, x = conv_model(), image(32, 48)
    half = F.interpolate(x, size=(16, 24), mode="bilinear", align_corners=False)
    half_probs = F.interpolate(
        whole_inference(model, half, NUM_CLASSES),
        size=(32, 48),
        mode="bilinear",
        align_corners=False,
    )
    expected = (half_probs + whole_inference(model, x, NUM_CLASSES)) / 2
    probs = multi_scale_inference(model, x, NUM_CLASSES, scales=(0.5, 1.0))
    assert torch.allclose(probs, expected, atol=1e-6)


def test_flip_of_a_mirror_symmetric_model_changes_nothing():
    model, x = mirror_symmetric_model(), image()
    flipped = multi_scale_inference(model, x, NUM_CLASSES, flip=True)
    assert torch.allclose(flipped, whole_inference(model, x, NUM_CLASSES), atol=1e-6)


def test_flip_averages_plain_and_mirrored_views_in_one_forward_call():
    recorder, x = Recorder(conv_model()), image(batch=2)
    probs = multi_scale_inference(recorder, x, NUM_CLASSES, flip=True)
    assert len(recorder.inputs) == 1 and recorder.inputs[0].shape[0] == 4
    plain = whole_inference(recorder.model, x, NUM_CLASSES)
    mirrored = whole_inference(recorder.model, x.flip(-1), NUM_CLASSES).flip(-1)
    assert torch.allclose(probs, (plain + mirrored) / 2, atol=1e-6)


def test_slide_multi_scale_flip_outputs_probabilities_at_input_size():
    cfg = InferenceSettings(mode="slide", scales=(0.75, 1.25), flip=True, window_size=32)
    probs = infer(conv_model(), image(40, 56), NUM_CLASSES, cfg)
    assert probs.shape == (1, NUM_CLASSES, 40, 56)
    assert torch.allclose(probs.sum(1), torch.ones(1, 40, 56), atol=1e-5)


def test_infer_dispatches_to_the_configured_strategy():
    model, x = conv_model(), image(64, 64)
    cfg = InferenceSettings(mode="slide", window_size=32, stride=16)
    expected = slide_inference(model, x, NUM_CLASSES, crop_size=32, stride=16)
    assert torch.equal(infer(model, x, NUM_CLASSES, cfg), expected)


def test_dict_returning_model_uses_the_out_logits():
    model, x = conv_model(), image()

    def dict_model(batch):
        return {"out": model(batch), "aux": torch.zeros(1)}

    assert torch.equal(
        whole_inference(dict_model, x, NUM_CLASSES), whole_inference(model, x, NUM_CLASSES)
    )


def test_low_resolution_logits_are_upsampled_to_the_input():
    model = nn.Sequential(conv_model(), nn.AvgPool2d(4))
    x = image(40, 48)
    logits = predict_logits(model, x)
    assert logits.shape == (1, NUM_CLASSES, 40, 48)
    expected = F.interpolate(model(x), size=(40, 48), mode="bilinear", align_corners=False)
    assert torch.equal(logits, expected)


def test_model_with_wrong_class_count_is_refused():
    with pytest.raises(SegnestError, match="classes"):
        whole_inference(conv_model(), image(), NUM_CLASSES + 1)
