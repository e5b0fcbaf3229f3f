"""Inputs other than 8-bit RGB: 16-bit files at full precision, N-channel .npy arrays with
their own mean/std, and the pretrained RGB stem adapted to N channels."""

import cv2
import numpy as np
import pytest
import torch
from conftest import write_folder_dataset
from PIL import Image

from segnest.data.base import read_image
from segnest.data.transforms import to_normalized_tensors
from segnest.errors import SegnestError
from segnest.inference.config import EvalConfig, PredictConfig
from segnest.inference.evaluate import run_eval
from segnest.inference.predict import run_predict
from segnest.inference.resample import resize_image
from segnest.models import create_model
from segnest.models.weights import adapt_input_channels, load_pretrained
from segnest.runtime.checkpoint import load_checkpoint
from segnest.tasks.segmentation.task import run_train

MEAN4, STD4 = "0.3,0.3,0.4,0.5", "0.2,0.2,0.25,0.3"


def test_16_bit_grey_png_keeps_values_one_apart_distinct(tmp_path):
    Image.fromarray(np.array([[1000, 1001]], np.uint16)).save(tmp_path / "a.png")
    image = read_image(tmp_path / "a.png")
    assert image.dtype == np.uint16 and list(image[0, :, 0]) == [1000, 1001]
    tensor, _ = to_normalized_tensors(image, np.zeros((1, 2)))
    assert tensor[0, 0, 0] < tensor[0, 0, 1]


def test_16_bit_colour_png_is_read_as_rgb_at_full_precision(tmp_path):
    rgb = np.array([[[1000, 2000, 3000], [1001, 2001, 3001]]], np.uint16)
    cv2.imwrite(str(tmp_path / "c.png"), rgb[..., ::-1])  # OpenCV writes BGR
    np.testing.assert_array_equal(read_image(tmp_path / "c.png"), rgb)


def test_an_image_whose_channels_differ_from_in_channels_is_named(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((4, 4, 2), np.float32))
    with pytest.raises(SegnestError, match="x.npy has 2 channel.*--in-channels is 4"):
        read_image(tmp_path / "x.npy", 4)


def test_stem_keeps_rgb_filters_and_fills_extra_channels_with_their_mean_scaled_3_over_n():
    rgb = create_model("resnest14", stage_width=8, stem_width=8)
    four = create_model("resnest14", stage_width=8, stem_width=8, in_chans=4)
    state = adapt_input_channels(four, rgb.state_dict())
    weight, source = state["conv1.0.weight"], rgb.state_dict()["conv1.0.weight"]
    torch.testing.assert_close(weight[:, :3], source * 3 / 4)
    torch.testing.assert_close(weight[:, 3:], source.mean(1, keepdim=True) * 3 / 4)


def test_load_pretrained_adapts_an_rgb_backbone_to_a_one_channel_model(tmp_path):
    rgb = create_model("resnest14", stage_width=8, stem_width=8)
    torch.save(rgb.state_dict(), tmp_path / "rgb.pth")
    grey = create_model("deeplabv3_resnest14", num_classes=2, stage_width=8, stem_width=8,
                        head_channels=16, in_chans=1)
    load_pretrained(grey, tmp_path / "rgb.pth")
    torch.testing.assert_close(grey.backbone.conv1[0].weight,
                               rgb.conv1[0].weight.sum(1, keepdim=True))


def _four_channel_dataset(tmp_path):
    root = write_folder_dataset(tmp_path / "data", n_train=4, n_val=2)
    for path in sorted((root / "images").rglob("*.png")):
        rgb = np.asarray(Image.open(path))
        depth = rgb.mean(axis=2, keepdims=True).astype(np.uint8)
        np.save(path.with_suffix(".npy"), np.concatenate([rgb, depth], axis=2))
        path.unlink()
    return root


def test_four_channel_arrays_train_evaluate_and_predict_with_the_recorded_mean_and_std(
        tmp_path, tiny_train_config):
    root = _four_channel_dataset(tmp_path)
    run_train(tiny_train_config(root, tmp_path / "run", iters=2, val_interval=2,
                                checkpoint_interval=2, in_channels=4, mean=MEAN4, std=STD4))
    checkpoint = load_checkpoint(tmp_path / "run" / "best.pt")
    assert checkpoint["model_kwargs"]["in_chans"] == 4
    assert list(checkpoint["inference"]["mean"]) == [0.3, 0.3, 0.4, 0.5]
    assert list(checkpoint["inference"]["std"]) == [0.2, 0.2, 0.25, 0.3]
    results = run_eval(EvalConfig(checkpoint=str(tmp_path / "run" / "best.pt"), device="cpu",
                                  workers=0, out=str(tmp_path / "eval")))
    assert results["timing"]["images"] == 2
    written = run_predict(PredictConfig(inputs=[str(root / "images" / "val")],
                                        checkpoint=str(tmp_path / "run" / "best.pt"),
                                        out=str(tmp_path / "pred"), device="cpu"))
    assert len(written) == 2


def test_eval_normalizes_with_the_checkpoints_statistics(tmp_path, tiny_train_config,
                                                         monkeypatch):
    root = _four_channel_dataset(tmp_path)
    run_train(tiny_train_config(root, tmp_path / "run", iters=2, val_interval=2,
                                checkpoint_interval=2, in_channels=4, mean=MEAN4, std=STD4))
    seen = []
    import segnest.inference.strategies as strategies_module

    def spy(image, size, mean, std):
        seen.append((tuple(mean), tuple(std)))
        return resize_image(image, size, mean, std)

    monkeypatch.setattr(strategies_module, "resize_image", spy)
    run_eval(EvalConfig(checkpoint=str(tmp_path / "run" / "best.pt"), device="cpu",
                        workers=0, out=str(tmp_path / "eval")))
    assert seen and set(seen) == {((0.3, 0.3, 0.4, 0.5), (0.2, 0.2, 0.25, 0.3))}


@pytest.mark.parametrize("overrides, message", [
    (dict(in_channels=4), "--in-channels 4 needs --mean"),
    (dict(in_channels=4, mean="0.5,0.5", std=STD4), "must be 4 comma-separated numbers"),
    (dict(in_channels=4, mean=MEAN4, std=STD4, photometric=True), "--photometric works on RGB"),
])
def test_n_channel_settings_that_cannot_work_are_refused(tmp_path, tiny_train_config,
                                                         overrides, message):
    with pytest.raises(SegnestError, match=message):
        run_train(tiny_train_config(tmp_path / "data", tmp_path / "run", **overrides))
