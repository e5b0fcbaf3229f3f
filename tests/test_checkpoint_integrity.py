"""Never lose the user's work, never load a silently wrong checkpoint: foreign files, wrong
tasks, bit rot, concurrent writers and failed writes each end in one clear line."""

import errno
import os
import socket
import struct
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch

import segnest
from segnest.engine.workdir import find_resume_checkpoint
from segnest.errors import SegnestError
from segnest.models import create_model, model_from_checkpoint
from segnest.runtime import checkpoint, files
from segnest.runtime.checkpoint import CHECKSUM_KEY, load_checkpoint, save_checkpoint
from segnest.runtime.files import atomic_open, remove_stale_temp_files, write_text_atomic

HOST = socket.gethostname().replace(".", "_")
TINY = dict(stage_width=8, stem_width=8)


def one_line_error(excinfo, path) -> str:
    message = str(excinfo.value)
    assert "\n" not in message and str(path) in message
    return message


def training_state(iteration: int = 1) -> dict:
    generator = torch.Generator().manual_seed(iteration)
    weight = torch.randn(16, 8, generator=generator)
    return {
        "iteration": iteration,
        "model": {"w": weight, "half": weight.to(torch.bfloat16), "steps": torch.tensor(3)},
        "optimizer": {"state": {0: {"momentum_buffer": torch.ones(16, 8)}},
                      "param_groups": [{"lr": 0.1, "params": [0]}]},
        "rng": [{"torch": torch.get_rng_state()}],
    }


def flip_byte_in_tensor_storage(path: Path, member_suffix: str = "data/0", at: int = 3) -> None:
    """Change one byte of a tensor's stored bytes in place, as bit rot would: the zip and its
    pickle stay intact, so torch.load would return the changed tensor without complaint."""
    with zipfile.ZipFile(path) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith(member_suffix))
    with open(path, "r+b") as handle:
        handle.seek(info.header_offset + 26)
        name_length, extra_length = struct.unpack("<HH", handle.read(4))
        handle.seek(info.header_offset + 30 + name_length + extra_length + at)
        byte = handle.read(1)
        handle.seek(-1, os.SEEK_CUR)
        handle.write(bytes([byte[0] ^ 0x01]))


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


# ---------------------------------------------------------------- 1. foreign files


def write_onnx_like(path: Path) -> None:
    # The first bytes torch.onnx.export writes: ir_version, then the producer name.
    path.write_bytes(b"\x08\x09\x12\x07pytorch\x1a\x062.15.0:\xd7\x01\n\\\n\x0cGemm")


def write_torchscript(path: Path) -> None:
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(path))


def write_exported_program(path: Path) -> None:
    # The members torch.export.save writes (a real export takes seconds to trace).
    with zipfile.ZipFile(path, "w") as archive:
        for member in ("archive_format", "models/model.json", "data/weights/weight_0"):
            archive.writestr(f"model/{member}", b"{}")


def write_safetensors(path: Path) -> None:
    header = b'{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\x00" * 4)


FOREIGN_FILES = {
    "recipe.yaml": (lambda p: p.write_text("epochs: 3\nlr: 0.1\n"), "text file"),
    "model.onnx": (write_onnx_like, "ONNX model"),
    "model.bin": (write_onnx_like, "ONNX model"),  # recognised by its bytes, not its name
    "model.torchscript.pt": (write_torchscript, "TorchScript program"),
    "model.pt2": (write_exported_program, "torch.export program"),
    "model.safetensors": (write_safetensors, "safetensors file.*torch.save"),
    "empty.pt": (lambda p: p.write_bytes(b""), "empty.*corrupt or truncated"),
    "runs": (lambda p: (p.mkdir(), (p / "best.pt").write_bytes(b"x")), "folder.*runs/best.pt"),
    "page.pth": (lambda p: p.write_text("<!DOCTYPE html><html>Sign in</html>"), "web page"),
}


@pytest.mark.filterwarnings("ignore:`torch.jit.:FutureWarning")
@pytest.mark.parametrize("name", sorted(FOREIGN_FILES))
def test_a_file_that_is_not_a_checkpoint_is_named_for_what_it_is(tmp_path, name):
    write, expected = FOREIGN_FILES[name]
    path = tmp_path / name
    write(path)
    with pytest.raises(SegnestError) as excinfo:
        load_checkpoint(path)
    assert expected.split(".*")[0] in one_line_error(excinfo, path)
    with pytest.raises(SegnestError, match=expected):
        load_checkpoint(path)


def test_a_text_file_given_as_pretrained_weights_is_a_user_error(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("every line of this is text\n" * 5)
    with pytest.raises(SegnestError, match="text file.*official ResNeSt .pth"):
        segnest.load_pretrained(create_model("resnest14", **TINY), path)


def test_an_unreadable_checkpoint_names_its_path(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(training_state(), path)
    if os.geteuid() == 0:  # root reads anything: make the read fail the way it would
        def refuse(*args, **kwargs):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        monkeypatch.setattr(torch, "load", refuse)
    else:
        path.chmod(0)
    with pytest.raises(SegnestError, match="permission denied") as excinfo:
        load_checkpoint(path)
    one_line_error(excinfo, path)


# ---------------------------------------------------------------- 2. wrong task


def classification_checkpoint(**extra) -> dict:
    model = create_model("resnest14", num_classes=3, **TINY)
    return {"model_name": "resnest14", "model_kwargs": dict(num_classes=3, **TINY),
            "model": model.state_dict(), **extra}


@pytest.mark.parametrize("stored", [{"task": "classification"}, {}], ids=["task", "older"])
def test_a_pretraining_checkpoint_given_for_segmentation_says_how_to_use_it(stored):
    checkpoint = classification_checkpoint(**stored)
    with pytest.raises(SegnestError, match=r"pre.pt is a classification pretraining checkpoint "
                       r".*segnest train --pretrained pre.pt$"):
        model_from_checkpoint(checkpoint, source="pre.pt")
    assert model_from_checkpoint(checkpoint, task="classification").fc.out_features == 3


def test_a_checkpoint_of_a_model_that_is_not_for_segmentation_is_refused():
    checkpoint = {"task": "segmentation", "model_name": "unet_small", "model": {}}
    with pytest.raises(SegnestError, match="'unet_small', which is not a segmentation model"):
        model_from_checkpoint(checkpoint, source="other.pt")


# ---------------------------------------------------------------- 3. checksum


@pytest.mark.parametrize("mmap", [False, True])
def test_a_flipped_byte_inside_a_tensor_fails_the_checksum(tmp_path, mmap):
    path = tmp_path / "last.pt"
    save_checkpoint(training_state(), path)
    flip_byte_in_tensor_storage(path)
    with pytest.raises(SegnestError, match="fails its checksum.*--resume auto") as excinfo:
        load_checkpoint(path, mmap=mmap)
    one_line_error(excinfo, path)
    loaded = load_checkpoint(path, verify=False)  # what torch.load alone would hand out
    assert not torch.equal(loaded["model"]["w"], training_state()["model"]["w"])


def test_the_checksum_is_the_same_hashed_on_threads_or_not(monkeypatch):
    state = training_state()
    serial = checkpoint.state_checksum(state)
    monkeypatch.setattr(checkpoint, "_PARALLEL_FROM_BYTES", 0)
    assert checkpoint.state_checksum(state) == serial
    state["model"]["w"][0, 0] += 1
    assert checkpoint.state_checksum(state) != serial


def test_checksummed_checkpoint_loads_back_equal_without_the_checksum_entry(tmp_path):
    state = training_state()
    save_checkpoint(state, tmp_path / "last.pt")
    assert CHECKSUM_KEY in torch.load(tmp_path / "last.pt", weights_only=True)
    loaded = load_checkpoint(tmp_path / "last.pt", mmap=True)
    assert CHECKSUM_KEY not in loaded
    assert torch.equal(loaded["model"]["half"], state["model"]["half"])


def test_files_without_a_checksum_load_and_bare_state_dicts_stay_bare(tmp_path):
    torch.save(training_state(), tmp_path / "old.pt")
    assert load_checkpoint(tmp_path / "old.pt")["iteration"] == 1
    weights = create_model("resnest14", **TINY).state_dict()
    save_checkpoint(weights, tmp_path / "backbone.pth")
    assert set(torch.load(tmp_path / "backbone.pth", weights_only=True)) == set(weights)


def test_resume_auto_skips_a_checkpoint_that_fails_its_checksum(tmp_path):
    save_checkpoint(training_state(100), tmp_path / "iter_100.pt")
    save_checkpoint(training_state(200), tmp_path / "last.pt")
    flip_byte_in_tensor_storage(tmp_path / "last.pt")
    with pytest.warns(UserWarning, match="fails its checksum"):
        assert find_resume_checkpoint(tmp_path) == tmp_path / "iter_100.pt"


# ---------------------------------------------------------------- 4. temp files


def test_save_removes_only_temp_files_whose_writer_is_gone(tmp_path):
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        names = {
            "live writer": f".last.pt.{HOST}.{live.pid}.0123456789abcdef.partial",
            "other host": f".last.pt.elsewhere.{dead_pid()}.0123456789abcdef.partial",
            "old scheme, fresh": ".last.pt.deadbeefdeadbeef.partial",
            "dead writer": f".last.pt.{HOST}.{dead_pid()}.0123456789abcdef.partial",
            "own leftover": f".best.pt.{HOST}.{os.getpid()}.0123456789abcdef.partial",
            "old scheme, a day old": ".iter_5.pt.deadbeefdeadbeef.partial",
        }
        for name in names.values():
            (tmp_path / name).write_bytes(b"PK\x03\x04 partial")
        day_ago = time.time() - files.STALE_AFTER_S - 60
        os.utime(tmp_path / names["old scheme, a day old"], (day_ago, day_ago))
        save_checkpoint(training_state(), tmp_path / "last.pt")
    finally:
        live.kill()
        live.wait()
    kept = {what for what, name in names.items() if (tmp_path / name).exists()}
    assert kept == {"live writer", "other host", "old scheme, fresh"}


def test_a_concurrent_save_in_the_same_folder_leaves_an_open_write_alone(tmp_path):
    with atomic_open(tmp_path / "metrics.json", "w") as handle:
        handle.write("{")
        save_checkpoint(training_state(), tmp_path / "last.pt")
        assert remove_stale_temp_files(tmp_path) == []
        handle.write("}")
    assert (tmp_path / "metrics.json").read_text() == "{}"


# ---------------------------------------------------------------- 5. failed writes


def assert_failed_write_kept_old_file(tmp_path, target: Path, excinfo, old: bytes) -> str:
    message = one_line_error(excinfo, target)
    assert target.read_bytes() == old
    assert not [p for p in tmp_path.rglob(".*partial")]
    return message


def test_a_full_disk_leaves_the_previous_checkpoint_and_no_temp_file(tmp_path, monkeypatch):
    target = tmp_path / "last.pt"
    save_checkpoint(training_state(1), target)
    old = target.read_bytes()

    def disk_full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", disk_full)
    with pytest.raises(SegnestError, match="no space left.*--work-dir") as excinfo:
        save_checkpoint(training_state(2), target)
    assert_failed_write_kept_old_file(tmp_path, target, excinfo, old)


def test_a_write_that_runs_out_of_space_midway_is_one_error(tmp_path):
    target = tmp_path / "metrics.json"
    target.write_text("old")
    with pytest.raises(SegnestError, match="no space left") as excinfo:
        with atomic_open(target, "w") as handle:
            handle.write("new")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert_failed_write_kept_old_file(tmp_path, target, excinfo, b"old")


def test_a_read_only_folder_is_one_error_naming_the_target(tmp_path, monkeypatch):
    folder = tmp_path / "out"
    folder.mkdir()
    target = folder / "mask.png"
    target.write_bytes(b"old")
    if os.geteuid() == 0:  # root writes anywhere: refuse the way a read-only mount does
        real_open = os.open

        def read_only(path, flags, *args):
            if flags & os.O_CREAT:
                raise OSError(errno.EROFS, "Read-only file system", str(path))
            return real_open(path, flags, *args)

        monkeypatch.setattr(os, "open", read_only)
        expected = "read-only"
    else:
        folder.chmod(0o555)
        expected = "permission denied"
    try:
        with pytest.raises(SegnestError, match=expected) as excinfo:
            write_text_atomic(target, "new")
    finally:
        folder.chmod(0o755)
    assert_failed_write_kept_old_file(tmp_path, target, excinfo, b"old")


def test_a_folder_in_place_of_the_target_or_a_file_in_place_of_its_folder(tmp_path):
    (tmp_path / "best.pt").mkdir()
    with pytest.raises(SegnestError, match="a folder of that name is in the way"):
        save_checkpoint(training_state(), tmp_path / "best.pt")
    (tmp_path / "runs").write_text("a file")
    with pytest.raises(SegnestError, match="is a file, not a folder") as excinfo:
        write_text_atomic(tmp_path / "runs" / "metrics.json", "{}")
    one_line_error(excinfo, tmp_path / "runs" / "metrics.json")


def test_a_writer_that_reports_a_full_disk_in_its_own_words_is_one_line(tmp_path, monkeypatch):
    """torch.save on a full disk raises RuntimeError('... unexpected pos ...'), not OSError;
    the file system's free space tells what happened."""
    from collections import namedtuple

    target = tmp_path / "last.pt"
    save_checkpoint({"weight": torch.ones(2), "iteration": 1}, target)
    before = target.read_bytes()

    def full_disk_save(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:671] . unexpected pos 1 vs 2")

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(checkpoint.torch, "save", full_disk_save)
    monkeypatch.setattr(files.shutil, "disk_usage", lambda path: usage(10, 10, 0))
    with pytest.raises(SegnestError, match=r"cannot write .*last.pt: no space left"):
        save_checkpoint({"weight": torch.zeros(2), "iteration": 2}, target)
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]
    # With space left, the writer's own error is the better report.
    monkeypatch.setattr(files.shutil, "disk_usage", lambda path: usage(10, 0, 1 << 30))
    with pytest.raises(RuntimeError, match="unexpected pos"):
        save_checkpoint({"weight": torch.zeros(2), "iteration": 2}, target)


def test_a_checkpoint_over_the_file_size_limit_is_one_line_and_keeps_the_old_one(tmp_path):
    """Past ``ulimit -f`` torch.save raises RuntimeError ('unexpected pos'), not OSError,
    with free space left; the file system's own answer (EFBIG) names the cause."""
    resource = pytest.importorskip("resource")  # POSIX only
    target = tmp_path / "last.pt"
    save_checkpoint({"weight": torch.ones(2), "iteration": 1}, target)
    before = target.read_bytes()
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, hard))
    try:
        with pytest.raises(SegnestError, match=r"file-size limit \(ulimit -f\)") as excinfo:
            save_checkpoint({"weight": torch.zeros(100_000), "iteration": 2}, target)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    one_line_error(excinfo, target)
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_a_quota_refusal_reported_as_runtimeerror_is_one_line(tmp_path, monkeypatch):
    target = tmp_path / "last.pt"

    def quota_save(obj, handle, **kwargs):
        handle.write(b"x" * 10)
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1 vs 2")

    real_open = open

    def quota_open(path, mode="r", *args, **kwargs):
        if "a" in mode and str(path).endswith(".partial"):
            raise OSError(errno.EDQUOT, "Disk quota exceeded")
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "save", quota_save)
    monkeypatch.setattr("builtins.open", quota_open)
    with pytest.raises(SegnestError, match="disk quota is exceeded") as excinfo:
        save_checkpoint({"weight": torch.zeros(2), "iteration": 2}, target)
    one_line_error(excinfo, target)
    assert list(tmp_path.iterdir()) == []


def test_a_training_checkpoint_without_its_checksum_is_named_when_loaded(tmp_path):
    path = tmp_path / "last.pt"
    torch.save({**training_state(), "config": {"lr": 0.01}, "optimizer": {"state": {}}}, path)
    with pytest.warns(UserWarning, match="training checkpoint .* without the checksum"):
        load_checkpoint(path)


def test_a_checksum_of_an_unknown_algorithm_is_named_when_loaded(tmp_path):
    path = tmp_path / "last.pt"
    state = training_state()
    state[CHECKSUM_KEY] = {"algorithm": "blake3-v9", "digest": "00"}
    torch.save(state, path)
    with pytest.warns(UserWarning, match="unknown kind \\('blake3-v9'"):
        load_checkpoint(path)


def test_checksummed_and_foreign_weight_files_load_without_a_warning(tmp_path, recwarn):
    save_checkpoint({**training_state(), "config": {"lr": 0.01}, "optimizer": {}},
                    tmp_path / "a.pt")
    torch.save({"model": {"w": torch.ones(2)}}, tmp_path / "b.pt")
    load_checkpoint(tmp_path / "a.pt")
    load_checkpoint(tmp_path / "b.pt")
    assert not [w for w in recwarn if "checksum" in str(w.message)]


def test_a_bare_state_dict_target_is_decided_by_loading_what_is_there(tmp_path):
    from segnest.runtime.checkpoint import check_state_dict_target

    bare = tmp_path / "backbone.pth"
    torch.save({"conv.weight": torch.ones(2)}, bare)
    check_state_dict_target(bare, "--export", {})  # an earlier export may be replaced
    check_state_dict_target(tmp_path / "new.pth", "--export", {})
    trained = tmp_path / "best.pt"  # named like a weights file, holds a training run
    save_checkpoint({**training_state(), "config": {}, "optimizer": {}}, trained)
    fake = tmp_path / "weights.pth"
    fake.write_text("not a checkpoint")
    reserved = tmp_path / "run" / "last.pt"
    for target, says in ((trained, "segnest training checkpoint"),
                         (fake, "not a PyTorch checkpoint"),
                         (tmp_path, "is a folder"),
                         (fake / "x.pth", "is a file, not a folder"),
                         (reserved, "this run's last.pt")):
        with pytest.raises(SegnestError, match=says) as excinfo:
            check_state_dict_target(target, "--export", {reserved.resolve(): "this run's last.pt"})
        assert "\n" not in str(excinfo.value)
    assert fake.read_text() == "not a checkpoint"
