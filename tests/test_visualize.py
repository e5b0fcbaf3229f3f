"""Specs for coloured masks, panels and TensorBoard image logging."""

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter

from segnest.inference.visualize import (
    colorize,
    denormalize,
    log_panels,
    make_panel,
    overlay,
    save_png,
)

PALETTE = np.array([[128, 64, 128], [244, 35, 232], [70, 70, 70]], dtype=np.uint8)


def test_colorize_maps_ids_to_palette_colours_and_ignore_to_black():
    mask = torch.tensor([[0, 1], [2, 255]])
    colours = colorize(mask, PALETTE)
    assert colours.dtype == np.uint8 and colours.shape == (2, 2, 3)
    assert (colours[0, 0] == PALETTE[0]).all()
    assert (colours[0, 1] == PALETTE[1]).all()
    assert (colours[1, 0] == PALETTE[2]).all()
    assert (colours[1, 1] == 0).all()


def test_colorize_refuses_ids_beyond_the_palette():
    with pytest.raises(ValueError, match="palette"):
        colorize(np.array([[3]]), PALETTE)


def test_overlay_blends_labelled_pixels_and_keeps_the_image_where_ignored():
    image = np.full((1, 2, 3), 100, dtype=np.uint8)
    colours = colorize(np.array([[2, 255]]), PALETTE)
    blended = overlay(image, colours, alpha=0.5)
    assert blended[0, 0].tolist() == [85, 85, 85]  # (100 + 70) / 2
    assert blended[0, 1].tolist() == [100, 100, 100]


def test_panel_puts_image_gt_and_prediction_side_by_side_with_white_gaps():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (32, 40, 3), dtype=np.uint8)
    gt = rng.integers(0, 3, (32, 40))
    pred = rng.integers(0, 3, (32, 40))
    panel = make_panel(image, gt, pred, PALETTE, gap=4)
    assert panel.shape == (32, 3 * 40 + 2 * 4, 3) and panel.dtype == np.uint8
    assert (panel[:, :40] == image).all()
    assert (panel[:, 40:44] == 255).all()
    assert (panel[:, 44:84] == colorize(gt, PALETTE)).all()
    assert (panel[:, 88:] == colorize(pred, PALETTE)).all()


def test_denormalize_inverts_imagenet_normalization():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (8, 12, 3), dtype=np.uint8)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    normalized = (torch.from_numpy(image).permute(2, 0, 1) / 255.0 - mean) / std
    assert np.array_equal(denormalize(normalized), image)


def test_log_panels_writes_readable_image_summaries(tmp_path):
    panels = [np.zeros((16, 56, 3), dtype=np.uint8), np.full((16, 56, 3), 255, np.uint8)]
    with SummaryWriter(log_dir=str(tmp_path)) as writer:
        log_panels(writer, "val/panels", panels, step=7)
    events = EventAccumulator(str(tmp_path), size_guidance={"images": 0})
    events.Reload()
    assert sorted(events.Tags()["images"]) == ["val/panels/0", "val/panels/1"]
    record = events.Images("val/panels/1")[0]
    assert (record.step, record.width, record.height) == (7, 56, 16)


def test_save_png_round_trips_rgb_and_grayscale(tmp_path):
    rgb = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)
    gray = np.arange(20, dtype=np.uint8).reshape(4, 5)
    save_png(tmp_path / "sub" / "rgb.png", rgb)
    save_png(tmp_path / "gray.png", gray)
    with Image.open(tmp_path / "sub" / "rgb.png") as loaded:
        assert loaded.mode == "RGB" and np.array_equal(np.asarray(loaded), rgb)
    with Image.open(tmp_path / "gray.png") as loaded:
        assert loaded.mode == "L" and np.array_equal(np.asarray(loaded), gray)
