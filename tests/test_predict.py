from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import save_tiny_checkpoint
from PIL import Image

from segnest.data import generate_palette
from segnest.errors import SegnestError
from segnest.inference.config import PredictConfig
from segnest.inference.predict import run_predict

NUM_CLASSES = 5
TINY = dict(num_classes=NUM_CLASSES, aux=True, head_channels=16, stage_width=8, stem_width=8)
PALETTE = generate_palette(NUM_CLASSES)


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    return save_tiny_checkpoint(tmp_path / "run" / "best.pt", TINY, PALETTE)


def reference_logits(checkpoint: Path, x: torch.Tensor) -> torch.Tensor:
    from segnest.models import model_from_checkpoint

    model = model_from_checkpoint(torch.load(checkpoint, weights_only=True)).eval()
    with torch.inference_mode():
        return model(x)["out"]


def write_inputs(folder: Path) -> dict[str, tuple[int, int]]:
    """Images of several modes and odd sizes; returns relative stem -> (width, height)."""
    rng = np.random.default_rng(0)
    (folder / "sub").mkdir(parents=True)
    Image.fromarray(rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)).save(folder / "rgb.jpg")
    Image.fromarray(rng.integers(0, 256, (41, 29), dtype=np.uint8), "L").save(folder / "grey.png")
    Image.fromarray(rng.integers(0, 256, (33, 47, 4), dtype=np.uint8), "RGBA").save(
        folder / "sub" / "rgba.png")
    Image.fromarray(rng.integers(0, 65536, (39, 45), dtype=np.uint16)).save(folder / "wide.png")
    assert Image.open(folder / "wide.png").mode.startswith("I")
    return {"rgb": (53, 37), "grey": (29, 41), "sub/rgba": (47, 33), "wide": (45, 39)}


def test_predict_writes_masks_of_input_size_for_any_mode(checkpoint: Path, tmp_path: Path):
    sizes = write_inputs(tmp_path / "images")
    out = tmp_path / "out"
    written = run_predict(PredictConfig(inputs=[str(tmp_path / "images")],
                                        checkpoint=str(checkpoint), out=str(out), overlay=True,
                                        device="cpu"))
    assert sorted(written) == sorted(out / f"{stem}.png" for stem in sizes)
    for stem, size in sizes.items():
        mask = Image.open(out / f"{stem}_mask.png")
        colour = Image.open(out / f"{stem}.png")
        overlay = Image.open(out / f"{stem}_overlay.jpg")
        assert mask.mode == "L" and mask.size == size
        assert colour.mode == "RGB" and colour.size == size and overlay.size == size
        ids = np.asarray(mask)
        assert ids.max() < NUM_CLASSES
        np.testing.assert_array_equal(np.asarray(colour), PALETTE[ids])


def test_predict_writes_a_legend_of_every_class_beside_the_masks(checkpoint: Path,
                                                                 tmp_path: Path):
    rng = np.random.default_rng(4)
    (tmp_path / "in").mkdir()
    Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(
        tmp_path / "in" / "legend.jpg")
    out = tmp_path / "out"
    written = run_predict(PredictConfig(inputs=[str(tmp_path / "in")],
                                        checkpoint=str(checkpoint), out=str(out), device="cpu"))
    assert written == [out / "legend_jpg.png"]  # the input named legend steps aside
    legend = np.asarray(Image.open(out / "legend.png").convert("RGB"))
    for colour in PALETTE:
        assert (legend == colour).all(axis=-1).sum() >= 10 * 10


def test_predict_matches_the_model(checkpoint: Path, tmp_path: Path):
    image = np.random.default_rng(1).integers(0, 256, (48, 40, 3), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "photo.png")
    run_predict(PredictConfig(inputs=[str(tmp_path / "photo.png")], checkpoint=str(checkpoint),
                              out=str(tmp_path / "out"), device="cpu"))
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    x = (torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255 - mean) / std
    # long side 48 = base_size: the image is evaluated at its own size
    expected = reference_logits(checkpoint, x).argmax(1)[0].numpy()
    saved = np.asarray(Image.open(tmp_path / "out" / "photo_mask.png"))
    np.testing.assert_array_equal(saved, expected)
    assert not (tmp_path / "out" / "photo_overlay.jpg").exists()


def test_predict_keeps_output_names_unique(checkpoint: Path, tmp_path: Path):
    rng = np.random.default_rng(2)
    for name in ("a/photo.png", "a/photo.jpg", "b/photo.png"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(tmp_path / name)
    out = tmp_path / "out"
    written = run_predict(PredictConfig(
        inputs=[str(tmp_path / "a"), str(tmp_path / "b" / "photo.png")],
        checkpoint=str(checkpoint), out=str(out), device="cpu"))
    assert len(written) == 3 and len(set(written)) == 3
    assert all(path.is_file() for path in written)


def test_predict_reports_bad_inputs(checkpoint: Path, tmp_path: Path):
    with pytest.raises(SegnestError, match="missing.jpg"):
        run_predict(PredictConfig(inputs=[str(tmp_path / "missing.jpg")],
                                  checkpoint=str(checkpoint), device="cpu"))
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG not really")
    with pytest.raises(SegnestError, match="broken.png"):
        run_predict(PredictConfig(inputs=[str(broken)], checkpoint=str(checkpoint),
                                  out=str(tmp_path / "out"), device="cpu"))


def test_a_confidence_map_name_never_collides_with_another_inputs_mask(checkpoint: Path,
                                                                        tmp_path: Path):
    rng = np.random.default_rng(3)
    for name in ("photo.png", "photo_confidence.png"):
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(tmp_path / name)
    out = tmp_path / "out"
    written = run_predict(PredictConfig(
        inputs=[str(tmp_path / "photo.png"), str(tmp_path / "photo_confidence.png")],
        checkpoint=str(checkpoint), out=str(out), device="cpu", save_confidence=True))
    assert len(set(written)) == 2
    assert (out / "photo_confidence.png").is_file()  # the first input's confidence map
    assert out / "photo_confidence.png" not in written


def test_predict_refuses_a_float_npy_on_a_0_255_scale(checkpoint: Path, tmp_path: Path):
    photo = np.random.default_rng(0).integers(0, 256, (32, 32, 3)).astype(np.float32)
    np.save(tmp_path / "x.npy", photo)
    with pytest.raises(SegnestError, match=r"x\.npy is float with values from .* 0-1 scale"):
        run_predict(PredictConfig(inputs=[str(tmp_path / "x.npy")], checkpoint=str(checkpoint),
                                  out=str(tmp_path / "out"), device="cpu"))
    assert not (tmp_path / "out" / "x.png").exists()


def test_predict_says_which_file_holds_what_and_the_working_size(checkpoint: Path,
                                                                 tmp_path: Path, capsys):
    write_inputs(tmp_path / "images")
    out = tmp_path / "out"
    run_predict(PredictConfig(inputs=[str(tmp_path / "images")], checkpoint=str(checkpoint),
                              out=str(out), overlay=True, base_size=24, device="cpu"))
    said = capsys.readouterr().out
    assert f"wrote 4 prediction(s) to {out}:" in said
    assert "<name>.png" in said and f"colours named in {out / 'legend.png'}" in said
    assert f"<name>_mask.png        class ids 0-{NUM_CLASSES - 1}" in said
    assert "<name>_overlay.jpg" in said and "<name>_confidence.png" not in said
    assert f"knows {NUM_CLASSES} classes" in said
    assert "segmented at long side 24 px and the labels resized" in said
