"""The demo runs every stage end to end (shortened budget) and reports real metrics."""

import json

import pytest

from segnest.errors import RunStopped
from segnest.tools.config import DemoConfig
from segnest.tools.demo import run_demo


@pytest.mark.slow
def test_demo_runs_the_whole_pipeline_and_can_be_rerun(tmp_path, capsys):
    cfg = DemoConfig(work_dir=str(tmp_path / "demo"), pretrain_epochs=1, iters=4, workers=0,
                     device="cpu")
    result = run_demo(cfg)
    out = capsys.readouterr().out
    assert "[4/4] evaluating with multi-scale + flip" in out
    assert "tensorboard --logdir" in out
    metrics = json.loads((tmp_path / "demo" / "eval" / "metrics.json").read_text())
    assert 0.0 <= metrics["mIoU"] <= 100.0 and len(metrics["class_names"]) == 8
    assert metrics["inference"]["flip"] and len(metrics["inference"]["scales"]) == 3
    assert (tmp_path / "demo" / "pretrain" / "backbone.pth").exists()
    assert result["pretrain"]["top1"] >= 0.0
    # A second run resumes every stage instead of starting over.
    again = run_demo(cfg)
    assert "resumed from" in capsys.readouterr().out
    assert again["results"]["mIoU"] == result["results"]["mIoU"]


def test_a_stage_stopped_by_ctrl_c_ends_the_demo_before_the_next_stage(tmp_path, monkeypatch):
    import segnest.tools.demo as demo

    monkeypatch.setattr(demo, "ensure_mini_segmentation", lambda: tmp_path)
    monkeypatch.setattr(demo, "ensure_mini_classification", lambda: tmp_path)
    monkeypatch.setattr(demo, "run_pretrain", lambda cfg: {"interrupted": True,
                                                           "signal": "SIGTERM"})
    monkeypatch.setattr(demo, "run_train", lambda cfg: pytest.fail("trained after SIGTERM"))
    with pytest.raises(RunStopped) as stopped:
        run_demo(DemoConfig(work_dir=str(tmp_path / "demo"), device="cpu"))

    monkeypatch.setattr(demo, "run_pretrain", lambda cfg: {"top1": 50.0})
    monkeypatch.setattr(demo, "run_train", lambda cfg: {"interrupted": True})
    monkeypatch.setattr(demo, "run_eval", lambda cfg: pytest.fail("evaluated after Ctrl-C"))
    with pytest.raises(RunStopped) as stopped_later:
        run_demo(DemoConfig(work_dir=str(tmp_path / "demo"), device="cpu"))
    assert (stopped.value.exit_code, stopped_later.value.exit_code) == (143, 130)


def test_the_demo_ends_by_naming_its_classes_and_the_own_data_command(tmp_path):
    from segnest.data.mini import MINI_CLASSES
    from segnest.tools.demo import what_next

    text = what_next(tmp_path / "train" / "last.pt")
    assert f"knows only the mini set's {len(MINI_CLASSES)} synthetic classes" in text
    assert all(name in text for name in MINI_CLASSES)
    assert f"segnest predict PHOTO.jpg --checkpoint {tmp_path / 'train' / 'last.pt'}" in text
    assert text.splitlines()[-1].strip() == "segnest train --dataset folder --data-root DIR"


@pytest.mark.slow
def test_detection_demo_trains_mask_rcnn_and_reports_box_and_mask_ap(tmp_path, capsys):
    cfg = DemoConfig(task="detection", work_dir=str(tmp_path / "demo"), iters=4, workers=0,
                     device="cpu")
    result = run_demo(cfg)
    out = capsys.readouterr().out
    assert "box AP" in out and "mask AP" in out
    metrics = json.loads((tmp_path / "demo" / "detection" / "eval" / "metrics.json").read_text())
    assert metrics["bbox_AP"] == result["metrics"]["bbox_AP"]
    assert metrics["segm_AP"] is not None and result["train"]["iteration"] == 4
    # A second run resumes the training instead of starting over.
    again = run_demo(cfg)
    assert again["metrics"]["bbox_AP"] == result["metrics"]["bbox_AP"]
