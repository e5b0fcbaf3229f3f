"""Specs for coloured masks, panels and TensorBoard image logging."""

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter

from segnest.data.palettes import generate_palette
from segnest.inference.visualize import (
    ERROR_COLOR,
    HATCH_COLOR,
    IGNORE_COLOR,
    colorize,
    denormalize,
    legend_image,
    log_panels,
    make_panel,
    overlay,
    save_legend,
    save_png,
)

PALETTE = np.array([[128, 64, 128], [244, 35, 232], [70, 70, 70]], dtype=np.uint8)
NAMES = ["road", "sidewalk", "building"]


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


def _random_case(height=32, width=40, seed=0):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    gt = rng.integers(0, 3, (height, width))
    pred = rng.integers(0, 3, (height, width))
    return image, gt, pred


def _views(panel, width, factor, height=32, gap=4):
    """The four views of a panel without legend, below its caption strip."""
    view_w = width * factor
    top = panel.shape[0] - height * factor
    return top, [panel[top:, i * (view_w + gap): i * (view_w + gap) + view_w] for i in range(4)]


def test_panel_shows_image_gt_prediction_and_errors_under_a_caption_strip():
    image, gt, pred = _random_case()
    panel = make_panel(image, gt, pred, PALETTE, min_height=32, gap=4)
    top, (image_view, gt_view, pred_view, _) = _views(panel, 40, 1)
    assert panel.dtype == np.uint8 and panel.shape[1] == 4 * 40 + 3 * 4
    assert 0 < top < 32
    assert (image_view == image).all()
    assert (gt_view == colorize(gt, PALETTE)).all()
    assert (pred_view == colorize(pred, PALETTE)).all()
    assert (panel[top:, 40:44] == 255).all()


def test_small_panels_are_enlarged_by_an_integer_factor_with_nearest_neighbour():
    image, gt, pred = _random_case()
    gt[:4] = 255
    panel = make_panel(image, gt, pred, PALETTE, min_height=100)  # factor ceil(100/32) = 4
    top, (image_view, gt_view, _, _) = _views(panel, 40, 4)
    assert panel.shape[0] - top == 128 and panel.shape[1] == 4 * 160 + 3 * 4
    assert (image_view == np.repeat(np.repeat(image, 4, 0), 4, 1)).all()
    allowed = {tuple(c) for c in PALETTE.tolist()} | {IGNORE_COLOR}
    assert {tuple(c) for c in gt_view.reshape(-1, 3).tolist()} == allowed


def test_each_view_has_a_dark_caption_above_it():
    image, gt, pred = _random_case()
    panel = make_panel(image, gt, pred, PALETTE, min_height=64)
    top, _ = _views(panel, 40, 2)
    for index in range(4):
        strip = panel[:top, index * 84: index * 84 + 80]
        assert (strip.max(axis=-1) < 100).any(), f"no caption text above view {index}"
        assert (strip == 255).all(axis=-1).mean() > 0.5


def test_error_view_marks_exactly_the_wrong_pixels_and_hatches_ignore():
    image, gt, pred = _random_case()
    gt[:5] = 255
    panel = make_panel(image, gt, pred, PALETTE, min_height=64)
    _, views = _views(panel, 40, 2)
    red = (views[3] == ERROR_COLOR).all(axis=-1)
    wrong = (pred != gt) & (gt != 255)
    assert (red == np.repeat(np.repeat(wrong, 2, 0), 2, 1)).all()
    ignored = views[3][:10]
    assert {tuple(c) for c in ignored.reshape(-1, 3).tolist()} == {IGNORE_COLOR, HATCH_COLOR}
    correct = views[3][10:][~red[10:]]
    assert (correct[:, 0] == correct[:, 1]).all() and correct.min() > 0 and correct.max() < 200


def test_panel_with_class_names_ends_in_a_legend_of_its_classes():
    image, gt, pred = _random_case()
    gt[gt == 2] = 1
    pred[pred == 2] = 0
    gt[0, 0] = 255
    bare = make_panel(image, gt, pred, PALETTE, min_height=32)
    named = make_panel(image, gt, pred, PALETTE, class_names=NAMES, min_height=32)
    assert named.shape[0] > bare.shape[0] and (named[: bare.shape[0]] == bare).all()
    strip = named[bare.shape[0]:]
    assert _swatch_count(strip, PALETTE[0]) and _swatch_count(strip, PALETTE[1])
    assert not _swatch_count(strip, PALETTE[2])
    assert _swatch_count(strip, IGNORE_COLOR)


def _swatch_count(image, colour, side=8):
    """Whether ``image`` holds a ``side`` x ``side`` square of exactly ``colour``."""
    hit = (image == np.asarray(colour, dtype=np.uint8)).all(axis=-1)
    rows = np.flatnonzero(hit.sum(axis=1) >= side)
    return len(rows) >= side


def test_legend_has_one_swatch_per_class_and_one_for_ignore():
    legend = legend_image(NAMES, PALETTE, font_size=14)
    assert legend.dtype == np.uint8 and legend.ndim == 3
    for colour in PALETTE:
        hit = (legend == colour).all(axis=-1)
        assert 12 * 12 <= hit.sum() <= 14 * 14
    assert _swatch_count(legend, IGNORE_COLOR, side=12)
    assert (legend.max(axis=-1) < 100).sum() > 14 * 14  # names in dark text


def test_legend_of_present_classes_lists_only_those():
    legend = legend_image(NAMES, PALETTE, present=[2], ignore_entry=False)
    assert _swatch_count(legend, PALETTE[2])
    assert not (legend == PALETTE[0]).all(axis=-1).any()
    assert not (legend == PALETTE[1]).all(axis=-1).any()


def test_long_legends_run_in_columns_and_stop_at_max_entries():
    palette = generate_palette(150)
    names = [f"class {i}" for i in range(150)]
    legend = legend_image(names, palette, max_entries=150)
    assert legend.shape[1] > 3 * legend.shape[0] / 2
    short = legend_image(names, palette, max_entries=10)
    assert sum(bool((short == c).all(axis=-1).any()) for c in palette) == 10


def test_save_legend_writes_legend_png_of_every_class(tmp_path):
    path = save_legend(tmp_path / "previews", NAMES, PALETTE)
    assert path == tmp_path / "previews" / "legend.png"
    with Image.open(path) as loaded:
        legend = np.asarray(loaded.convert("RGB"))
    assert all(_swatch_count(legend, colour) for colour in PALETTE)
    assert not _swatch_count(legend, IGNORE_COLOR)  # predictions hold no ignore


def test_generated_palettes_have_no_black_and_distinct_colours():
    for count in (1, 2, 21, 256):
        palette = generate_palette(count)
        assert len({tuple(c) for c in palette.tolist()}) == count
        assert palette.max(axis=1).min() >= 100, "a class would look like ignore (black)"


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


def test_captions_scale_with_the_panel_width_to_stay_legible_in_a_tensorboard_card():
    from segnest.data import generate_palette

    image = np.zeros((256, 256, 3), np.uint8)
    labels = np.zeros((256, 256), np.int64)
    panel = make_panel(image, labels, labels, generate_palette(2), legend=False)
    caption_height = panel.shape[0] - 256
    # shown at ~350 px wide, a caption keeps ~10 px of text (1.5 x the font size)
    assert caption_height * 350 / panel.shape[1] >= 14
