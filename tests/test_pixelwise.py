"""The training loss that upsamples by itself, the layout-following softmax and loss, and
DeepLabV3's channels_last head: same numbers as the plain PyTorch path."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from segnest.models import create_model, pixelwise
from segnest.models.pixelwise import (
    channel_softmax,
    pixel_cross_entropy,
    upsampled_cross_entropy,
)
from segnest.tasks.segmentation.task import segmentation_loss

IGNORE = 255


def reference_loss(logits, target, align_corners=True):
    full = F.interpolate(logits, size=target.shape[-2:], mode="bilinear",
                         align_corners=align_corners)
    return F.cross_entropy(full, target, ignore_index=IGNORE)


def loss_and_grad(fn, logits, target, **kwargs):
    leaf = logits.detach().clone().requires_grad_()
    loss = fn(leaf, target, **kwargs)
    loss.backward()
    return loss.detach(), leaf.grad


def make_target(batch, height, width, classes, seed=0):
    generator = torch.Generator().manual_seed(seed)
    target = torch.randint(0, classes, (batch, height, width), generator=generator)
    target[:, : height // 5] = IGNORE  # a band of unlabelled pixels
    target[0, -1, -3:] = IGNORE
    return target


@pytest.mark.parametrize("align_corners", [True, False])
@pytest.mark.parametrize("low, full", [((8, 8), (64, 64)), ((7, 5), (33, 29)),
                                       ((1, 1), (9, 6)), ((6, 4), (6, 4))])
def test_upsampled_cross_entropy_equals_interpolate_then_cross_entropy(align_corners, low,
                                                                       full, monkeypatch):
    # Bands of a few rows, so that several bands and a short last one are exercised.
    monkeypatch.setattr(pixelwise, "CHUNK_BYTES", 2 * 5 * full[1] * 4 * 3)
    torch.manual_seed(0)
    logits = torch.randn(2, 5, *low) * 3
    target = make_target(2, *full, classes=5)
    expected = loss_and_grad(reference_loss, logits, target, align_corners=align_corners)
    got = loss_and_grad(upsampled_cross_entropy, logits, target, ignore_index=IGNORE,
                        align_corners=align_corners)
    torch.testing.assert_close(got[0], expected[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[1], expected[1], rtol=1e-5, atol=1e-7)


def test_upsampled_cross_entropy_in_channels_last_and_under_a_scaled_gradient():
    torch.manual_seed(1)
    logits = torch.randn(2, 4, 6, 6).contiguous(memory_format=torch.channels_last)
    target = make_target(2, 24, 24, classes=4)

    def scaled(fn):
        def run(leaf, target, **kwargs):
            return 3.0 * fn(leaf, target, **kwargs)
        return run

    expected = loss_and_grad(scaled(reference_loss), logits, target)
    got = loss_and_grad(scaled(upsampled_cross_entropy), logits, target, ignore_index=IGNORE)
    torch.testing.assert_close(got[0], expected[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[1], expected[1], rtol=1e-5, atol=1e-7)


def test_upsampled_cross_entropy_refuses_bad_targets():
    logits = torch.randn(1, 3, 4, 4)
    target = torch.zeros(1, 16, 16, dtype=torch.long)
    target[0, 3, 3] = 3  # not a class and not the ignore index
    with pytest.raises(ValueError, match=r"outside \[0, 3\)"):
        upsampled_cross_entropy(logits, target, ignore_index=IGNORE)
    with pytest.raises(ValueError, match="expected logits"):
        upsampled_cross_entropy(logits, target[0], ignore_index=IGNORE)


def test_pixel_cross_entropy_and_softmax_follow_the_layout():
    torch.manual_seed(2)
    logits = torch.randn(2, 6, 5, 7)
    target = make_target(2, 5, 7, classes=6)
    last = logits.contiguous(memory_format=torch.channels_last)
    assert pixelwise.class_rows(last) is not None and pixelwise.class_rows(logits) is None
    expected = F.cross_entropy(logits, target, ignore_index=IGNORE)
    torch.testing.assert_close(pixel_cross_entropy(last, target, IGNORE), expected)
    torch.testing.assert_close(pixel_cross_entropy(logits, target, IGNORE), expected)
    probs = channel_softmax(last)
    torch.testing.assert_close(probs, logits.softmax(dim=1))
    assert probs.is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match="does not match"):
        pixel_cross_entropy(last, target[:, :4], IGNORE)


def plain_forward(model, x):
    """DeepLabV3 as the reference runs it: every tensor NCHW, logits upsampled in NCHW."""
    features = model.backbone.forward_stages(x)
    size = x.shape[-2:]
    out = {"out": F.interpolate(model.head(features["layer4"]), size=size,
                                mode="bilinear", align_corners=True)}
    if model.training:
        out["aux"] = F.interpolate(model.aux_head(features["layer3"]), size=size,
                                   mode="bilinear", align_corners=True)
    return out


def tiny_deeplab():
    torch.manual_seed(0)
    return create_model("deeplabv3_resnest14", num_classes=5, head_channels=16,
                        stage_width=8, stem_width=8)


def test_channels_last_head_gives_the_plain_outputs_in_eval():
    model = tiny_deeplab().eval()
    x = torch.randn(2, 3, 56, 48)
    with torch.inference_mode():
        got, expected = model(x)["out"], plain_forward(model, x)["out"]
        low = model(x, upsample=False)["out"]
    assert got.is_contiguous(memory_format=torch.channels_last)
    assert low.shape == (2, 5, 7, 6)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def no_dropout(model: nn.Module) -> nn.Module:
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    return model


def test_training_step_with_the_upsampling_loss_equals_the_plain_step():
    """segnest train on a CPU: model(x, upsample=False) + the loss that upsamples gives the
    loss and every gradient of the reference step (NCHW, upsample, F.cross_entropy)."""
    model = no_dropout(tiny_deeplab()).train()
    twin = copy.deepcopy(model)
    x = torch.randn(2, 3, 64, 64)
    target = make_target(2, 64, 64, classes=5)
    loss, aux = segmentation_loss(model(x, upsample=False), target, aux_weight=0.4)
    loss.backward()
    plain = plain_forward(twin, x)
    expected_aux = F.cross_entropy(plain["aux"], target, ignore_index=IGNORE)
    expected = F.cross_entropy(plain["out"], target, ignore_index=IGNORE) + 0.4 * expected_aux
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(aux, expected_aux, rtol=1e-5, atol=1e-6)
    # Another summation order (channels_last head, banded loss) moves each gradient by
    # float rounding relative to its tensor's scale, not to each element: an element near
    # zero in a tensor of large gradients differs by more than its own 1e-4.
    for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        scale = float(q.grad.abs().max())
        assert float((p.grad - q.grad).abs().max()) <= 1e-4 * scale + 1e-6, name
