"""load_pretrained: official, timm, DDP and segnest checkpoints land where they belong."""

import hashlib
from pathlib import Path

import pytest
import torch

import segnest
from segnest.errors import SegnestError
from segnest.models import create_model
from segnest.models.weights import OFFICIAL_WEIGHTS

TINY = dict(stage_width=8, stem_width=8)


def classifier_state(seed: int = 0) -> dict:
    torch.manual_seed(seed)
    return create_model("resnest14", num_classes=1000, **TINY).state_dict()


def assert_backbone_equal(backbone_state: dict, source: dict) -> None:
    for key, value in backbone_state.items():
        torch.testing.assert_close(value, source[key], atol=0, rtol=0, msg=key)


def test_official_layout_loads_into_classifier_and_dilated_backbone(tmp_path):
    state = classifier_state()
    path = tmp_path / "resnest14-official.pth"
    torch.save(state, path)
    classifier = create_model("resnest14", num_classes=1000, **TINY)
    segnest.load_pretrained(classifier, path)
    assert_backbone_equal(classifier.state_dict(), state)
    backbone = create_model("resnest14", output_stride=8, **TINY)
    report = segnest.load_pretrained(backbone, path)
    assert report.skipped == ["fc.bias", "fc.weight"]
    assert_backbone_equal(backbone.state_dict(), state)


def test_backbone_checkpoint_loads_into_segmentation_model(tmp_path):
    state = classifier_state()
    torch.save({"state_dict": {"module." + k: v for k, v in state.items()}},
               tmp_path / "ddp.pth")
    model = create_model("deeplabv3_resnest14", num_classes=5, head_channels=16, **TINY)
    head_before = {k: v.clone() for k, v in model.head.state_dict().items()}
    segnest.load_pretrained(model, tmp_path / "ddp.pth")
    assert_backbone_equal(model.backbone.state_dict(), state)
    for key, value in model.head.state_dict().items():
        torch.testing.assert_close(value, head_before[key])


def test_segmentation_checkpoint_feeds_a_bare_backbone(tmp_path):
    torch.manual_seed(3)
    seg = create_model("deeplabv3_resnest14", num_classes=5, head_channels=16, **TINY)
    torch.save({"model": seg.state_dict(), "model_name": "deeplabv3_resnest14"},
               tmp_path / "seg.pt")
    backbone = create_model("resnest14", **TINY)
    segnest.load_pretrained(backbone, tmp_path / "seg.pt")
    assert_backbone_equal(backbone.state_dict(), seg.backbone.state_dict())


def test_official_resnest50_file_loads_strictly_through_load_pretrained(tmp_path):
    reference = pytest.importorskip("resnest.torch")
    official = reference.resnest50(pretrained=False)
    # Random weights in the official layout: they cannot carry the official file's hash.
    torch.save(official.state_dict(), tmp_path / "resnest50.pth")
    model = create_model("deeplabv3_resnest50", num_classes=150)
    report = segnest.load_pretrained(model, tmp_path / "resnest50.pth")
    assert report.loaded == 474  # 476 keys less fc.weight and fc.bias
    assert_backbone_equal(model.backbone.state_dict(), official.state_dict())


def test_mismatch_is_one_readable_message(tmp_path):
    torch.save(classifier_state(), tmp_path / "r14.pth")
    other = create_model("resnest26", num_classes=1000, **TINY)
    with pytest.raises(SegnestError) as err:
        segnest.load_pretrained(other, tmp_path / "r14.pth")
    message = str(err.value)
    assert "missing keys: layer1.1." in message and "\n" not in message
    assert "same model name" in message


def test_shape_mismatch_is_reported(tmp_path):
    torch.save(classifier_state(), tmp_path / "r14.pth")
    wider = create_model("resnest14", num_classes=1000, stage_width=16, stem_width=8)
    with pytest.raises(SegnestError, match="shape mismatches"):
        segnest.load_pretrained(wider, tmp_path / "r14.pth")


def _save_with_hash_name(tmp_path, state: dict, prefix_of) -> Path:
    plain = tmp_path / "weights.pth"
    torch.save(state, plain)
    digest = hashlib.sha256(plain.read_bytes()).hexdigest()
    named = tmp_path / f"resnest14-{prefix_of(digest)}.pth"
    plain.rename(named)
    return named


def test_a_file_whose_name_carries_its_sha256_prefix_loads(tmp_path):
    state = classifier_state()
    path = _save_with_hash_name(tmp_path, state, lambda digest: digest[:8])
    model = create_model("resnest14", num_classes=1000, **TINY)
    segnest.load_pretrained(model, path)
    assert_backbone_equal(model.state_dict(), state)


def test_a_file_whose_sha256_does_not_match_its_name_is_one_line_error(tmp_path):
    path = _save_with_hash_name(tmp_path, classifier_state(),
                                lambda digest: format(int(digest[:8], 16) ^ 1, "08x"))
    model = create_model("resnest14", num_classes=1000, **TINY)
    with pytest.raises(SegnestError) as err:
        segnest.load_pretrained(model, path)
    message = str(err.value)
    assert "\n" not in message and path.name in message
    assert "sha256" in message and "corrupted" in message


def test_a_truncated_official_download_is_caught_by_its_name(tmp_path):
    path = _save_with_hash_name(tmp_path, classifier_state(), lambda digest: digest[:8])
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(SegnestError, match="sha256 starts with"):
        segnest.load_pretrained(create_model("resnest14", num_classes=1000, **TINY), path)


def test_the_official_file_names_are_those_the_authors_package_downloads():
    resnest = pytest.importorskip("resnest.torch.resnest")
    ablation = pytest.importorskip("resnest.torch.ablation")
    urls = {**resnest.resnest_model_urls, **ablation.resnest_model_urls}
    assert {name: url.rsplit("/", 1)[1] for name, url in urls.items()} == OFFICIAL_WEIGHTS


def test_a_digits_only_suffix_is_a_hash_only_in_an_official_name(tmp_path):
    from segnest.models.weights import check_hash_in_name

    dated = tmp_path / "model-20231124.pth"  # a date, not a hash: not checked
    torch.save({"w": torch.ones(1)}, dated)
    check_hash_in_name(dated)
    official = tmp_path / "resnest200-75117900.pth"  # the official name is digits only
    torch.save({"w": torch.ones(1)}, official)
    with pytest.raises(SegnestError, match="sha256 starts with"):
        check_hash_in_name(official)
