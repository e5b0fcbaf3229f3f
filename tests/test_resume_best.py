"""--resume auto never replaces the best model: with last.pt gone or damaged it resumes
from the newest intact checkpoint, best.pt included, and refuses a folder whose
checkpoints are all damaged (#25 item 1)."""

import pytest
import torch

from segnest.cli import main
from segnest.engine.workdir import find_resume_checkpoint
from segnest.errors import SegnestError
from segnest.runtime.checkpoint import load_checkpoint, save_checkpoint


def state_at(iteration: int) -> dict:
    return {"iteration": iteration, "model": {"w": torch.full((2,), float(iteration))}}


def truncate(path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_resume_auto_takes_best_pt_when_it_is_the_newest_intact_checkpoint(tmp_path):
    save_checkpoint(state_at(80), tmp_path / "best.pt")
    save_checkpoint(state_at(100), tmp_path / "last.pt")
    truncate(tmp_path / "last.pt")
    with pytest.warns(UserWarning) as caught:  # last.pt skipped, then best.pt taken
        assert find_resume_checkpoint(tmp_path) == tmp_path / "best.pt"
    assert any("resuming from best.pt (iteration 80)" in str(w.message) for w in caught)
    (tmp_path / "last.pt").unlink()
    with pytest.warns(UserWarning, match="resuming from best.pt"):
        assert find_resume_checkpoint(tmp_path) == tmp_path / "best.pt"


def test_resume_auto_prefers_last_pt_over_best_pt_of_the_same_iteration(tmp_path, recwarn):
    save_checkpoint(state_at(100), tmp_path / "best.pt")
    save_checkpoint(state_at(100), tmp_path / "last.pt")
    save_checkpoint(state_at(60), tmp_path / "iter_60.pt")
    assert find_resume_checkpoint(tmp_path) == tmp_path / "last.pt"
    assert not [w for w in recwarn if "best.pt" in str(w.message)]


def test_resume_auto_refuses_a_folder_whose_checkpoints_are_all_damaged(tmp_path):
    for name in ("best.pt", "last.pt"):
        save_checkpoint(state_at(10), tmp_path / name)
        truncate(tmp_path / name)
    before = (tmp_path / "best.pt").read_bytes()
    with pytest.warns(UserWarning), pytest.raises(SegnestError, match="every checkpoint in"):
        find_resume_checkpoint(tmp_path)
    assert (tmp_path / "best.pt").read_bytes() == before


def test_the_issues_reproduction_keeps_best_pt(folder_dataset, tmp_path, tiny_flags):
    """TRF ds --work-dir W; rm W/last.pt; TRF ds --work-dir W --resume auto --seed 3."""
    work = tmp_path / "W"
    train = ["train", "--dataset", "folder", "--data-root", str(folder_dataset), "--iters", "2",
             "--work-dir", str(work), "--no-tensorboard", *tiny_flags]
    assert main(train) == 0
    best = load_checkpoint(work / "best.pt")
    (work / "last.pt").unlink()
    with pytest.warns(UserWarning, match="resuming from best.pt"):
        code = main([*train, "--resume", "auto", "--seed", "3"])
    assert code != 0  # another seed cannot continue exactly: one line, nothing replaced
    kept = load_checkpoint(work / "best.pt")
    assert kept["iteration"] == best["iteration"]
    assert all(torch.equal(kept["model"][k], v) for k, v in best["model"].items())
    with pytest.warns(UserWarning, match="resuming from best.pt"):
        assert main([*train, "--resume", "auto"]) == 0  # same seed: resumes, finishes
    assert load_checkpoint(work / "best.pt")["iteration"] == best["iteration"]
