"""Outputs never overwrite inputs, appear whole or not at all, and say when a score means
little; interrupted inference commands give advice that works."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_evaluate import (  # noqa: F401  (fixtures used by name)
    SINGLE,
    ColourModel,
    ade_root,
    cityscapes_root,
    save_tiny_checkpoint,
    scene,
)

import segnest.inference.evaluate as evaluate_module
from segnest import cli
from segnest.data import ADE20K, Cityscapes
from segnest.errors import SegnestError
from segnest.inference.config import EvalConfig, ExportConfig, PredictConfig
from segnest.inference.evaluate import evaluate, run_eval
from segnest.inference.export import run_export
from segnest.inference.metrics import metric_warnings
from segnest.inference.predict import collect_images, run_predict
from segnest.inference.visualize import save_png


@pytest.fixture
def checkpoint(tmp_path: Path, ade_root: Path) -> Path:  # noqa: F811
    (tmp_path / "run").mkdir()
    return save_tiny_checkpoint(tmp_path / "run" / "best.pt", ade_root, num_classes=150)


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.jpg"):
        Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)).save(folder / name)
    return folder


def _contents(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _forbid_work(monkeypatch) -> None:
    """Loading the checkpoint is the first piece of work; a refusal must come before it."""

    def no_work(*args, **kwargs):
        raise AssertionError("work started before the output check")

    for module in ("predictor", "evaluate", "export"):
        monkeypatch.setattr(f"segnest.inference.{module}.load_checkpoint", no_work)


def predict(inputs, out, checkpoint, **flags):
    return run_predict(PredictConfig(inputs=[str(i) for i in inputs], out=str(out),
                                     checkpoint=str(checkpoint), device="cpu", **flags))


# ---------------------------------------------------------------- 1. outputs are not inputs


def test_predict_refuses_to_write_into_the_folder_it_reads(photos, checkpoint, monkeypatch):
    before = _contents(photos)
    _forbid_work(monkeypatch)
    with pytest.raises(SegnestError, match=r"--out .*photos.* input folder"):
        predict([photos], photos, checkpoint)
    link = photos.parent / "link"
    link.symlink_to(photos)
    with pytest.raises(SegnestError, match="--out"):
        predict([photos], link, checkpoint)
    assert _contents(photos) == before


def test_predict_refuses_an_output_file_that_is_an_input_or_the_checkpoint(
        photos, checkpoint, monkeypatch):
    _forbid_work(monkeypatch)
    # photos/a.png given as a file is named "a", so its colour mask would be photos/a.png.
    with pytest.raises(SegnestError, match=r"a\.png.*input"):
        predict([photos / "a.png"], photos, checkpoint)
    (checkpoint.parent / "a.png").hardlink_to(checkpoint)  # run/a.png is the checkpoint
    with pytest.raises(SegnestError, match=r"a\.png, which is the checkpoint"):
        predict([photos / "a.png"], checkpoint.parent, checkpoint)


def test_predict_into_a_subfolder_of_its_input_skips_that_subfolder_when_reading(
        photos, checkpoint):
    out = photos / "pred"
    first = predict([photos], out, checkpoint)
    second = predict([photos], out, checkpoint)
    assert len(first) == len(second) == 2
    assert sorted(p.name for p in out.rglob("*.png")) == ["a.png", "a_mask.png", "b.png",
                                                          "b_mask.png", "legend.png"]
    assert [stem for _, stem in collect_images([photos], skip=out)] == [Path("a"), Path("b")]


def test_predict_refuses_an_output_landing_in_an_input_folder(tmp_path, photos, checkpoint,
                                                               monkeypatch):
    # y/photos/a.png is named "photos/a"; with --out x it would land in the input folder
    # x/photos, which the next run reads.
    (tmp_path / "x").mkdir()
    shutil.copytree(photos, tmp_path / "x" / "photos")
    (tmp_path / "y" / "photos").mkdir(parents=True)
    shutil.copy(photos / "a.png", tmp_path / "y" / "photos" / "c.png")
    _forbid_work(monkeypatch)
    with pytest.raises(SegnestError, match=r"--out .*input folder"):
        predict([tmp_path / "x" / "photos", tmp_path / "y"], tmp_path / "x", checkpoint)


def test_eval_refuses_outputs_in_the_dataset(cityscapes_root, tmp_path, monkeypatch):  # noqa: F811
    checkpoint = save_tiny_checkpoint(tmp_path / "city.pt", cityscapes_root, num_classes=19)
    gt = cityscapes_root / "gtFine" / "val" / "frankfurt"
    before = _contents(cityscapes_root)

    def refuse(**flags):
        cfg = EvalConfig(checkpoint=str(checkpoint), dataset="cityscapes",
                         data_root=str(cityscapes_root), device="cpu", workers=0, **flags)
        monkeypatch.setattr(evaluate_module, "evaluate", _no_evaluation)
        with pytest.raises(SegnestError) as err:
            run_eval(cfg)
        return str(err.value)

    for inside in (gt, gt.parent.parent, cityscapes_root / "gtFine" / "new",
                   cityscapes_root / "leftImg8bit"):
        assert "--save-pred" in refuse(save_pred=str(inside))
    assert "--save-pred" in refuse(save_pred=str(cityscapes_root.parent))  # contains it
    assert "--out" in refuse(out=str(gt))
    assert "--out" in refuse(out=str(tmp_path / "p"), save_pred=str(tmp_path / "p"))
    assert "--out" in refuse(out=str(tmp_path / "p_confidence" / "m"),
                             save_pred=str(tmp_path / "p"), save_confidence=True)
    assert _contents(cityscapes_root) == before


def _no_evaluation(*args, **kwargs):
    raise AssertionError("evaluated before the output check")


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_export_replaces_its_own_export_but_never_a_checkpoint(checkpoint, tmp_path,
                                                                monkeypatch):
    other = tmp_path / "other.pt"
    shutil.copy(checkpoint, other)
    link = tmp_path / "link.pt"
    link.symlink_to(checkpoint)
    photo = tmp_path / "photo.png"
    Image.new("RGB", (8, 8)).save(photo)
    _forbid_work(monkeypatch)
    for target, reason in ((checkpoint, "is the checkpoint"), (link, "is the checkpoint"),
                           (other, "not a torchscript export"),
                           (photo, "not a torchscript export"), (tmp_path, "is a folder")):
        with pytest.raises(SegnestError, match=f"--out.*{reason}"):
            run_export(ExportConfig(checkpoint=str(checkpoint), out=str(target), size=32,
                                    format="torchscript"))
    monkeypatch.undo()
    assert other.read_bytes() == checkpoint.read_bytes()
    target = tmp_path / "model.pt"
    run_export(ExportConfig(checkpoint=str(checkpoint), out=str(target), size=32,
                            format="torchscript"))
    run_export(ExportConfig(checkpoint=str(checkpoint), out=str(target), size=32,
                            format="torchscript"))
    assert torch.jit.load(str(target)) is not None


# ---------------------------------------------------------------- 2. atomic outputs


class _Interrupted(KeyboardInterrupt):
    pass


def _interrupt_on_save(monkeypatch, at_call: int) -> None:
    """Image.save writes half its bytes and then gets Ctrl-C, on its ``at_call``-th call."""
    real_save = Image.Image.save
    calls = []

    def save(self, fp, *args, **kwargs):
        calls.append(1)
        if len(calls) == at_call:
            fp.write(b"\x89PNG\r\n\x1a\n half a file")
            raise _Interrupted
        return real_save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", save)


def test_ctrl_c_while_a_mask_is_written_leaves_the_old_file_or_none(tmp_path, monkeypatch):
    old = tmp_path / "old.png"
    save_png(old, np.zeros((4, 4), np.uint8))
    before = old.read_bytes()
    _interrupt_on_save(monkeypatch, at_call=1)
    with pytest.raises(_Interrupted):
        save_png(old, np.ones((4, 4), np.uint8))
    monkeypatch.undo()
    _interrupt_on_save(monkeypatch, at_call=1)
    with pytest.raises(_Interrupted):
        save_png(tmp_path / "new.png", np.ones((4, 4), np.uint8))
    assert old.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.png"]


def test_ctrl_c_during_predict_leaves_only_whole_files(photos, checkpoint, tmp_path,
                                                       monkeypatch):
    out = tmp_path / "out"
    _interrupt_on_save(monkeypatch, at_call=3)  # the second image's colour mask
    with pytest.raises(_Interrupted):
        predict([photos], out, checkpoint, overlay=False)
    monkeypatch.undo()
    written = sorted(p.name for p in out.rglob("*"))
    assert written == ["a.png", "a_mask.png"]
    for path in out.iterdir():
        Image.open(path).load()


# ---------------------------------------------------------------- 3. predict skips bad images


def test_predict_stops_on_a_bad_image_or_skips_it_when_told(photos, checkpoint, tmp_path,
                                                            capsys):
    (photos / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(SegnestError, match=r"broken\.png.*--skip-bad-samples"):
        predict([photos], tmp_path / "out", checkpoint)
    with pytest.warns(UserWarning, match=r"broken\.png"):
        written = predict([photos], tmp_path / "out", checkpoint, skip_bad_samples=True)
    assert [p.name for p in written] == ["a.png", "b.png"]
    assert "1 unreadable image(s) skipped" in capsys.readouterr().out


# ---------------------------------------------------------------- 4. interrupt advice


@pytest.mark.parametrize("command", ["eval", "predict"])
def test_interrupted_inference_says_to_rerun_not_to_resume(command, monkeypatch, capsys):
    def interrupted(cfg):
        raise KeyboardInterrupt

    monkeypatch.setattr(f"segnest.tasks.dispatch.run_{command}", interrupted)
    args = ["eval", "--checkpoint", "x.pt"] if command == "eval" else [
        "predict", "photo.jpg", "--checkpoint", "x.pt"]
    assert cli.main(args) == 130
    message = capsys.readouterr().err
    assert "--resume" not in message
    assert "same command" in message and "complete" in message


def test_interrupted_training_says_resume(monkeypatch, capsys):
    def interrupted(cfg):
        raise KeyboardInterrupt

    monkeypatch.setattr("segnest.tasks.segmentation.task.run_train", interrupted)
    assert cli.main(["train", "--dataset", "folder", "--data-root", "x", "--iters", "2"]) == 130
    assert "--resume to continue" in capsys.readouterr().err


# ---------------------------------------------------------------- 5. checked before the work


def test_unwritable_outputs_fail_before_any_work(photos, checkpoint, tmp_path, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    _forbid_work(monkeypatch)
    with pytest.raises(SegnestError, match=r"--out .*a_file"):
        predict([photos], blocker / "masks", checkpoint)
    monkeypatch.undo()
    monkeypatch.setattr(evaluate_module, "evaluate", _no_evaluation)
    for flags in ({"out": str(blocker / "metrics")}, {"save_pred": str(blocker / "pred")},
                  {"out": str(blocker)}):
        with pytest.raises(SegnestError, match=r"a_file"):
            run_eval(EvalConfig(checkpoint=str(checkpoint), device="cpu", workers=0, **flags))


# ---------------------------------------------------------------- 6. scores that mean little


def test_eval_warns_next_to_miou_when_the_ground_truth_has_one_class(ade_root, checkpoint,  # noqa: F811
                                                                     capsys):
    annotations = ade_root / "ADEChallengeData2016" / "annotations" / "validation"
    for path in annotations.iterdir():
        Image.fromarray(np.full((40, 56), 3, np.uint8)).save(path)
    out = checkpoint.parent / "metrics"
    results = run_eval(EvalConfig(checkpoint=str(checkpoint), device="cpu", workers=0,
                                  out=str(out)))
    assert len(results["warnings"]) == 1 and "1 class" in results["warnings"][0]
    printed = capsys.readouterr().out
    table_end = printed.index("mIoU")
    assert printed.index("warning: ") > table_end
    assert printed.index("warning: ") < printed.index("metrics written")
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["warnings"] == results["warnings"]
    assert list((out / "tb" / "eval_val").glob("events.out.tfevents.*"))
    assert not list((out / "tb").glob(".*"))


def test_all_ignore_ground_truth_is_named_as_undefined():
    nothing = {"labelled_pixels": 0, "gt_pixels": [0, 0, 0], "mIoU": float("nan")}
    (warning,) = metric_warnings(nothing, ["a", "b", "c"])
    assert "ignore" in warning and "undefined" in warning
    two = {"labelled_pixels": 5, "gt_pixels": [2, 3, 0], "mIoU": 0.5}
    assert metric_warnings(two, ["a", "b", "c"]) == []


# ---------------------------------------------------------------- 7. benchmark formats


def test_cityscapes_predictions_match_the_official_evaluator_one_to_one(
        cityscapes_root, tmp_path):  # noqa: F811
    gt_dir = cityscapes_root / "gtFine" / "val" / "frankfurt"
    image_dir = cityscapes_root / "leftImg8bit" / "val" / "frankfurt"
    shutil.copy(gt_dir / "frankfurt_000000_000294_gtFine_labelIds.png",
                gt_dir / "frankfurt_000000_000576_gtFine_labelIds.png")
    shutil.copy(image_dir / "frankfurt_000000_000294_leftImg8bit.png",
                image_dir / "frankfurt_000000_000576_leftImg8bit.png")
    pred = tmp_path / "results"
    evaluate(ColourModel(19), Cityscapes(cityscapes_root, "val"), SINGLE, "cpu",
             save_pred=pred, progress=False)
    # cityscapesscripts' evalPixelLevelSemanticLabeling.getPrediction: glob the prediction
    # tree recursively and require exactly one <city>_<seq>_<frame>*.png per ground truth.
    gt_files = sorted(cityscapes_root.glob("gtFine/val/*/*_gtFine_labelIds.png"))
    assert len(gt_files) == 2
    for gt in gt_files:
        city, seq, frame = gt.name.split("_")[:3]
        hits = list(pred.rglob(f"*{city}_{seq}_{frame}*.png"))
        assert len(hits) == 1, hits
    assert len(list(pred.rglob("*"))) == 3  # the city folder and two label files
    previews = tmp_path / "results_color" / "frankfurt"
    assert sorted(p.name for p in previews.iterdir()) == [
        "frankfurt_000000_000294_leftImg8bit.png", "frankfurt_000000_000576_leftImg8bit.png"]


def test_ade20k_prediction_folder_holds_exactly_the_benchmark_files(ade_root, tmp_path):  # noqa: F811
    pred = tmp_path / "pred"
    evaluate(ColourModel(150), ADE20K(ade_root, "val"), SINGLE, "cpu", save_pred=pred,
             progress=False)
    annotations = ade_root / "ADEChallengeData2016" / "annotations" / "validation"
    assert sorted(p.name for p in pred.rglob("*")) == sorted(p.name for p in
                                                             annotations.iterdir())
    assert (tmp_path / "pred_color" / "ADE_val_00000000.png").is_file()
    labels = np.asarray(Image.open(pred / "ADE_val_00000000.png"))
    assert labels.min() >= 1 and labels.max() <= 150
