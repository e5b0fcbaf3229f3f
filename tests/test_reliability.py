"""Faults and bad input never lose work or give a silent wrong answer."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import segnest.tasks.segmentation.task as train_seg
from segnest.errors import SegnestError
from segnest.runtime.checkpoint import load_checkpoint


def segnest_cli(*args: str, timeout: float = 300, **popen) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "segnest", *args], capture_output=True,
                          text=True, timeout=timeout, env=env, **popen)


@pytest.mark.slow
def test_sigkill_mid_training_then_resume_auto_matches_uninterrupted(
        folder_dataset, tmp_path, tiny_train_config, tiny_flags):
    work = tmp_path / "killed"
    flags = ["train", "--dataset", "folder", "--data-root", str(folder_dataset), "--iters",
             "10", "--val-interval", "100", "--checkpoint-interval", "2", "--work-dir",
             str(work), *tiny_flags]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "segnest", *flags], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (work / "iter_4.pt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (work / "iter_4.pt").exists(), "the run never reached its second checkpoint"
    resumed = segnest_cli(*flags, "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout

    reference = tiny_train_config(folder_dataset, tmp_path / "uninterrupted", iters=10,
                            val_interval=100, checkpoint_interval=2, panels=4, log_interval=10)
    train_seg.run_train(reference)
    a = load_checkpoint(work / "last.pt")
    b = load_checkpoint(tmp_path / "uninterrupted" / "last.pt")
    assert a["iteration"] == b["iteration"] == 10
    for key in b["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], atol=0, rtol=0, msg=key)


def test_nan_loss_stops_training_and_keeps_the_last_good_checkpoint(folder_dataset, tmp_path,
                                                                    monkeypatch, tiny_train_config):
    real_loss = train_seg.segmentation_loss
    calls = {"n": 0}

    def loss_turning_nan(*args):
        calls["n"] += 1
        loss, aux = real_loss(*args)
        return (loss * float("nan"), aux) if calls["n"] >= 4 else (loss, aux)

    monkeypatch.setattr(train_seg, "segmentation_loss", loss_turning_nan)
    cfg = tiny_train_config(folder_dataset, tmp_path / "nan", iters=6, val_interval=2,
                      checkpoint_interval=2)
    with pytest.raises(SegnestError,
                       match=r"loss became nan at iteration 4.*\(iteration 2\), has finite"):
        train_seg.run_train(cfg)
    last = load_checkpoint(tmp_path / "nan" / "last.pt")
    best = load_checkpoint(tmp_path / "nan" / "best.pt")
    assert last["iteration"] == 2
    for state in (last, best):
        assert all(torch.isfinite(v).all() for v in state["model"].values()
                   if v.is_floating_point())


@pytest.mark.slow
def test_corrupt_training_image_is_one_line_naming_the_file(folder_dataset, tmp_path, tiny_flags):
    bad = folder_dataset / "images" / "train" / "img3.png"
    bad.write_bytes(bad.read_bytes()[:60])
    result = segnest_cli("train", "--dataset", "folder", "--data-root", str(folder_dataset),
                         "--iters", "4", "--work-dir", str(tmp_path / "w"), *tiny_flags)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "img3.png" in result.stderr and "--skip-bad-samples" in result.stderr
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("segnest: error:")
    assert result.stderr.rstrip().endswith(errors[0])


def test_skip_bad_samples_warns_and_counts(folder_dataset, tmp_path, tiny_train_config):
    bad = folder_dataset / "images" / "train" / "img3.png"
    bad.write_bytes(bad.read_bytes()[:60])
    cfg = tiny_train_config(folder_dataset, tmp_path / "skip", iters=4, skip_bad_samples=True,
                      val_interval=100, checkpoint_interval=0)
    result = train_seg.run_train(cfg)
    assert result["iteration"] == 4 and result["skipped_samples"] >= 1


@pytest.mark.slow
@pytest.mark.parametrize(
    "args, expected",
    [
        (["train", "--dataset", "ade20k", "--data-root", "/nonexistent/ade"],
         "datasets/README.md"),
        (["train", "--dataset", "mini", "--device", "cuda"], "no CUDA"),
        (["train", "--dataset", "mini", "--backbone", "resnet51"], "unknown --backbone"),
        (["eval", "--checkpoint", "/nonexistent/best.pt"], "/nonexistent/best.pt"),
    ],
)
def test_user_errors_are_one_line_without_traceback(args, expected):
    result = segnest_cli(*args, "--batch-size", "2") if args[0] == "train" else \
        segnest_cli(*args)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert expected in result.stderr
    assert result.stderr.startswith("segnest: error:")


@pytest.mark.slow
def test_debug_flag_shows_the_traceback():
    result = segnest_cli("--debug", "eval", "--checkpoint", "/nonexistent/best.pt")
    assert result.returncode == 2 and "Traceback" in result.stderr


class Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


@pytest.mark.slow
def test_checkpoint_carrying_code_is_refused(tmp_path):
    evil = tmp_path / "evil.pt"
    torch.save({"model": {}, "payload": Payload()}, evil)
    result = segnest_cli("eval", "--checkpoint", str(evil))
    assert result.returncode == 2
    assert "pwned" not in result.stdout
    assert "weights" in result.stderr.lower()


@pytest.mark.slow
@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_or_sigterm_finishes_the_iteration_saves_and_exits_non_zero(
        folder_dataset, tmp_path, tiny_flags, signum, code):
    work = tmp_path / "interrupted"
    flags = [*tiny_flags]
    flags[flags.index("--workers") + 1] = "2"  # workers get the signal too, as in a terminal
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "segnest", "train", "--dataset", "folder", "--data-root",
         str(folder_dataset), "--iters", "500", "--val-interval", "1000",
         "--checkpoint-interval", "2", "--work-dir", str(work), *flags],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True)
    deadline = time.time() + 120
    while not (work / "iter_2.pt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signum)  # a terminal's Ctrl-C, or SLURM's SIGTERM: the whole group
    out, err = proc.communicate(timeout=120)
    name = signal.Signals(signum).name
    assert proc.returncode == code, err[-2000:]
    assert f"stopped by {name} at iteration" in out and "--resume" in err
    assert "Traceback" not in err
    stopped_at = int(out.split("at iteration ")[1].split("/")[0])
    assert load_checkpoint(work / "last.pt")["iteration"] == stopped_at
    log = (work / "train.log").read_text()
    assert f"stopped by {name}" in log and "\r" not in log


@pytest.mark.slow
def test_output_piped_into_a_reader_that_stops_early_is_not_a_traceback():
    proc = subprocess.run(f"{sys.executable} -m segnest recipes | head -1", shell=True,
                          capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() and "Traceback" not in proc.stderr
