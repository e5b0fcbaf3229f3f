"""segnest's ResNeSt equals the authors' implementation (the `resnest` package, v0.0.5).

A randomly initialised official model (pretrained=False, nothing downloaded) is given
random BN statistics, its state dict is loaded strictly into segnest's model, and both
must agree within 1e-4: classifier logits in eval mode and layer4 features of the
dilated backbones at output stride 8 and 16.
"""

import pytest
import torch

from segnest.models import create_model

resnest_torch = pytest.importorskip("resnest.torch")
from resnest.torch.resnet import Bottleneck as RefBottleneck  # noqa: E402
from resnest.torch.resnet import ResNet as RefResNet  # noqa: E402


def randomize_norm_stats(model: torch.nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            n = module.num_features
            module.running_mean.copy_(torch.rand(n, generator=generator) - 0.5)
            module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
            module.weight.data.copy_(torch.rand(n, generator=generator) + 0.5)
            module.bias.data.copy_(torch.rand(n, generator=generator) - 0.5)


def reference_layer4(ref: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    x = ref.maxpool(ref.relu(ref.bn1(ref.conv1(x))))
    return ref.layer4(ref.layer3(ref.layer2(ref.layer1(x))))


@pytest.fixture(scope="module")
def official_resnest50():
    torch.manual_seed(0)
    ref = resnest_torch.resnest50(pretrained=False).eval()
    randomize_norm_stats(ref, 1)
    return ref


def test_official_resnest50_classifier_logits_match(official_resnest50):
    ours = create_model("resnest50", num_classes=1000).eval()
    ours.load_state_dict(official_resnest50.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), official_resnest50(x), atol=1e-4, rtol=0)


@pytest.mark.parametrize("output_stride, ref_kwargs", [(8, {"dilated": True}),
                                                       (16, {"dilation": 2})])
def test_dilated_backbone_features_match_reference(output_stride, ref_kwargs):
    torch.manual_seed(0)
    ref = resnest_torch.resnest50(pretrained=False, **ref_kwargs).eval()
    randomize_norm_stats(ref, 2)
    ours = create_model("resnest50", output_stride=output_stride).eval()
    state = {k: v for k, v in ref.state_dict().items() if not k.startswith("fc.")}
    ours.load_state_dict(state, strict=True)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = reference_layer4(ref, x)
        got = ours(x)["layer4"]
    assert got.shape[-1] == 64 // output_stride
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ["resnest50_fast_1s4x24d", "resnest50_fast_4s2x40d"])
def test_fast_variants_match_reference(name):
    torch.manual_seed(0)
    ref = getattr(resnest_torch, name)(pretrained=False).eval()
    randomize_norm_stats(ref, 3)
    ours = create_model(name, num_classes=1000).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), atol=1e-4, rtol=0)


def test_resnet50d_baseline_matches_reference_plain_bottleneck():
    torch.manual_seed(0)
    ref = RefResNet(RefBottleneck, [3, 4, 6, 3], radix=0, deep_stem=True, stem_width=32,
                    avg_down=True).eval()
    randomize_norm_stats(ref, 4)
    ours = create_model("resnet50d", num_classes=1000).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), atol=1e-4, rtol=0)
