import os
import random
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

from segnest.engine import process as run_state
from segnest.engine.process import StopRequest
from segnest.engine.rng import capture_rng_state, restore_rng_state
from segnest.engine.workdir import find_resume_checkpoint, prune_periodic_checkpoints
from segnest.errors import SegnestError
from segnest.runtime.checkpoint import load_checkpoint, save_checkpoint


class NotAWeight:
    """A custom class: pickling it stores a reference to code, which weights_only refuses."""


def state_at(iteration: int) -> dict:
    generator = torch.Generator().manual_seed(iteration)
    return {"iteration": iteration, "model": {"w": torch.randn(4, 3, generator=generator)}}


def dead_pid() -> int:
    """The PID of a process that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def truncate(path, keep_fraction: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep_fraction)])


def test_saved_checkpoint_loads_back_equal(tmp_path):
    state = state_at(7)
    save_checkpoint(state, tmp_path / "run" / "last.pt")
    loaded = load_checkpoint(tmp_path / "run" / "last.pt")
    assert loaded["iteration"] == 7
    assert torch.equal(loaded["model"]["w"], state["model"]["w"])


def test_crash_during_save_keeps_the_old_checkpoint_and_leaves_no_partial_target(
    tmp_path, monkeypatch
):
    target = tmp_path / "last.pt"
    save_checkpoint(state_at(1), target)
    old_bytes = target.read_bytes()

    def write_half_then_die(obj, handle, *args, **kwargs):
        handle.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", write_half_then_die)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(state_at(2), target)
    assert target.read_bytes() == old_bytes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def test_temp_file_of_a_killed_writer_is_ignored_then_removed_by_the_next_save(tmp_path):
    save_checkpoint(state_at(3), tmp_path / "iter_3.pt")
    host = socket.gethostname().replace(".", "_")
    orphan = tmp_path / f".last.pt.{host}.{dead_pid()}.0123456789abcdef.partial"
    orphan.write_bytes(b"PK\x03\x04 killed mid-write")
    assert find_resume_checkpoint(tmp_path) == tmp_path / "iter_3.pt"
    save_checkpoint(state_at(4), tmp_path / "last.pt")
    assert not orphan.exists()


def test_missing_checkpoint_is_a_user_error(tmp_path):
    with pytest.raises(SegnestError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")


@pytest.mark.parametrize("keep_fraction", [0.0, 0.001, 0.5, 0.99])
def test_truncated_checkpoint_is_reported_as_corrupt(tmp_path, keep_fraction):
    path = tmp_path / "last.pt"
    save_checkpoint(state_at(5), path)
    truncate(path, keep_fraction)
    with pytest.raises(SegnestError, match="corrupt or truncated.*--resume auto"):
        load_checkpoint(path)


def test_checkpoint_with_pickled_code_is_refused_without_unpickling_it(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"payload": NotAWeight()}, path)
    with pytest.raises(SegnestError, match="NotAWeight.*weights_only=True.*never unpickles code"):
        load_checkpoint(path)


def test_checkpoint_that_is_not_a_dict_is_a_user_error(tmp_path):
    path = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), path)
    with pytest.raises(SegnestError, match="not a dict"):
        load_checkpoint(path)


def test_resume_picks_the_highest_stored_iteration_not_the_newest_file(tmp_path):
    save_checkpoint(state_at(300), tmp_path / "last.pt")
    save_checkpoint(state_at(200), tmp_path / "iter_200.pt")  # written later, older progress
    save_checkpoint(state_at(100), tmp_path / "iter_100.pt")
    assert find_resume_checkpoint(tmp_path) == tmp_path / "last.pt"


def test_resume_skips_a_corrupt_newest_checkpoint_with_a_warning(tmp_path):
    save_checkpoint(state_at(100), tmp_path / "iter_100.pt")
    save_checkpoint(state_at(200), tmp_path / "iter_200.pt")
    save_checkpoint(state_at(200), tmp_path / "last.pt")
    truncate(tmp_path / "iter_200.pt")
    truncate(tmp_path / "last.pt", 0.9)
    with pytest.warns(UserWarning, match="corrupt or truncated"):
        found = find_resume_checkpoint(tmp_path)
    assert found == tmp_path / "iter_100.pt"


def test_resume_finds_nothing_in_an_empty_or_missing_directory(tmp_path):
    assert find_resume_checkpoint(tmp_path) is None
    assert find_resume_checkpoint(tmp_path / "missing") is None


def test_prune_keeps_the_newest_periodic_checkpoints_and_last(tmp_path):
    for iteration in (5, 10, 20, 100):
        save_checkpoint(state_at(iteration), tmp_path / f"iter_{iteration}.pt")
    save_checkpoint(state_at(100), tmp_path / "last.pt")
    removed = prune_periodic_checkpoints(tmp_path, keep=2)
    assert sorted(p.name for p in removed) == ["iter_10.pt", "iter_5.pt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_100.pt", "iter_20.pt", "last.pt"]


def draw_from_every_generator() -> tuple:
    return (
        [random.random() for _ in range(3)],
        random.gauss(0, 1),
        np.random.rand(3).tolist(),
        np.random.randn(),
        torch.rand(3).tolist(),
    )


def test_rng_state_survives_a_weights_only_checkpoint_and_replays_the_same_draws(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    # Leave a cached Gaussian in Python's and NumPy's generators, part of their state too.
    random.gauss(0, 1)
    np.random.randn()
    save_checkpoint({"rng": capture_rng_state()}, tmp_path / "last.pt")
    expected = draw_from_every_generator()

    random.seed(10)
    np.random.seed(20)
    torch.manual_seed(30)
    restore_rng_state(load_checkpoint(tmp_path / "last.pt")["rng"])
    assert draw_from_every_generator() == expected


def test_save_does_not_leave_files_readable_only_by_the_owner(tmp_path):
    if os.name != "posix":
        pytest.skip("POSIX permission bits")
    previous_umask = os.umask(0o022)
    try:
        save_checkpoint(state_at(1), tmp_path / "last.pt")
    finally:
        os.umask(previous_umask)
    assert (tmp_path / "last.pt").stat().st_mode & 0o777 == 0o644


def test_second_ctrl_c_stops_at_once_except_the_copy_torchrun_forwards(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(run_state.time, "monotonic", lambda: clock[0])
    single = StopRequest()
    single._handle(signal.SIGINT, None)
    assert single.requested and single.agreed()
    with pytest.raises(KeyboardInterrupt):
        single._handle(signal.SIGINT, None)

    distributed = StopRequest(world_size=2)
    distributed._handle(signal.SIGINT, None)
    clock[0] += 0.5
    distributed._handle(signal.SIGINT, None)  # the agent's copy: ignored
    clock[0] += StopRequest.REPEAT_GRACE_S
    with pytest.raises(KeyboardInterrupt):
        distributed._handle(signal.SIGINT, None)


def _stop_worker(rank: int, store_dir: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{store_dir}/store",
                                         rank=rank, world_size=2)
    try:
        stop = StopRequest(world_size=2)
        first = stop.agreed()
        stop.signum = signal.SIGTERM if rank == 1 else 0  # only rank 1 got the signal
        torch.save([first, stop.agreed(), stop.signal_name], f"{store_dir}/stop{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_ranks_agree_to_stop_when_any_of_them_was_asked(tmp_path):
    torch.multiprocessing.spawn(_stop_worker, args=(str(tmp_path),), nprocs=2, join=True)
    for rank in range(2):
        assert torch.load(tmp_path / f"stop{rank}.pt") == [False, True, "SIGTERM"]
