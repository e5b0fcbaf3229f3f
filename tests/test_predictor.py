"""segnest.load_model: a Predictor that gives exactly what segnest predict writes."""

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import save_tiny_checkpoint
from PIL import Image

import segnest
from segnest.data import generate_palette
from segnest.inference.config import PredictConfig
from segnest.inference.predict import run_predict
from segnest.inference.visualize import overlay
from segnest.models import create_model

NUM_CLASSES = 5
TINY = dict(num_classes=NUM_CLASSES, aux=True, head_channels=16, stage_width=8, stem_width=8)
PALETTE = generate_palette(NUM_CLASSES)
CLASSES = [f"class{i}" for i in range(NUM_CLASSES)]
# A multi-scale + flip override: the path most likely to differ if the two drifted apart.
SCALES, FLIP = (0.75, 1.25), True


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    return save_tiny_checkpoint(tmp_path / "run" / "best.pt", TINY, PALETTE, CLASSES,
                                sharpen_head=True)


@pytest.fixture
def images(tmp_path: Path) -> dict[str, Path]:
    """An RGB, a grey and an RGBA image of odd sizes."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "images"
    folder.mkdir()
    arrays = {"rgb": (rng.integers(0, 256, (37, 53, 3), dtype=np.uint8), "RGB"),
              "grey": (rng.integers(0, 256, (41, 29), dtype=np.uint8), "L"),
              "rgba": (rng.integers(0, 256, (33, 47, 4), dtype=np.uint8), "RGBA")}
    for name, (array, mode) in arrays.items():
        Image.fromarray(array, mode).save(folder / f"{name}.png")
    return {name: folder / f"{name}.png" for name in arrays}


def predicted_masks(checkpoint: Path, images: dict[str, Path], out: Path) -> dict[str, np.ndarray]:
    run_predict(PredictConfig(inputs=[str(p) for p in images.values()],
                              checkpoint=str(checkpoint), out=str(out), device="cpu",
                              scales=SCALES, flip=FLIP))
    return {name: np.asarray(Image.open(out / f"{name}_mask.png")) for name in images}


@pytest.fixture
def predictor(checkpoint: Path) -> segnest.Predictor:
    return segnest.load_model(checkpoint, device="cpu", scales=SCALES, flip=FLIP)


def test_labels_equal_segnest_predict_masks_for_paths_pil_images_arrays_and_lists(
        checkpoint: Path, images: dict[str, Path], predictor, tmp_path: Path):
    masks = predicted_masks(checkpoint, images, tmp_path / "out")
    assert all(len(np.unique(mask)) > 1 for mask in masks.values())  # equality means something
    rgb = images["rgb"]
    for given in (rgb, str(rgb), Image.open(rgb), np.asarray(Image.open(rgb))):
        labels = predictor(given)
        assert labels.dtype == np.uint8 and labels.shape == masks["rgb"].shape
        np.testing.assert_array_equal(labels, masks["rgb"])
    listed = predictor(list(images.values()))
    assert isinstance(listed, list) and len(listed) == len(images)
    for labels, name in zip(listed, images):
        np.testing.assert_array_equal(labels, masks[name])


def test_grey_and_rgba_pil_images_are_read_as_segnest_predict_reads_them(
        checkpoint: Path, images: dict[str, Path], predictor, tmp_path: Path):
    masks = predicted_masks(checkpoint, images, tmp_path / "out")
    for name in ("grey", "rgba"):
        image = Image.open(images[name])
        assert image.mode == {"grey": "L", "rgba": "RGBA"}[name]
        np.testing.assert_array_equal(predictor(image), masks[name])


def test_probabilities_sum_to_one_and_their_argmax_and_max_are_labels_and_confidence(
        images: dict[str, Path], predictor):
    probs = predictor(images["rgb"], output="probs")
    confidence = predictor(images["rgb"], output="confidence")
    labels = predictor(images["rgb"])
    assert probs.dtype == np.float32 and probs.shape == (NUM_CLASSES, 37, 53)
    np.testing.assert_allclose(probs.sum(axis=0), 1.0, atol=1e-5)
    np.testing.assert_array_equal(probs.argmax(axis=0), labels)
    assert confidence.dtype == np.float32 and confidence.shape == (37, 53)
    # Labels and confidence are made band by band, the probabilities at full size at once:
    # the same numbers up to float rounding.
    np.testing.assert_allclose(confidence, probs.max(axis=0), atol=1e-5)
    listed = predictor([images["rgb"], images["grey"]], output="confidence")
    assert [c.shape for c in listed] == [(37, 53), (41, 29)]


def test_settings_classes_palette_and_normalisation_come_from_the_checkpoint(checkpoint: Path):
    predictor = segnest.load_model(checkpoint, device="cpu")
    assert predictor.settings.scales == (1.0,) and not predictor.settings.flip
    assert predictor.settings.base_size == 48  # the training config's, as predict uses it
    assert predictor.classes == tuple(CLASSES)
    np.testing.assert_array_equal(predictor.palette, PALETTE)
    assert predictor.in_channels == 3 and predictor.device == torch.device("cpu")
    assert segnest.load_model(checkpoint, device="cpu", mode="slide").settings.window_size == 40


def test_colorize_and_overlay_use_the_checkpoint_palette(images: dict[str, Path], predictor):
    labels = predictor(images["rgb"])
    colours = predictor.colorize(labels)
    np.testing.assert_array_equal(colours, PALETTE[labels])
    image = np.asarray(Image.open(images["rgb"]))
    np.testing.assert_array_equal(predictor.overlay(images["rgb"], labels),
                                  overlay(image, colours))
    with pytest.raises(segnest.SegnestError, match="differ"):
        predictor.overlay(images["grey"], labels)


def test_a_checkpoint_that_is_not_a_segmentation_one_is_one_line(tmp_path: Path):
    # A classification checkpoint is not among these: it loads as a ClassifierPredictor
    # (tests/test_classification_inference.py).
    torch.manual_seed(0)
    weights = tmp_path / "weights.pt"
    torch.save({"model": create_model("deeplabv3_resnest14", **TINY).state_dict()}, weights)
    for path, says in ((weights, "not a segnest training checkpoint"),
                       (tmp_path / "missing.pt", "does not exist")):
        with pytest.raises(segnest.SegnestError) as error:
            segnest.load_model(path, device="cpu")
        assert says in str(error.value) and str(path) in str(error.value)
        assert "\n" not in str(error.value)


@pytest.mark.parametrize("array", [
    np.zeros((32, 32), np.uint8),
    np.zeros((32, 32, 4), np.uint8),
    np.zeros((32, 32, 3), np.int64),
    np.zeros((32, 32, 3), np.float64),
    np.zeros((0, 32, 3), np.uint8),
], ids=["grey-2d", "four-channels", "int64", "float64", "empty"])
def test_an_array_of_the_wrong_shape_or_dtype_is_one_line(predictor, array: np.ndarray):
    with pytest.raises(segnest.SegnestError, match="H x W x 3 uint8") as error:
        predictor(array)
    assert str(array.shape) in str(error.value) and "\n" not in str(error.value)


def test_unknown_inputs_outputs_and_settings_are_one_line(checkpoint: Path, predictor):
    for call, says in ((lambda: predictor(torch.zeros(3, 8, 8)), "cannot predict a Tensor"),
                       (lambda: predictor(np.zeros((8, 8, 3), np.uint8), output="logits"),
                        "output 'logits'"),
                       (lambda: segnest.load_model(checkpoint, scale=2.0), "no setting 'scale'"),
                       (lambda: segnest.load_model(checkpoint, scales=[0.5, -1]), "scales")):
        with pytest.raises(segnest.SegnestError, match=says) as error:
            call()
        assert "\n" not in str(error.value)


def test_predict_confidence_png_is_the_predictors_confidence_rounded(
        checkpoint: Path, images: dict[str, Path], predictor, tmp_path: Path):
    out = tmp_path / "out"
    run_predict(PredictConfig(inputs=[str(p) for p in images.values()],
                              checkpoint=str(checkpoint), out=str(out), device="cpu",
                              scales=SCALES, flip=FLIP,
                              save_confidence=True, batch_size=2))
    for name, path in images.items():
        saved = np.asarray(Image.open(out / f"{name}_confidence.png"))
        confidence = predictor(path, output="confidence")
        assert saved.dtype == np.uint8 and saved.shape == confidence.shape
        assert len(np.unique(saved)) > 1
        np.testing.assert_array_equal(saved, np.rint(confidence * 255).astype(np.uint8))
        # The masks of a batched run are those of batch 1.
        np.testing.assert_array_equal(np.asarray(Image.open(out / f"{name}_mask.png")),
                                      predictor(path))


def test_a_batch_size_below_one_is_one_line(checkpoint: Path):
    with pytest.raises(segnest.SegnestError, match="batch_size=0"):
        segnest.load_model(checkpoint, device="cpu", batch_size=0)


def test_load_model_takes_python_values_without_parsing_text(checkpoint: Path, monkeypatch):
    """scales=[0.5, 1.0] reaches the strategy as numbers: the command line's text parsers
    are never called (a call would fail here)."""
    from segnest.commands import config

    def refuse(*args, **kwargs):
        raise AssertionError("a Python value went through the command line's text parser")

    for name in ("parse_scales", "parse_names", "parse_setting", "validate_config"):
        monkeypatch.setattr(config, name, refuse)
    predictor = segnest.load_model(checkpoint, device="cpu", scales=[0.5, 1.0], flip=True)
    assert predictor.settings.scales == (0.5, 1.0) and predictor.settings.flip is True
    assert predictor(np.zeros((32, 32, 3), np.uint8)).shape == (32, 32)


def test_numpy_numbers_are_python_values_too(checkpoint: Path):
    predictor = segnest.load_model(checkpoint, device="cpu", scales=np.array([0.5, 1.0]),
                                   base_size=np.int64(48), batch_size=np.int32(2))
    assert predictor.settings.scales == (0.5, 1.0) and predictor.settings.base_size == 48
    assert predictor.batch_size == 2 and type(predictor.settings.base_size) is int


@pytest.mark.parametrize("settings, says", [
    ({"scales": [-1]}, "scales=(-1.0,) is out of range; every item must be a number > 0"),
    ({"scales": "0.5,1.0"}, "scales='0.5,1.0' is not a sequence of finite numbers"),
    ({"scales": [0.5, "big"]}, "is not a sequence of finite numbers"),
    ({"scales": [float("inf")]}, "scales=[inf] is not a sequence of finite numbers"),
    ({"scales": []}, "scales=[] is not a sequence of finite numbers"),
    ({"flip": "yes"}, "flip='yes' is text, not true or false"),
    ({"mode": "tiles"}, "mode='tiles' is not one of whole, slide"),
    ({"base_size": 1.5}, "base_size=1.5 is not a whole number"),
])
def test_a_bad_python_value_is_named_in_python_terms(checkpoint: Path, settings, says):
    with pytest.raises(segnest.SegnestError) as error:
        segnest.load_model(checkpoint, device="cpu", **settings)
    assert says in str(error.value)
    assert "--" not in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("scale", [255.0, 1.5])
def test_a_float_array_off_the_0_1_scale_is_one_line_not_a_prediction(predictor, scale):
    photo = (np.random.default_rng(0).random((32, 32, 3)) * scale).astype(np.float32)
    with pytest.raises(segnest.SegnestError, match="0-1 scale") as error:
        predictor(photo)
    assert "divide a 0-255 image by 255" in str(error.value) and "\n" not in str(error.value)


def test_a_float_array_on_the_0_1_scale_predicts_as_its_uint8_twin(predictor):
    photo = np.random.default_rng(0).integers(0, 256, (32, 32, 3)).astype(np.uint8)
    assert np.array_equal(predictor(photo.astype(np.float32) / 255), predictor(photo))


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_a_float_array_holding_nan_or_infinity_is_one_line(predictor, bad):
    photo = np.full((32, 32, 3), 0.5, np.float32)
    photo[3, 4, 1] = bad
    with pytest.raises(segnest.SegnestError, match="NaN or infinite"):
        predictor(photo)


@pytest.mark.parametrize("output", ["labels", "probs"])
def test_a_working_size_beyond_the_memory_available_is_one_line_before_allocating(
        checkpoint, monkeypatch, output):
    """--scales 1000 or --base-size 100000 would ask the allocator for tens of GB."""
    from segnest.inference import strategies

    resized = []
    monkeypatch.setattr(strategies, "_resize", lambda *a: resized.append(a) or a[0])
    monkeypatch.setattr(strategies, "resize_image", lambda *a: resized.append(a) or a[0])
    monkeypatch.setattr(strategies, "available_bytes", lambda: 2**30)
    huge = segnest.load_model(checkpoint, device="cpu", scales=[1000])
    with pytest.raises(segnest.SegnestError, match=r"working resolution .* lower --base-size"):
        huge(np.zeros((40, 40, 3), np.uint8), output=output)
    assert not resized


def test_a_working_size_that_fits_the_memory_available_is_predicted(checkpoint, monkeypatch):
    from segnest.inference import strategies

    # 64 x 64 working pixels x (3 channels + 5 classes) x 4 bytes = 131072 bytes.
    monkeypatch.setattr(strategies, "available_bytes", lambda: 64 * 64 * (3 + NUM_CLASSES) * 4)
    small = segnest.load_model(checkpoint, device="cpu", base_size=64)
    assert small(np.zeros((40, 40, 3), np.uint8)).shape == (40, 40)


def test_a_predictor_shows_its_model_classes_and_working_size(predictor):
    shown = repr(predictor)
    assert shown.startswith("Predictor(deeplabv3_resnest14, ")
    assert f"{predictor.num_classes} classes: {predictor.classes[0]}" in shown
    assert "segments at long side 36-60 px (2 scales) + flip;" in shown  # the fixture's settings


def test_working_size_names_scales_flip_and_windows():
    from segnest.inference.settings import InferenceSettings

    assert InferenceSettings(base_size=112).working_size() == "long side 112 px"
    assert (InferenceSettings(base_size=112, scales=(0.75, 1.0, 1.25), flip=True).working_size()
            == "long side 84-140 px (3 scales) + flip")
    assert InferenceSettings().working_size() == "the image's own size"
    assert (InferenceSettings(base_size=64, mode="slide", window_size=32).working_size()
            == "long side 64 px, in 32 px windows")
