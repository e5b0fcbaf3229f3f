import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image
from torch import nn

from segnest.data import (
    ADE20K,
    ADE20K_CLASSES,
    ADE20K_PALETTE,
    CITYSCAPES_CLASSES,
    MEAN,
    STD,
    Cityscapes,
)
from segnest.errors import SegnestError
from segnest.inference.config import EvalConfig, PredictConfig
from segnest.inference.evaluate import evaluate, run_eval
from segnest.inference.settings import InferenceSettings
from segnest.models import create_model

# Colours the fixture images are painted with; class c of the fixture is colour c.
COLOURS = np.array([[220, 30, 30], [30, 200, 40], [40, 50, 210]], dtype=np.uint8)
HEIGHT, WIDTH = 40, 56
TINY = dict(stage_width=8, stem_width=8, head_channels=16)


class ColourModel(nn.Module):
    """Stub segmenter: one-hot-like logits of the fixture colour each pixel has.

    With ``confuse_right`` the right half of the image is predicted as the next class,
    which gives a confusion matrix with off-diagonal entries.
    """

    def __init__(self, num_classes: int, confuse_right: bool = False) -> None:
        super().__init__()
        table = torch.full((num_classes, 3), 10.0)
        table[: len(COLOURS)] = torch.from_numpy(COLOURS).float() / 255.0
        self.register_buffer("table", table)
        self.confuse_right = confuse_right

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        rgb = x * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)
        dist = ((rgb[:, None] - self.table[None, :, :, None, None]) ** 2).sum(2)
        logits = -50.0 * dist
        if self.confuse_right:
            half = x.shape[-1] // 2
            logits[..., half:] = logits[..., half:].roll(1, dims=1)
        return {"out": logits}


def paint(train_ids: np.ndarray) -> np.ndarray:
    return COLOURS[train_ids]


def scene(seed: int) -> np.ndarray:
    """Train ids 0..2 in vertical and horizontal bands, different per seed."""
    ids = np.zeros((HEIGHT, WIDTH), dtype=np.int64)
    ids[:, WIDTH // 3 + seed :] = 1
    ids[HEIGHT // 2 + seed :, : WIDTH // 2] = 2
    return ids


@pytest.fixture
def ade_root(tmp_path: Path) -> Path:
    base = tmp_path / "ade" / "ADEChallengeData2016"
    images = base / "images" / "validation"
    annotations = base / "annotations" / "validation"
    images.mkdir(parents=True)
    annotations.mkdir(parents=True)
    for i in range(3):
        ids = scene(i)
        raw = (ids + 1).astype(np.uint8)
        raw[:4, :4] = 0  # "other": ignored
        Image.fromarray(paint(ids)).save(images / f"ADE_val_{i:08d}.png")
        Image.fromarray(raw).save(annotations / f"ADE_val_{i:08d}.png")
    return tmp_path / "ade"


@pytest.fixture
def cityscapes_root(tmp_path: Path) -> Path:
    root = tmp_path / "cityscapes"
    images = root / "leftImg8bit" / "val" / "frankfurt"
    masks = root / "gtFine" / "val" / "frankfurt"
    images.mkdir(parents=True)
    masks.mkdir(parents=True)
    ids = scene(0)
    train_ids = np.where(ids == 1, 18, 0)  # road and bicycle
    painted = paint(np.where(train_ids == 18, 1, 0))
    label_ids = np.where(train_ids == 18, 33, 7).astype(np.uint8)
    label_ids[:3, :3] = 0  # unlabeled
    Image.fromarray(painted).save(images / "frankfurt_000000_000294_leftImg8bit.png")
    Image.fromarray(label_ids).save(masks / "frankfurt_000000_000294_gtFine_labelIds.png")
    return root


def save_tiny_checkpoint(path: Path, data_root: Path, num_classes: int = 150) -> Path:
    torch.manual_seed(0)
    kwargs = dict(num_classes=num_classes, aux=True, output_stride=8, **TINY)
    model = create_model("deeplabv3_resnest14", **kwargs)
    torch.save({
        "model": model.state_dict(),
        "model_name": "deeplabv3_resnest14",
        "model_kwargs": kwargs,
        "dataset": "ade20k",
        # The class names of the dataset with that many classes, as training records them.
        "classes": list(ADE20K_CLASSES if num_classes == 150 else CITYSCAPES_CLASSES),
        "palette": ADE20K_PALETTE.tolist(),
        "config": {"base_size": WIDTH, "crop_size": 48, "data_root": str(data_root)},
        "iteration": 7,
        "best_miou": 0.0,
        "segnest_version": "test",
    }, path)
    return path


@pytest.fixture
def checkpoint(tmp_path: Path, ade_root: Path) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    return save_tiny_checkpoint(run / "best.pt", ade_root)


SINGLE = InferenceSettings(scales=(1.0,), base_size=WIDTH)


def test_run_eval_writes_metrics_with_class_names(checkpoint: Path):
    results = run_eval(EvalConfig(checkpoint=str(checkpoint), device="cpu", workers=0))
    out = checkpoint.parent / "eval_val"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["class_names"] == list(ADE20K_CLASSES)
    assert metrics["checkpoint"] == str(checkpoint.resolve())
    assert metrics["inference"]["scales"] == [1.0] and metrics["inference"]["base_size"] == WIDTH
    for key in ("pixAcc", "mIoU", "mAcc"):
        assert 0.0 <= metrics[key] <= 1.0
        assert metrics[key] == pytest.approx(results[key])
    assert all(v is None or 0.0 <= v <= 1.0 for v in metrics["IoU"])
    assert metrics["labelled_pixels"] == 3 * (HEIGHT * WIDTH - 16)
    assert "| wall |" in (out / "metrics.md").read_text()
    assert list((checkpoint.parent / "tb" / "eval_val").glob("events.out.tfevents.*"))


def test_run_eval_save_pred_puts_legend_png_beside_the_previews_only(checkpoint: Path,
                                                                     tmp_path: Path):
    save_pred = tmp_path / "pred"
    run_eval(EvalConfig(checkpoint=str(checkpoint), device="cpu", workers=0,
                        save_pred=str(save_pred), out=str(tmp_path / "metrics")))
    legend = np.asarray(Image.open(tmp_path / "pred_color" / "legend.png").convert("RGB"))
    assert (legend == ADE20K_PALETTE[0]).all(axis=-1).sum() >= 10 * 10
    assert (legend == ADE20K_PALETTE[149]).all(axis=-1).sum() >= 10 * 10
    assert sorted(p.name for p in save_pred.iterdir()) == [
        f"ADE_val_{i:08d}.png" for i in range(3)]


def test_run_eval_folds_batch_norms_unless_told_not_to(checkpoint: Path, monkeypatch):
    import segnest.inference.evaluate as evaluate_module

    seen = []

    def spy(model, *args, **kwargs):
        seen.append(any(isinstance(m, nn.BatchNorm2d) for m in model.modules()))
        return evaluate(model, *args, **kwargs)

    monkeypatch.setattr(evaluate_module, "evaluate", spy)
    folded = run_eval(EvalConfig(checkpoint=str(checkpoint), device="cpu", workers=0))
    plain = run_eval(EvalConfig(checkpoint=str(checkpoint), device="cpu", workers=0,
                                fuse_bn=False))
    assert seen == [False, True]
    for key in ("pixAcc", "mIoU", "mAcc"):
        assert folded[key] == pytest.approx(plain[key], abs=1e-6)


def test_multi_scale_flip_run_records_timing(checkpoint: Path):
    cfg = EvalConfig(checkpoint=str(checkpoint), device="cpu", workers=0, multi_scale=True,
                     flip=True, scales=(0.75, 1.25))
    results = run_eval(cfg)
    timing = results["timing"]
    assert 0.0 < timing["forward_s"] <= timing["total_s"]
    assert timing["images"] == 3
    # flip rides in the same forward call as the plain view: one call per scale
    assert timing["forward_calls"] == 3 * 2
    metrics = json.loads((checkpoint.parent / "eval_val_ms_flip" / "metrics.json").read_text())
    assert metrics["inference"]["scales"] == [0.75, 1.25] and metrics["inference"]["flip"]
    assert metrics["timing"]["forward_s"] <= metrics["timing"]["total_s"]


def test_perfect_predictions_give_miou_one(ade_root: Path):
    dataset = ADE20K(ade_root, "val")
    cfg = InferenceSettings(scales=(1.0,), flip=True, base_size=WIDTH)
    results, panels = evaluate(ColourModel(150), dataset, cfg, "cpu", panels=2, progress=False)
    assert results["mIoU"] == 100.0 and results["pixAcc"] == 100.0
    assert results["labelled_pixels"] == 3 * (HEIGHT * WIDTH - 16)
    # image | ground truth | prediction | errors, each enlarged 7 times to reach 256 px
    view = 7 * WIDTH
    assert len(panels) == 2 and panels[0].shape[1] == 4 * view + 3 * 4
    # the prediction view is drawn in the dataset palette
    # The prediction view's last column (a legend strip now follows the views below).
    column = panels[0][:, 3 * view + 7]
    assert (column == ADE20K_PALETTE[scene(0)[-1, -1]]).all(axis=-1).any()


def test_wrong_half_is_counted(ade_root: Path):
    dataset = ADE20K(ade_root, "val")
    results, _ = evaluate(ColourModel(150, confuse_right=True), dataset, SINGLE, "cpu",
                          samples=1, progress=False)
    ids = scene(0)
    labelled = np.ones_like(ids, dtype=bool)
    labelled[:4, :4] = False
    right = np.zeros_like(labelled)
    right[:, WIDTH // 2 :] = True
    assert results["correct_pixels"] == int((labelled & ~right).sum())
    assert results["labelled_pixels"] == int(labelled.sum())


def test_save_pred_writes_ade_benchmark_format(ade_root: Path, tmp_path: Path):
    dataset = ADE20K(ade_root, "val")
    out = tmp_path / "pred"
    evaluate(ColourModel(150), dataset, SINGLE, "cpu", save_pred=out, progress=False)
    for i in range(3):
        name = f"ADE_val_{i:08d}.png"
        saved = np.asarray(Image.open(out / name))
        gt = np.asarray(Image.open(ade_root / "ADEChallengeData2016/annotations/validation" / name))
        assert saved.dtype == np.uint8 and saved.shape == (HEIGHT, WIDTH)
        assert saved.min() >= 1 and saved.max() <= 3  # never 0 for a predicted pixel
        np.testing.assert_array_equal(saved[gt != 0], gt[gt != 0])
        colour = np.asarray(Image.open(tmp_path / "pred_color" / name).convert("RGB"))
        np.testing.assert_array_equal(colour, ADE20K_PALETTE[saved.astype(int) - 1])


def test_save_pred_writes_cityscapes_label_ids(cityscapes_root: Path, tmp_path: Path):
    dataset = Cityscapes(cityscapes_root, "val")
    out = tmp_path / "pred"

    class CityModel(ColourModel):
        def forward(self, x):
            logits = super().forward(x)["out"]  # fixture colour 1 stands for bicycle (18)
            return {"out": torch.cat([logits[:, :1], logits[:, 2:19], logits[:, 1:2]], 1)}

    results, _ = evaluate(CityModel(19), dataset, SINGLE, "cpu", save_pred=out, progress=False)
    assert results["mIoU"] == 100.0
    saved_path = out / "frankfurt" / "frankfurt_000000_000294_leftImg8bit.png"
    saved = np.asarray(Image.open(saved_path))
    expected = np.where(scene(0) == 1, 33, 7)
    np.testing.assert_array_equal(saved, expected)
    previews = tmp_path / "pred_color" / "frankfurt"
    assert (previews / "frankfurt_000000_000294_leftImg8bit.png").is_file()


def test_bad_sample_stops_or_is_skipped(ade_root: Path):
    image = ade_root / "ADEChallengeData2016/images/validation/ADE_val_00000001.png"
    image.write_bytes(b"not a png")
    dataset = ADE20K(ade_root, "val")
    with pytest.raises(SegnestError, match="ADE_val_00000001.*--skip-bad-samples"):
        evaluate(ColourModel(150), dataset, SINGLE, "cpu", progress=False)
    with pytest.warns(UserWarning, match="skipping sample 1"):
        results, _ = evaluate(ColourModel(150), dataset, SINGLE, "cpu", progress=False,
                              skip_bad_samples=True)
    assert results["skipped_samples"] == 1 and results["timing"]["images"] == 2
    assert results["mIoU"] == 100.0


def _distributed_worker(rank: int, store: str, ade_root: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                                         world_size=2)
    try:
        dataset = ADE20K(ade_root, "val")
        results, _ = evaluate(ColourModel(150, confuse_right=True), dataset, SINGLE, "cpu",
                              progress=False)
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
    finally:
        torch.distributed.destroy_process_group()


def _counts(results: dict) -> dict:
    keys = ("gt_pixels", "pred_pixels", "labelled_pixels", "correct_pixels", "IoU", "Acc")
    return {k: [None if isinstance(v, float) and math.isnan(v) else v for v in results[k]]
            if isinstance(results[k], list) else results[k] for k in keys}


@pytest.mark.slow
def test_two_processes_match_one(ade_root: Path, tmp_path: Path):
    single, _ = evaluate(ColourModel(150, confuse_right=True), ADE20K(ade_root, "val"), SINGLE,
                         "cpu", progress=False)
    mp.spawn(_distributed_worker, args=(str(tmp_path / "store"), str(ade_root), str(tmp_path)),
             nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text())
             for r in range(2)]
    for result in ranks:
        assert _counts(result) == _counts(single)
        assert result["timing"]["images"] == 3


def test_inference_settings_from_flags_and_checkpoint():
    from_flags = InferenceSettings.from_flags
    ckpt = {"dataset": "ade20k", "inference": {"base_size": 64, "window_size": 48}}
    single = from_flags(EvalConfig(checkpoint="x"), ckpt)
    assert single.scales == (1.0,) and single.base_size == 64 and single.window_size is None
    multi = from_flags(EvalConfig(checkpoint="x", multi_scale=True, flip=True), {}, "ade20k")
    assert multi.scales == (0.5, 0.75, 1.0, 1.25, 1.5, 1.75) and multi.base_size == 520
    multi = from_flags(EvalConfig(checkpoint="x", multi_scale=True), ckpt)
    assert multi.scales == (0.5, 0.75, 1.0, 1.25, 1.5, 1.75) and multi.base_size == 64
    slide = from_flags(PredictConfig(checkpoint="x", mode="slide", scales=(1, 1.5)), ckpt)
    assert slide.mode == "slide" and slide.window_size == 48 and slide.scales == (1.0, 1.5)
    slide = from_flags(PredictConfig(checkpoint="x", mode="slide", window_size=40), ckpt)
    assert slide.window_size == 40
    # Settings from Python are named in Python terms (the command line names its flags).
    with pytest.raises(SegnestError, match="scales=.* is not a sequence of finite numbers"):
        from_flags(EvalConfig(checkpoint="x", scales=(0.5, "big")), ckpt)
    with pytest.raises(SegnestError, match=r"scales=\(0.0, 1.0\) is out of range"):
        from_flags(EvalConfig(checkpoint="x", scales=(0, 1)), ckpt)
    with pytest.raises(SegnestError, match="mode='tiles'"):
        from_flags(EvalConfig(checkpoint="x", mode="tiles"), ckpt)
    with pytest.raises(SegnestError, match="stride 60 is larger than window_size 48"):
        from_flags(EvalConfig(checkpoint="x", mode="slide", stride=60), ckpt)
    with pytest.raises(SegnestError, match="window_size=0"):
        from_flags(EvalConfig(checkpoint="x", window_size=0), ckpt)


def test_checkpoints_of_segnest_0_1_give_their_training_sizes():
    legacy = {"dataset": "ade20k", "config": {"base_size": 64, "crop_size": 48}}
    slide = InferenceSettings.from_flags(EvalConfig(checkpoint="x", mode="slide"), legacy)
    assert slide.base_size == 64 and slide.window_size == 48


def test_run_eval_rejects_unknown_split(checkpoint: Path):
    with pytest.raises(SegnestError, match="--split"):
        run_eval(EvalConfig(checkpoint=str(checkpoint), split="validation", device="cpu"))


def test_save_confidence_writes_beside_save_pred_with_the_same_names(checkpoint: Path,
                                                                    tmp_path: Path):
    save_pred = tmp_path / "pred"
    run_eval(EvalConfig(checkpoint=str(checkpoint), device="cpu", workers=0, flip=True,
                        save_pred=str(save_pred), out=str(tmp_path / "metrics"),
                        save_confidence=True, batch_size=2))
    names = sorted(p.name for p in save_pred.iterdir())
    assert names == [f"ADE_val_{i:08d}.png" for i in range(3)]
    assert sorted(p.name for p in (tmp_path / "pred_confidence").iterdir()) == names
    confidence = np.asarray(Image.open(tmp_path / "pred_confidence" / names[0]))
    assert confidence.dtype == np.uint8 and confidence.shape == (HEIGHT, WIDTH)
    # The largest of 150 probabilities is at least 1/150.
    assert confidence.min() >= np.floor(255 / 150)


def test_save_confidence_without_save_pred_is_one_line(checkpoint: Path):
    with pytest.raises(SegnestError, match="--save-confidence .* needs --save-pred"):
        run_eval(EvalConfig(checkpoint=str(checkpoint), device="cpu", save_confidence=True))


@pytest.mark.parametrize("mode", ["whole", "slide"])
def test_eval_batches_give_the_metrics_of_batch_one(ade_root: Path, mode: str):
    dataset = ADE20K(ade_root, "val")
    model = ColourModel(150, confuse_right=True)  # predictions depend on each image
    settings = InferenceSettings(mode=mode, scales=(0.75, 1.0), flip=True, base_size=WIDTH,
                                 window_size=32, stride=24)
    single, _ = evaluate(model, dataset, settings, "cpu", progress=False)
    batched, _ = evaluate(model, dataset, settings, "cpu", progress=False, batch_size=3)
    assert batched["timing"]["forward_calls"] < single["timing"]["forward_calls"]
    assert 0 < single["pixAcc"] < 100
    assert _counts(batched) == _counts(single)


def _folder_checkpoint(tmp_path: Path, classes: list[str]) -> Path:
    from conftest import save_tiny_checkpoint as save_folder_checkpoint

    from segnest.data import generate_palette

    return save_folder_checkpoint(tmp_path / "ck.pt", dict(num_classes=len(classes),
                                                           stage_width=8, stem_width=8,
                                                           head_channels=16),
                                  generate_palette(len(classes)), classes=classes)


@pytest.mark.parametrize("listed", ["right\nleft\nsquare\n", "cat\ndog\nbird\n"],
                         ids=["reordered", "renamed"])
def test_eval_refuses_a_class_list_other_than_the_models(folder_dataset, tmp_path, listed):
    checkpoint = _folder_checkpoint(tmp_path, ["left", "right", "square"])
    (folder_dataset / "classes.txt").write_text(listed)
    with pytest.raises(SegnestError, match="class 0 is 'left' in the model") as error:
        run_eval(EvalConfig(checkpoint=str(checkpoint), dataset="folder",
                            data_root=str(folder_dataset), out=str(tmp_path / "m"),
                            device="cpu"))
    assert "classes.txt" in str(error.value) and "\n" not in str(error.value)
    assert ("another order" in str(error.value)) == listed.startswith("right")
    assert not (tmp_path / "m").exists()


def test_eval_warns_in_metrics_about_colour_mask_pixels_of_no_class(folder_dataset,
                                                                      tmp_path, capsys):
    checkpoint = _folder_checkpoint(tmp_path, ["left", "right", "square"])
    (folder_dataset / "classes.txt").write_text("left 200 0 0\nright 0 200 0\nsquare 0 0 200\n")
    colours = np.array([[200, 0, 0], [0, 200, 0], [0, 0, 200]], np.uint8)
    for mask_file in (folder_dataset / "masks" / "val").glob("*.png"):
        rgb = colours[np.asarray(Image.open(mask_file))]
        rgb[0, :5] = (100, 100, 0)  # an anti-aliased edge: a colour of no class
        Image.fromarray(rgb).save(mask_file)
    results = run_eval(EvalConfig(checkpoint=str(checkpoint), dataset="folder",
                                  data_root=str(folder_dataset), out=str(tmp_path / "m"),
                                  device="cpu"))
    expected = "15 pixels of colours not in classes.txt are ignored in the val masks"
    assert any(expected in warning for warning in results["warnings"])
    assert expected in capsys.readouterr().out
    saved = json.loads((tmp_path / "m" / "metrics.json").read_text())
    assert any(expected in warning for warning in saved["warnings"])


def test_run_eval_leaves_its_loader_workers_their_cores(checkpoint: Path, monkeypatch):
    """Like training: OpenMP threads sharing cores with busy workers stall (item 8, #26)."""
    import segnest.inference.evaluate as evaluate_module

    seen = []
    real = evaluate_module.evaluate

    def recording(*args, **kwargs):
        seen.append((torch.get_num_threads(), kwargs["workers"]))
        return real(*args, **{**kwargs, "workers": 0})

    monkeypatch.setattr(evaluate_module, "evaluate", recording)
    torch.set_num_threads(4)
    try:
        run_eval(EvalConfig(checkpoint=str(checkpoint), device="cpu", workers=3))
        assert torch.get_num_threads() == 4  # restored after the run
    finally:
        torch.set_num_threads(1)
    assert seen == [(1, 3)]


def test_threads_beside_workers_keeps_one_thread_per_free_core():
    from segnest.runtime.threads import threads_beside_workers

    torch.set_num_threads(6)
    try:
        with threads_beside_workers(torch.device("cpu"), 2) as inside:
            assert inside == torch.get_num_threads() == 4
        with threads_beside_workers(torch.device("cpu"), 0) as inside:
            assert inside == 6
        with threads_beside_workers(torch.device("cpu"), 9) as inside:
            assert inside == 1
        assert torch.get_num_threads() == 6
    finally:
        torch.set_num_threads(1)
