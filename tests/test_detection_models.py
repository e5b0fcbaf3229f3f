"""Detection models: wiring equal to torchvision's v2 models in torchvision's settings,
the ResNeSt-FPN trunk equal to the official ResNeSt, the authors' recipe settings, the
cascade's stages, and finite training losses (also for an image without boxes)."""

import pytest
import torch
import torch.nn.functional as F
from torchvision.models.detection import fasterrcnn_resnet50_fpn_v2, maskrcnn_resnet50_fpn_v2
from torchvision.ops import roi_align
from torchvision.ops.misc import FrozenBatchNorm2d

from segnest.errors import SegnestError
from segnest.models import create_model, list_models
from segnest.models.detection import build_rcnn
from segnest.models.detection.heads import (
    CascadeRoIHeads,
    LevelRoIAlign,
    box_regression_loss,
    fast_rcnn_losses,
)
from segnest.models.detection.rcnn import AUTHORS, TORCHVISION

# Tiny heads so that a training step takes well under a second on a CPU.
TINY = dict(stage_width=16, fpn_channels=32, head_channels=32, box_fc_channels=64,
            roi_batch_size_per_image=64, rpn_pre_nms_top_n_train=200,
            rpn_post_nms_top_n_train=100, rpn_pre_nms_top_n_test=200,
            rpn_post_nms_top_n_test=100, train_min_size=(64, 96), test_min_size=64,
            max_size=128)
ARCHITECTURES = ["faster_rcnn", "mask_rcnn", "cascade_rcnn", "cascade_mask_rcnn"]


def randomize_norm_stats(model: torch.nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, (torch.nn.BatchNorm2d, FrozenBatchNorm2d)):
            n = module.running_mean.numel()
            module.running_mean.copy_(torch.rand(n, generator=generator) - 0.5)
            module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
            module.weight.data.copy_(torch.rand(n, generator=generator) + 0.5)
            module.bias.data.copy_(torch.rand(n, generator=generator) - 0.5)


def calibrate_norm_stats(model: torch.nn.Module) -> None:
    """BatchNorm statistics measured in one training step on the test images, so that a
    randomly initialised model keeps activations near 1 (with the initial mean 0 / var 1
    they grow to hundreds, every score saturates and most boxes leave the image)."""
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # a cumulative average
    model.train()
    torch.manual_seed(4)
    model(images(), targets_with_an_empty_image())
    model.eval()


def soften_predictors(model: torch.nn.Module) -> None:
    """detectron2's predictor initialisation (std 0.01 scores, 0.001 deltas): with default
    Linear weights a random head's deltas are so large that every box is clipped away."""
    generator = torch.Generator().manual_seed(3)
    predictor = model.roi_heads.box_predictor
    for layer, std in ((predictor.cls_score, 0.01), (predictor.bbox_pred, 0.001)):
        layer.weight.data.copy_(torch.randn(layer.weight.shape, generator=generator) * std)


def images(seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.rand(3, 72, 96, generator=generator), torch.rand(3, 64, 80, generator=generator)]


def targets_with_an_empty_image() -> list[dict[str, torch.Tensor]]:
    masks = torch.zeros(2, 72, 96, dtype=torch.uint8)
    masks[0, 10:30, 10:40] = 1
    masks[1, 5:60, 20:90] = 1
    return [
        {"boxes": torch.tensor([[10.0, 10, 40, 30], [20, 5, 90, 60]]),
         "labels": torch.tensor([1, 3]), "masks": masks},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
         "masks": torch.zeros(0, 64, 80, dtype=torch.uint8)},
    ]


def assert_same_detections(ours: list[dict], theirs: list[dict], keys: tuple[str, ...]) -> None:
    assert len(ours) == len(theirs)
    for mine, reference in zip(ours, theirs, strict=True):
        assert len(reference["boxes"]) > 0
        for key in keys:
            # Pasted masks interpolate between pixels, so box differences of 1e-4 px
            # move a few mask pixels by up to 1e-3.
            tolerance = 1e-3 if key == "masks" else 1e-4
            torch.testing.assert_close(mine[key], reference[key], atol=tolerance, rtol=1e-4)


# Few RoIs keep the full-width ResNet-50 heads cheap; both models get the same numbers.
TORCHVISION_SIZES = dict(min_size=96, max_size=128, rpn_pre_nms_top_n_test=100,
                         rpn_post_nms_top_n_test=40)


@pytest.mark.parametrize("architecture, reference_builder, keys", [
    ("faster_rcnn", fasterrcnn_resnet50_fpn_v2, ("boxes", "labels", "scores")),
    ("mask_rcnn", maskrcnn_resnet50_fpn_v2, ("boxes", "labels", "scores", "masks")),
])
def test_torchvision_settings_on_resnet50_give_torchvision_v2_outputs(
        architecture, reference_builder, keys):
    torch.manual_seed(0)
    reference = reference_builder(weights=None, weights_backbone=None, num_classes=4,
                                  **TORCHVISION_SIZES).eval()
    calibrate_norm_stats(reference)
    soften_predictors(reference)
    ours = build_rcnn(architecture, "resnet50", 3, recipe="torchvision", train_min_size=(96,),
                      test_min_size=96, max_size=128, rpn_pre_nms_top_n_test=100,
                      rpn_post_nms_top_n_test=40).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    with torch.no_grad():
        assert_same_detections(ours(images()), reference(images()), keys)


def test_torchvision_settings_give_torchvision_v2_training_losses():
    torch.manual_seed(0)
    reference = maskrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None, num_classes=4,
                                         **TORCHVISION_SIZES)
    ours = build_rcnn("mask_rcnn", "resnet50", 3, recipe="torchvision", train_min_size=(96,),
                      test_min_size=96, max_size=128, backbone_norm="bn", frozen_stages=0)
    ours.load_state_dict(reference.state_dict(), strict=True)
    losses = []
    for model in (ours, reference):
        torch.manual_seed(1)  # the same RoI sampling draws
        losses.append(model(images(), targets_with_an_empty_image()))
    assert losses[0].keys() == losses[1].keys()
    for name in losses[1]:
        torch.testing.assert_close(losses[0][name], losses[1][name], atol=1e-5, rtol=1e-4)


def test_resnest_fpn_trunk_loads_official_weights_key_for_key_and_gives_their_stages(tmp_path):
    resnest_torch = pytest.importorskip("resnest.torch")
    torch.manual_seed(0)
    official = resnest_torch.resnest50(pretrained=False).eval()
    randomize_norm_stats(official, 2)
    path = tmp_path / "official_resnest50.pth"
    torch.save(official.state_dict(), path)
    model = build_rcnn("mask_rcnn", "resnest50", 3, pretrained_backbone=path).eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        ours = model.backbone.stage_features(x)
        expected = official.maxpool(official.relu(official.bn1(official.conv1(x))))
        for name in ("layer1", "layer2", "layer3", "layer4"):
            expected = getattr(official, name)(expected)
            torch.testing.assert_close(ours[name], expected, atol=1e-4, rtol=0)
    assert ours["layer4"].shape[-2:] == (2, 3)  # undilated: stride 32


def test_authors_recipe_freezes_stem_and_layer1_and_trains_later_batchnorm():
    model = build_rcnn("faster_rcnn", "resnest14", 3, **TINY)
    body = model.backbone.body
    for part in (body.conv1, body.bn1, body.layer1):
        assert not any(p.requires_grad for p in part.parameters())
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in part.modules())
    assert isinstance(body.bn1, FrozenBatchNorm2d)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in body.layer2.modules())
    assert all(p.requires_grad for p in body.layer2.parameters())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.backbone.fpn.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.roi_heads.box_head.modules())
    frozen = build_rcnn("faster_rcnn", "resnest14", 3, backbone_norm="frozen", **TINY)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in frozen.backbone.body.modules())


def test_head_and_fpn_norm_are_settings():
    model = build_rcnn("mask_rcnn", "resnest14", 3, fpn_norm=False, head_norm=False, **TINY)
    for part in (model.backbone.fpn, model.roi_heads.box_head, model.roi_heads.mask_head):
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in part.modules())


def test_recipes_differ_exactly_in_the_documented_settings():
    assert (AUTHORS.roi_align_aligned, AUTHORS.roi_sampling_ratio) == (True, 0)
    assert (TORCHVISION.roi_align_aligned, TORCHVISION.roi_sampling_ratio) == (False, 2)
    assert AUTHORS.box_loss_beta == AUTHORS.rpn_box_loss_beta == 0.0
    assert (AUTHORS.train_min_size, AUTHORS.train_size_sampling) == ((640, 800), "range")
    assert (AUTHORS.test_min_size, AUTHORS.max_size) == (800, 1333)
    assert (AUTHORS.rpn_convs, TORCHVISION.rpn_convs) == (1, 2)
    model = build_rcnn("cascade_rcnn", "resnest14", 3, **TINY)
    assert model.rpn._post_nms_top_n["training"] == TINY["rpn_post_nms_top_n_train"]
    assert build_rcnn("cascade_rcnn", "resnest14", 3, stage_width=16).rpn._post_nms_top_n[
        "training"] == 2000
    assert build_rcnn("faster_rcnn", "resnest14", 3, stage_width=16).rpn._post_nms_top_n[
        "training"] == 1000


def test_zero_beta_is_the_l1_loss_and_torchvision_beta_is_smooth_l1():
    deltas, targets = torch.randn(20, 4), torch.randn(20, 4)
    torch.testing.assert_close(box_regression_loss(deltas, targets, 0.0),
                               (deltas - targets).abs().sum())
    torch.testing.assert_close(box_regression_loss(deltas, targets, 1 / 9),
                               F.smooth_l1_loss(deltas, targets, beta=1 / 9, reduction="sum"))


def test_box_head_loss_uses_the_class_regressor_or_the_one_agnostic_box():
    labels = [torch.tensor([0, 2, 1])]
    targets = [torch.randn(3, 4)]
    logits = torch.randn(3, 3)
    per_class = torch.randn(3, 12)
    losses = fast_rcnn_losses(logits, per_class, labels, targets, 0.0)
    chosen = per_class.view(3, 3, 4)[[1, 2], [2, 1]]
    torch.testing.assert_close(losses["loss_box_reg"], (chosen - targets[0][1:]).abs().sum() / 3)
    agnostic = torch.randn(3, 4)
    losses = fast_rcnn_losses(logits, agnostic, labels, targets, 0.0)
    torch.testing.assert_close(losses["loss_box_reg"],
                               (agnostic[1:] - targets[0][1:]).abs().sum() / 3)


def test_aligned_roi_pooling_is_detectron2_roialignv2_on_the_mapped_level():
    generator = torch.Generator().manual_seed(0)
    features = {str(i): torch.randn(1, 4, 64 // 2**i, 64 // 2**i, generator=generator)
                for i in range(4)}
    # A 30 px box maps to P2 (stride 4), a 120 px box to P3, a 230 px box to P4.
    boxes = [torch.tensor([[3.3, 5.1, 33.3, 35.1], [10.0, 20.0, 130.0, 140.0],
                           [10.0, 20.0, 240.0, 250.0]])]
    pooler = LevelRoIAlign(("0", "1", "2", "3"), 7, sampling_ratio=0, aligned=True)
    pooled = pooler(features, boxes, [(256, 256)])
    for row, level, scale in ((0, "0", 1 / 4), (1, "1", 1 / 8), (2, "2", 1 / 16)):
        rois = torch.cat([torch.zeros(1, 1), boxes[0][row:row + 1]], dim=1)
        expected = roi_align(features[level], rois, 7, spatial_scale=scale, sampling_ratio=0,
                             aligned=True)
        torch.testing.assert_close(pooled[row:row + 1], expected)


def test_range_sampling_draws_every_training_size_between_the_bounds():
    model = build_rcnn("faster_rcnn", "resnest14", 3, stage_width=16).train()
    torch.manual_seed(0)
    drawn = {model.transform.draw_train_size() for _ in range(2000)}
    assert drawn == set(range(640, 801))
    model.eval()
    resized, _ = model.transform.resize(torch.rand(3, 50, 100))
    assert resized.shape[-2:] == (666, 1333)  # the long side caps the test size of 800


def test_cascade_has_three_stages_at_rising_iou_with_their_own_heads_and_coder_weights():
    model = build_rcnn("cascade_rcnn", "resnest14", 3, **TINY)
    heads = model.roi_heads
    assert isinstance(heads, CascadeRoIHeads)
    assert heads.stage_ious == (0.5, 0.6, 0.7)
    assert [coder.weights for coder in heads.stage_coders] == [
        (10.0, 10.0, 5.0, 5.0), (20.0, 20.0, 10.0, 10.0), (30.0, 30.0, 15.0, 15.0)]
    assert [p.bbox_pred.out_features for p in heads.box_predictor] == [4, 4, 4]
    assert [p.cls_score.out_features for p in heads.box_predictor] == [4, 4, 4]
    assert len({id(h) for h in heads.box_head}) == 3


def test_cascade_stage_labels_follow_each_stage_iou_and_targets_its_coder_weights():
    heads = build_rcnn("cascade_rcnn", "resnest14", 3, **TINY).roi_heads
    gt = {"boxes": torch.tensor([[0.0, 0.0, 100.0, 100.0]]), "labels": torch.tensor([2])}
    # IoUs with the ground truth: 0.81, 0.64, 0.55, 0.36.
    rois = [torch.tensor([[0.0, 0.0, 100.0, 81.0], [0.0, 0.0, 100.0, 64.0],
                          [0.0, 0.0, 100.0, 55.0], [0.0, 0.0, 100.0, 36.0]])]
    expected = {0: [2, 2, 2, 0], 1: [2, 2, 0, 0], 2: [2, 0, 0, 0]}
    targets_per_stage = []
    for stage in range(3):
        labels, targets = heads.label_rois(stage, rois, [gt])
        assert labels[0].tolist() == expected[stage]
        targets_per_stage.append(targets[0])
    torch.testing.assert_close(targets_per_stage[2], 3 * targets_per_stage[0])
    labels, _ = heads.label_rois(1, rois, [{"boxes": torch.zeros(0, 4),
                                            "labels": torch.zeros(0, dtype=torch.int64)}])
    assert labels[0].tolist() == [0, 0, 0, 0]


def test_cascade_averages_stage_scores_and_takes_the_last_stage_boxes(monkeypatch):
    heads = build_rcnn("cascade_rcnn", "resnest14", 2, **TINY).roi_heads.eval()
    stage_logits = [torch.tensor([[0.0, 3.0, 0.0]]), torch.tensor([[0.0, 0.0, 3.0]]),
                    torch.tensor([[0.0, 2.0, 0.0]])]
    stage_deltas = [torch.tensor([[0.1, 0.0, 0.0, 0.0]]), torch.tensor([[0.0, 0.2, 0.0, 0.0]]),
                    torch.tensor([[0.0, 0.0, 0.3, 0.0]])]
    seen_rois = []

    def fake_stage(stage, features, rois, image_shapes):
        seen_rois.append(rois[0].clone())
        return stage_logits[stage], stage_deltas[stage]

    monkeypatch.setattr(heads, "run_stage", fake_stage)
    proposal = [torch.tensor([[10.0, 10.0, 50.0, 50.0]])]
    result = heads.box_inference({}, proposal, [(100, 100)])[0]
    probabilities = torch.stack([F.softmax(logits, -1) for logits in stage_logits]).mean(0)[0]
    assert result["labels"].tolist() == [1, 2]
    torch.testing.assert_close(result["scores"], probabilities[1:])
    for stage in (1, 2):  # each stage refines the previous stage's boxes with its own weights
        torch.testing.assert_close(seen_rois[stage], heads.stage_coders[stage - 1].decode(
            stage_deltas[stage - 1], [seen_rois[stage - 1]])[:, 0])
    final = heads.stage_coders[2].decode(stage_deltas[2], [seen_rois[2]])[:, 0]
    torch.testing.assert_close(result["boxes"], final.expand(2, 4))


def test_cascade_scales_the_pooled_feature_gradient_by_one_over_the_stages():
    heads = build_rcnn("cascade_rcnn", "resnest14", 3, **TINY).roi_heads.train()
    captured = []
    heads.box_head[0].register_forward_pre_hook(lambda module, args: captured.append(args[0]))
    feature = torch.randn(1, 32, 16, 16, requires_grad=True)
    heads.run_stage(0, {str(i): feature for i in range(4)},
                    [torch.tensor([[0.0, 0.0, 40.0, 40.0]])], [(64, 64)])
    captured[0].backward(torch.ones_like(captured[0]))
    reference = feature.detach().clone().requires_grad_(True)
    pooled = heads.box_roi_pool({str(i): reference for i in range(4)},
                                [torch.tensor([[0.0, 0.0, 40.0, 40.0]])], [(64, 64)])
    pooled.backward(torch.ones_like(pooled))
    torch.testing.assert_close(feature.grad, reference.grad / 3)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_training_gives_finite_losses_and_gradients_with_an_image_without_boxes(architecture):
    torch.manual_seed(0)
    model = create_model(f"{architecture}_resnest14", num_classes=3, **TINY).train()
    losses = model(images(), targets_with_an_empty_image())
    assert ("loss_mask" in losses) == ("mask" in architecture)
    assert ("loss_box_reg_stage2" in losses) == architecture.startswith("cascade")
    assert all(torch.isfinite(value) for value in losses.values())
    sum(losses.values()).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    model.eval()
    with torch.no_grad():
        outputs = model(images())
    assert ("masks" in outputs[0]) == ("mask" in architecture)
    if "mask" in architecture:
        assert outputs[0]["masks"].shape[-2:] == (72, 96)


def test_unpasted_masks_stay_low_resolution_beside_the_same_boxes():
    torch.manual_seed(0)
    model = create_model("mask_rcnn_resnest14", num_classes=3, **TINY).eval()
    with torch.no_grad():
        pasted = model(images())
        model.transform.paste_masks = False
        low = model(images())
    torch.testing.assert_close(low[0]["boxes"], pasted[0]["boxes"])
    assert "masks" not in low[0] and low[0]["mask_probs"].shape[1:] == (1, 28, 28)


def test_detection_names_are_registered_and_bad_settings_are_one_error():
    names = list_models()
    for architecture in ARCHITECTURES:
        assert f"{architecture}_resnest50" in names and f"{architecture}_resnet50" in names
    with pytest.raises(SegnestError, match="unknown detection settings"):
        create_model("mask_rcnn_resnest14", num_classes=3, roi_align=True)
    with pytest.raises(SegnestError, match="train_size_sampling"):
        create_model("faster_rcnn_resnest14", num_classes=3, train_size_sampling="uniform")
