"""One policy for samples that cannot be read (segnest.data.bad_samples), used by both
training tasks, eval and predict: stop with the file's one line and how to go on, or skip,
name each file once and count."""

from pathlib import Path

import pytest
import torch
from conftest import write_class_folder
from torch.utils.data import DataLoader

from segnest.data.bad_samples import (
    BadSample,
    BadSamplePolicy,
    GuardedSamples,
    batch_usable,
    collate_guarded,
    skipped_warning,
)
from segnest.errors import SegnestError
from segnest.tasks.classification.config import PretrainConfig
from segnest.tasks.classification.task import run_pretrain


class Flaky:
    """Items 0..n-1; odd ones fail to load as a dataset says so."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int):
        if index % 2:
            raise SegnestError(f"cannot read image /data/img{index}.png: truncated")
        return torch.tensor([index])


def test_without_skipping_the_first_bad_sample_stops_with_its_file_and_the_flag():
    policy = BadSamplePolicy(skip=False, what="image(s)")
    with pytest.raises(SegnestError) as error:
        policy.check("cannot read image /data/img1.png: truncated")
    message = str(error.value)
    assert message == ("cannot read image /data/img1.png: truncated (or pass "
                       "--skip-bad-samples to skip unreadable image(s) with a warning)")


def test_skipping_names_each_file_once_and_counts_every_skip():
    shown: list[str] = []
    policy = BadSamplePolicy(skip=True, what="training sample(s)", warn=shown.append)
    for _ in range(3):  # three epochs meet the same two files
        policy.check("bad a.png")
        policy.check("bad b.png", "sample 7")
    assert shown == ["skipping a bad sample: bad a.png", "skipping sample 7: bad b.png"]
    assert policy.count == 6 and policy.total() == 6
    assert policy.summary(6) == ("warning: 6 unreadable training sample(s) skipped, "
                                 "2 distinct file(s) (named above)")
    assert skipped_warning(0) is None
    assert skipped_warning(1, "image(s)") == "warning: 1 unreadable image(s) skipped (named above)"


def test_other_processes_count_but_do_not_print():
    shown: list[str] = []
    policy = BadSamplePolicy(skip=True, warn=shown.append, show=False)
    policy.check("bad a.png")
    assert shown == [] and policy.count == 1


def test_guarded_samples_hand_errors_to_the_main_process_as_data():
    loader = DataLoader(GuardedSamples(Flaky(4)), batch_size=2, collate_fn=collate_guarded)
    (first, bad_first), (second, bad_second) = list(loader)
    assert first.tolist() == [[0]] and second.tolist() == [[2]]
    assert bad_first == [BadSample(1, "cannot read image /data/img1.png: truncated")]
    assert [b.index for b in bad_second] == [3]
    assert collate_guarded([BadSample(0, "x")]) == (None, [BadSample(0, "x")])


@pytest.mark.parametrize("size, distributed, usable", [
    (0, False, False), (1, False, False), (2, False, True), (0, True, False), (1, True, True)])
def test_a_batch_is_usable_with_two_samples_or_one_per_process_under_syncbn(size, distributed,
                                                                           usable):
    assert batch_usable(size, "cpu", distributed) is usable


def _pretrain_config(data: Path, work_dir: Path, **overrides) -> PretrainConfig:
    values = dict(dataset="imagenet", data_root=str(data), backbone="resnest14", stage_width=8,
                  stem_width=8, crop_size=32, crop_pct=1.0, batch_size=4, epochs=1,
                  warmup_epochs=0.5, workers=0, tensorboard=False, work_dir=str(work_dir),
                  device="cpu", auto_augment="none", mixup=0.0)
    return PretrainConfig(**{**values, **overrides})


def test_pretraining_stops_at_a_bad_image_with_one_line_or_skips_it_when_told(tmp_path, capsys):
    data = write_class_folder(tmp_path / "images")
    bad = data / "train" / "green" / "3.png"
    bad.write_bytes(b"\x89PNG not really")
    with pytest.raises(SegnestError, match=r"green/3\.png.*--skip-bad-samples") as error:
        run_pretrain(_pretrain_config(data, tmp_path / "stop", workers=1))
    assert "\n" not in str(error.value)  # also from a DataLoader worker
    result = run_pretrain(_pretrain_config(data, tmp_path / "skip", skip_bad_samples=True))
    assert result["skipped_samples"] == 1 and not result["interrupted"]
    captured = capsys.readouterr()
    assert captured.err.count("skipping a bad sample") == 1 and "green/3.png" in captured.err
    assert "1 unreadable sample(s) skipped" in captured.out
