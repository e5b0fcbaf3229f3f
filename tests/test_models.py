"""Specs for the ResNeSt family, Split-Attention and DeepLabV3."""

import pytest
import torch
from torch import nn
from torchvision.ops import DropBlock2d

import segnest
from segnest.errors import SegnestError
from segnest.models import create_model, list_models
from segnest.models.resnest import RESNEST_VARIANTS
from segnest.models.splat import DropBlock, SplitAttentionConv

TINY = dict(stage_width=8, stem_width=8)


@pytest.mark.parametrize(
    "name, expected",
    [
        ("resnest50", 27_483_240),
        ("resnest101", 48_275_016),
        ("resnest200", 70_201_544),
        ("resnest269", 110_929_480),
        ("resnest50_fast_1s1x64d", 26_217_896),
        ("resnest50_fast_2s2x40d", 26_943_792),
        ("resnest50_fast_4s2x40d", 30_417_592),
    ],
)
def test_parameter_count_with_1000_class_head_matches_reference(name, expected):
    with torch.device("meta"):
        model = create_model(name, num_classes=1000)
    assert sum(p.numel() for p in model.parameters()) == expected


@pytest.mark.parametrize("name, keys", [("resnest50", 476), ("resnest101", 935)])
def test_state_dict_key_totals_match_reference(name, keys):
    with torch.device("meta"):
        model = create_model(name, num_classes=1000)
    assert len(model.state_dict()) == keys


def test_every_table_row_builds():
    for name in RESNEST_VARIANTS:
        with torch.device("meta"):
            create_model(name, num_classes=10)
    assert set(list_models()) >= {"resnest14", "resnest26", "resnet50d", "resnet101d",
                                  "deeplabv3_resnest101"}


def cardinal_major_split_attention(module: SplitAttentionConv, x: torch.Tensor) -> torch.Tensor:
    """Eq. 1-3 of the paper written out group by group: a slow, direct reading."""
    radix, card, channels = module.radix, module.cardinality, module.channels
    feats = module.relu(module.bn0(module.conv(x)))
    width = channels // card
    # The grouped conv's output group g = r * card + k holds split r of cardinal group k.
    split = lambda r, k: feats[:, (r * card + k) * width:(r * card + k + 1) * width]  # noqa: E731
    gap = torch.cat([sum(split(r, k) for r in range(radix)) for k in range(card)], 1)
    gap = gap.mean(dim=(2, 3), keepdim=True)
    logits = module.fc2(module.relu(module.bn1(module.fc1(gap))))
    outputs = []
    for k in range(card):
        # fc2 is grouped by cardinality: group k emits radix x width logits, radix-major.
        group_logits = logits[:, k * radix * width:(k + 1) * radix * width]
        group_logits = group_logits.reshape(x.shape[0], radix, width, 1, 1)
        if radix == 1:
            weights = torch.sigmoid(group_logits)
        else:
            weights = torch.softmax(group_logits, dim=1)
        outputs.append(sum(weights[:, r] * split(r, k) for r in range(radix)))
    return torch.cat(outputs, dim=1)


@pytest.mark.parametrize("radix", [1, 2, 4])
@pytest.mark.parametrize("cardinality", [1, 2, 4])
def test_split_attention_equals_direct_cardinal_major_equations(radix, cardinality):
    torch.manual_seed(radix * 10 + cardinality)
    module = SplitAttentionConv(16, 32, groups=cardinality, radix=radix).eval()
    for bn in (module.bn0, module.bn1):
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.uniform_(0.5, 1.5)
    x = torch.randn(2, 16, 9, 7)
    torch.testing.assert_close(module(x), cardinal_major_split_attention(module, x),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("output_stride, size", [(8, 8), (16, 4), (32, 2)])
def test_stage_feature_shapes_follow_output_stride(output_stride, size):
    model = create_model("resnest14", output_stride=output_stride, **TINY).eval()
    features = model(torch.randn(1, 3, 64, 64))
    assert list(features) == ["layer1", "layer2", "layer3", "layer4"]
    assert features["layer1"].shape == (1, 32, 16, 16)
    assert features["layer2"].shape == (1, 64, 8, 8)
    assert features["layer4"].shape == (1, 256, size, size)


def test_dilated_stages_follow_reference_rule():
    model = create_model("resnest26", output_stride=8, **TINY)
    layer3, layer4 = model.layer3, model.layer4
    assert [b.conv2.conv.dilation[0] for b in layer3] == [1, 2]
    assert [b.conv2.conv.dilation[0] for b in layer4] == [2, 4]
    pool = layer3[0].avd_layer
    assert (pool.kernel_size, pool.stride, pool.padding) == (3, 1, 1)
    assert layer4[0].downsample[0].kernel_size == 1
    assert layer1_has_no_avd(model)


def layer1_has_no_avd(model):
    return all(block.avd_layer is None for block in model.layer1)


@pytest.mark.parametrize("name", ["resnest14", "resnet50d", "resnest50_fast_2s2x40d"])
def test_gradients_reach_every_parameter(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=5, stage_width=16, stem_width=8)
    model(torch.randn(2, 3, 32, 32)).logsumexp(1).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_deeplabv3_gradients_reach_every_parameter():
    torch.manual_seed(0)
    model = create_model("deeplabv3_resnest14", num_classes=4, head_channels=16, **TINY)
    out = model(torch.randn(2, 3, 33, 45))
    (out["out"].logsumexp(1).sum() + out["aux"].logsumexp(1).sum()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


@pytest.mark.parametrize("output_stride", [8, 16])
def test_deeplabv3_returns_input_size_logits_for_any_size(output_stride):
    model = create_model("deeplabv3_resnest14", num_classes=3, head_channels=16,
                         output_stride=output_stride, **TINY)
    model.train()
    out = model(torch.randn(2, 3, 37, 51))
    assert out["out"].shape == out["aux"].shape == (2, 3, 37, 51)
    model.eval()
    assert list(model(torch.randn(1, 3, 37, 51))) == ["out"]


def test_deeplabv3_aspp_rates_follow_output_stride():
    rates = lambda m: [b[0].dilation[0] for b in m.head[0].branches[1:4]]  # noqa: E731
    assert rates(create_model("deeplabv3_resnest14", num_classes=3,
                              output_stride=8, **TINY)) == [12, 24, 36]
    assert rates(create_model("deeplabv3_resnest14", num_classes=3,
                              output_stride=16, **TINY)) == [6, 12, 18]


def test_aux_head_can_be_disabled():
    model = create_model("deeplabv3_resnest14", num_classes=3, aux=False, **TINY).train()
    assert model.aux_head is None and list(model(torch.randn(2, 3, 32, 32))) == ["out"]


def test_zero_init_last_gamma_and_options():
    model = create_model("resnest14", num_classes=10, last_gamma=True, final_drop=0.2,
                         dropblock_prob=0.1, **TINY)
    assert all(b.bn3.weight.abs().sum() == 0 for b in model.modules() if hasattr(b, "bn3"))
    assert isinstance(model.drop, nn.Dropout)
    assert not any("DropBlock" in type(m).__name__ for m in model.layer2.modules())
    assert any("DropBlock" in type(m).__name__ for m in model.layer4.modules())


@pytest.mark.parametrize("size", [32, 48, 64, 100])
def test_dropblock_trains_on_maps_smaller_than_its_block(size):
    # Output stride 32: 1x1, 2x2, 2x2 and 4x4 maps in layer4, 2x2 or less in layer3 too.
    torch.manual_seed(0)
    model = create_model("resnest14", num_classes=3, dropblock_prob=0.5, **TINY).train()
    dropped = {}

    def record(name):
        def hook(module, inputs, output):
            dropped[name] = (tuple(inputs[0].shape[-2:]), bool((output == 0).any()))
        return hook

    for name, module in model.named_modules():
        if isinstance(module, DropBlock):
            module.register_forward_hook(record(name))
    model(torch.randn(2, 3, size, size)).sum().backward()
    # Every DropBlock, small maps included, dropped activations (no silent pass-through),
    # and the step gave every parameter a finite gradient.
    assert dropped and all(hit for _, hit in dropped.values()), dropped
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_dropblock_equals_torchvision_when_the_block_fits():
    x = torch.randn(2, 4, 9, 9)
    torch.manual_seed(0)
    expected = DropBlock2d(0.3, 3)(x)
    torch.manual_seed(0)
    torch.testing.assert_close(DropBlock(0.3, 3)(x), expected)


def test_norm_layer_argument_is_used_everywhere():
    model = create_model("deeplabv3_resnest14", num_classes=3,
                         norm_layer=lambda c: nn.GroupNorm(4, c), **TINY)
    norms = [m for m in model.modules() if isinstance(m, (nn.GroupNorm, nn.BatchNorm2d))]
    assert norms and all(isinstance(m, nn.GroupNorm) for m in norms)


def test_unknown_model_name_lists_valid_names():
    with pytest.raises(SegnestError, match="resnest50.*resnest101"):
        create_model("resnest51")


def test_unknown_override_is_a_clear_error():
    with pytest.raises(SegnestError, match="create_model\\('resnest14'\\)"):
        create_model("resnest14", nonsense=1)


def test_public_api_exports():
    assert segnest.create_model is create_model and callable(segnest.load_pretrained)
    assert segnest.__version__
