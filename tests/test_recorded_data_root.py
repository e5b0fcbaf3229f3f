"""Checkpoints of segnest 0.1 stored a relative --data-root as typed, relative to the folder
training ran in: eval and quantize find it from another folder (the current one, then the
run's, then beside the checkpoint's folders) or say in one line where they looked."""

import shutil
from pathlib import Path

import pytest
from conftest import write_folder_dataset

from segnest.cli import main
from segnest.inference.config import EvalConfig
from segnest.inference.evaluate import run_eval
from segnest.runtime.checkpoint import load_checkpoint, save_checkpoint

RELEASE = Path(__file__).parent / "data" / "release-0.1.0-segmentation.pt"


def old_run(project: Path) -> Path:
    """The release checkpoint as if trained from ``project`` with ``--data-root data
    --work-dir runs/f1``: both recorded relative, as segnest 0.1 did."""
    write_folder_dataset(project / "data")
    checkpoint = load_checkpoint(RELEASE)
    checkpoint.pop("checksum", None)  # load_checkpoint took it off; save writes a new one
    checkpoint["config"].update(data_root="data", work_dir="runs/f1")
    path = project / "runs" / "f1" / "best.pt"
    save_checkpoint(checkpoint, path)
    return path


def evaluate(checkpoint: Path, out: Path) -> dict:
    return run_eval(EvalConfig(checkpoint=str(checkpoint), device="cpu", workers=0,
                               out=str(out)))


def test_a_relative_root_is_found_from_another_folder_through_the_run_folder(
        tmp_path, monkeypatch, capsys):
    checkpoint = old_run(tmp_path / "project")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    results = evaluate(checkpoint, tmp_path / "eval")
    assert results["mIoU"] == pytest.approx(15.063989667723376, abs=1e-4)
    said = capsys.readouterr().out
    assert f"records the data root 'data' relative to the folder it was trained in; using " \
           f"{tmp_path / 'project' / 'data'}" in said


def test_a_relative_root_is_read_from_the_current_folder_first(tmp_path, monkeypatch, capsys):
    checkpoint = old_run(tmp_path / "project")
    monkeypatch.chdir(tmp_path / "project")
    assert evaluate(checkpoint, tmp_path / "eval")["mIoU"] == pytest.approx(15.0639897, abs=1e-4)
    assert "records the data root" not in capsys.readouterr().out


def test_a_moved_checkpoint_finds_the_data_beside_a_folder_above_it(tmp_path, monkeypatch):
    checkpoint = old_run(tmp_path / "project")
    moved = tmp_path / "project" / "kept" / "models" / "best.pt"
    moved.parent.mkdir(parents=True)
    shutil.move(checkpoint, moved)
    monkeypatch.chdir(tmp_path)
    assert evaluate(moved, tmp_path / "eval")["mIoU"] == pytest.approx(15.0639897, abs=1e-4)


def test_a_relative_root_found_nowhere_is_one_line_naming_where_and_the_flag(
        tmp_path, monkeypatch, capsys):
    checkpoint = old_run(tmp_path / "project")
    shutil.rmtree(tmp_path / "project" / "data")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    code = main(["eval", "--checkpoint", str(checkpoint), "--device", "cpu", "--workers", "0",
                 "--out", str(tmp_path / "eval")])
    err = capsys.readouterr().err.strip()
    assert code != 0 and "\n" not in err and "Traceback" not in err
    assert str(tmp_path / "elsewhere" / "data") in err
    assert str(tmp_path / "project" / "runs" / "f1") in err and "--data-root" in err
    assert "SEGNEST_DATA" not in err
    assert not (tmp_path / "eval").exists()


def test_an_absolute_root_is_used_as_recorded(tmp_path, monkeypatch):
    from segnest.data import recorded_data_root

    monkeypatch.chdir(tmp_path)
    assert recorded_data_root("/nowhere/data", tmp_path / "best.pt") == Path("/nowhere/data")
