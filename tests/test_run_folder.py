"""A training run owns its work folder: never overwrites an earlier run, one run at a time,
a log of what the console showed, checkpoints that are always finite, and bad samples that
never stall it."""

import io

import pytest
import torch

import segnest.tasks.segmentation.task as train_seg
from segnest.cli import main
from segnest.errors import SegnestError
from segnest.runtime.checkpoint import load_checkpoint
from segnest.runtime.console import _Tee
from segnest.runtime.lock import FolderLock
from segnest.tasks.segmentation.losses import segmentation_loss


def _fingerprint(folder):
    return {path.name: path.read_bytes() for path in folder.iterdir() if path.suffix == ".pt"}


def test_a_new_run_in_a_folder_with_checkpoints_is_refused_and_changes_nothing(
        folder_dataset, tmp_path, tiny_train_config, tiny_flags, capsys):
    work = tmp_path / "run"
    train_seg.run_train(tiny_train_config(folder_dataset, work, iters=3))
    before = _fingerprint(work)
    code = main(["train", "--dataset", "folder", "--data-root", str(folder_dataset),
                 "--iters", "3", "--work-dir", str(work), *tiny_flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "holds an earlier run" in err[0] and "--resume auto" in err[0]
    assert "--overwrite" in err[0] and "--work-dir" in err[0]
    assert _fingerprint(work) == before


def test_resume_from_a_checkpoint_of_another_folder_is_a_new_run_here(
        folder_dataset, tmp_path, tiny_train_config):
    train_seg.run_train(tiny_train_config(folder_dataset, tmp_path / "a", iters=3))
    train_seg.run_train(tiny_train_config(folder_dataset, tmp_path / "b", iters=3))
    with pytest.raises(SegnestError, match="holds an earlier run"):
        train_seg.run_train(tiny_train_config(folder_dataset, tmp_path / "b", iters=6,
                                              resume=str(tmp_path / "a" / "last.pt")))


def test_overwrite_replaces_the_earlier_run(folder_dataset, tmp_path, tiny_train_config, capsys):
    work = tmp_path / "run"
    train_seg.run_train(tiny_train_config(folder_dataset, work, iters=6))
    assert (work / "iter_6.pt").exists()
    earlier_events = list((work / "tb").rglob("events.out.tfevents.*"))
    (work / "tb" / "eval_val").mkdir()  # an evaluation of the earlier run's checkpoint
    (work / "tb" / "eval_val" / "events.out.tfevents.1.host").write_bytes(b"")
    result = train_seg.run_train(tiny_train_config(folder_dataset, work, iters=3,
                                                   overwrite=True))
    assert "--overwrite: removed" in capsys.readouterr().out
    assert result["iteration"] == 3
    assert not (work / "iter_6.pt").exists()
    assert earlier_events and not any(path.exists() for path in earlier_events)
    assert not (work / "tb" / "eval_val").exists()
    assert len(list((work / "tb" / "train").iterdir())) == 1  # the new run's events only
    assert load_checkpoint(work / "last.pt")["iteration"] == 3
    with pytest.raises(SegnestError, match="give one of them"):
        train_seg.run_train(tiny_train_config(folder_dataset, work, overwrite=True,
                                              resume="auto"))


def test_a_second_run_in_a_locked_folder_gets_one_line(folder_dataset, tmp_path,
                                                       tiny_train_config):
    work = tmp_path / "run"
    with FolderLock(work):
        with pytest.raises(SegnestError, match=r"in use by another segnest run \(pid \d+"):
            train_seg.run_train(tiny_train_config(folder_dataset, work, iters=2))
    assert not (work / "last.pt").exists()
    train_seg.run_train(tiny_train_config(folder_dataset, work, iters=2))  # released
    with FolderLock(work):  # and released again after the run
        pass


def test_checkpoints_are_never_written_with_non_finite_weights(folder_dataset, tmp_path,
                                                               tiny_train_config, monkeypatch):
    real_step = train_seg.optimizer_step

    def step_then_poison(loss, optimizer, scheduler, scaler):
        real_step(loss, optimizer, scheduler, scaler)
        if scheduler.last_epoch == 4:  # weights go bad while the loss is still finite
            with torch.no_grad():
                optimizer.param_groups[0]["params"][0].fill_(float("nan"))

    monkeypatch.setattr(train_seg, "optimizer_step", step_then_poison)
    cfg = tiny_train_config(folder_dataset, tmp_path / "run", iters=6, val_interval=100,
                            checkpoint_interval=2)
    with pytest.raises(SegnestError, match=r"loss became nan at iteration 5.*\(iteration 2\)"):
        train_seg.run_train(cfg)
    assert load_checkpoint(tmp_path / "run" / "last.pt")["iteration"] == 2
    assert not (tmp_path / "run" / "iter_4.pt").exists()


def test_a_batch_without_labelled_pixels_adds_zero_loss():
    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    aux = torch.randn(2, 3, 4, 4, requires_grad=True)
    target = torch.full((2, 16, 16), 255)
    loss, aux_loss = segmentation_loss({"out": logits, "aux": aux}, target, 0.4)
    assert loss.item() == 0.0 and aux_loss.item() == 0.0
    loss.backward()
    assert torch.count_nonzero(logits.grad) == 0 and aux.grad is not None


def test_training_goes_on_through_crops_without_labels(folder_dataset, tmp_path,
                                                       tiny_train_config):
    # Half the training masks are all ignore: some batches hold no labelled pixel.
    import numpy as np
    from PIL import Image

    for index in range(0, 8, 2):
        path = folder_dataset / "masks" / "train" / f"img{index}.png"
        mask = np.asarray(Image.open(path))
        Image.fromarray(np.full_like(mask, 255)).save(path)
    result = train_seg.run_train(tiny_train_config(folder_dataset, tmp_path / "run", iters=6))
    assert result["iteration"] == 6


def _empty_image(folder_dataset, name="img3.png"):
    (folder_dataset / "images" / "train" / name).write_bytes(b"")


def test_skip_bad_samples_always_terminates_and_resumes_exactly(folder_dataset, tmp_path,
                                                               tiny_train_config, capsys):
    _empty_image(folder_dataset)
    common = dict(skip_bad_samples=True, val_interval=100, checkpoint_interval=3)
    whole = train_seg.run_train(tiny_train_config(folder_dataset, tmp_path / "whole",
                                                  iters=12, **common))
    assert whole["iteration"] == 12 and whole["skipped_samples"] >= 2  # seen each epoch
    assert capsys.readouterr().err.count("skipping a bad sample") == 1  # named once
    last = load_checkpoint(tmp_path / "whole" / "last.pt")
    assert last["position"] > last["iteration"]  # dropped batches advanced the position

    # A run that stopped at iteration 6 and resumed (in another folder) ends the same.
    train_seg.run_train(tiny_train_config(folder_dataset, tmp_path / "parts", iters=12,
                                          resume=str(tmp_path / "whole" / "iter_6.pt"),
                                          **common))
    again = load_checkpoint(tmp_path / "parts" / "last.pt")
    assert again["position"] == last["position"]
    for key, value in last["model"].items():
        assert torch.equal(value, again["model"][key]), key


def test_skip_bad_samples_with_no_usable_batch_stops_with_one_line(folder_dataset, tmp_path,
                                                                   tiny_train_config):
    for index in range(8):
        _empty_image(folder_dataset, f"img{index}.png")
    with pytest.raises(SegnestError, match="no batch of epoch 0 could be used"):
        train_seg.run_train(tiny_train_config(folder_dataset, tmp_path / "run", iters=3,
                                              skip_bad_samples=True))


def test_the_run_keeps_a_plain_log_and_ends_with_a_summary(folder_dataset, tmp_path,
                                                           tiny_train_config, capsys):
    work = tmp_path / "run"
    train_seg.run_train(tiny_train_config(folder_dataset, work, iters=6, log_interval=2))
    out = capsys.readouterr().out
    log = (work / "train.log").read_text()
    for text in ("training deeplabv3_resnest14", "iter 2/6", "iter 6/6", "val mIoU",
                 "best val mIoU", "segnest eval --checkpoint", "tensorboard --logdir"):
        assert text in out and text in log, text
    assert "iter 3/6  " not in out  # one progress line every --log-interval
    assert "\r" not in log and "\x1b" not in log
    train_seg.run_train(tiny_train_config(folder_dataset, work, iters=8, resume="auto"))
    log = (work / "train.log").read_text()
    assert log.count("training deeplabv3_resnest14") == 2  # the log is appended to


def test_the_log_keeps_what_the_terminal_shows_of_each_line():
    terminal, log = io.StringIO(), io.StringIO()
    tee = _Tee(terminal, log)
    tee.write("train:  10%|#   | 1/10\rtrain:  20%|##  | 2/10")
    tee.write("\r\x1b[1mtrain: 100%|####| 10/10\x1b[0m\nval mIoU 50.00\n\n")
    assert log.getvalue() == "train: 100%|####| 10/10\nval mIoU 50.00\n"
    assert terminal.getvalue().startswith("train:  10%")


def test_a_warmup_longer_than_an_epoch_based_run_is_one_line(folder_dataset, tmp_path,
                                                             tiny_train_config):
    with pytest.raises(SegnestError, match="--warmup-iters 50 is longer than the run"):
        train_seg.run_train(tiny_train_config(folder_dataset, tmp_path / "run", iters=None,
                                              epochs=2, warmup_iters=50))
    assert not (tmp_path / "run" / "last.pt").exists()


def test_without_a_terminal_long_work_prints_a_line_per_tenth(capsys, monkeypatch):
    from segnest.runtime import console

    for _ in console.progress_bar(range(50), desc="eval"):  # quick: nothing to report
        pass
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(console, "PLAIN_PROGRESS_INTERVAL_S", 0.0)
    for _ in console.progress_bar(range(50), desc="eval"):
        pass
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "eval: 5/50 (10%)" and lines[-1] == "eval: 50/50 (100%)"
    assert len(lines) == 10


def test_a_refused_run_leaves_nothing_behind(folder_dataset, tmp_path, tiny_train_config):
    work = tmp_path / "new" / "run"
    with pytest.raises(SegnestError, match="--warmup-iters 50 is longer than the run"):
        train_seg.run_train(tiny_train_config(folder_dataset, work, iters=None, epochs=2,
                                              warmup_iters=50))
    assert not work.exists()  # no lock, no log, no folder
    # In a folder of an earlier run, its files stay as they were.
    train_seg.run_train(tiny_train_config(folder_dataset, work, iters=2))

    def contents():  # the lock file records its latest holder: it is not the run's
        return {p: p.read_bytes() for p in work.rglob("*") if p.is_file()
                and p.name != ".segnest.lock"}

    before = contents()
    with pytest.raises(SegnestError, match="--warmup-iters"):
        train_seg.run_train(tiny_train_config(folder_dataset, work, iters=None, epochs=2,
                                              warmup_iters=50, resume="auto"))
    assert contents() == before


def test_the_summary_suggests_tensorboard_only_when_the_run_wrote_it(folder_dataset, tmp_path,
                                                                     tiny_train_config, capsys):
    train_seg.run_train(tiny_train_config(folder_dataset, tmp_path / "run", iters=2,
                                          tensorboard=False))
    out = capsys.readouterr().out
    assert "segnest eval --checkpoint" in out and "tensorboard --logdir" not in out
