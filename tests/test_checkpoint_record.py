"""One typed record reads and writes a checkpoint's fields: the release checkpoints read into
it and write back unchanged, older layouts read with their gaps filled, and what no field
names is kept."""

from pathlib import Path

import torch

from segnest.models.factory import checkpoint_task
from segnest.runtime.checkpoint import load_checkpoint
from segnest.runtime.record import CheckpointRecord

DATA = Path(__file__).parent / "data"


def same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(map(same, a, b))
    return a == b


def test_the_release_segmentation_checkpoint_reads_into_typed_fields_and_back():
    state = load_checkpoint(DATA / "release-0.1.0-segmentation.pt")
    record = CheckpointRecord.read(state)
    assert (record.task, record.model_name, record.dataset) == (
        "segmentation", "deeplabv3_resnest14", "folder")
    assert record.num_classes == 3 == len(record.classes) and record.in_channels == 3
    assert record.iteration == 2 and record.best_iteration == 2
    assert record.metric_unit == "percent" and record.extra == {"best_miou": state["best_miou"]}
    assert record.inference_sizes() == state["inference"]
    assert record.trained("batch_size") == state["config"]["batch_size"]
    assert record.weights is state["model"]
    assert same(record.state(), state)


def test_the_release_classification_checkpoint_round_trips():
    state = load_checkpoint(DATA / "release-0.1.0-classification.pt")
    record = CheckpointRecord.read(state)
    assert (record.task, record.model_name, record.num_classes) == ("classification",
                                                                     "resnest14", 3)
    assert record.extra == {"best_top1": state["best_top1"]} and record.dataset is None
    assert same(record.state(), state)


def test_an_older_layout_reads_with_current_names_and_its_training_sizes():
    """Before the task, the inference record and the stage_width name: what segnest wrote
    first (model_kwargs with base_width, sizes only in the training config)."""
    state = {"model_name": "deeplabv3_resnest14", "model": {},
             "model_kwargs": {"num_classes": 4, "base_width": 8, "in_chans": 5},
             "config": {"base_size": 64, "crop_size": 48, "data_root": "d"}, "best_miou": 0.5}
    record = CheckpointRecord.read(state)
    assert record.task is None and checkpoint_task(state) == "segmentation"
    assert record.model_kwargs == {"num_classes": 4, "stage_width": 8, "in_chans": 5}
    assert record.in_channels == 5 and record.num_classes == 4
    assert record.inference_sizes() == {"base_size": 64, "window_size": 48}
    assert record.trained("data_root") == "d" and record.trained("label_map") is None
    assert record.metric_unit is None and record.extra == {"best_miou": 0.5}


def test_fields_set_in_python_are_written_under_their_keys():
    record = CheckpointRecord(task="detection", model_name="mask_rcnn_resnest14",
                              weights={"w": torch.ones(1)}, category_ids=[1, 3],
                              extra={"best_box_ap": 1.0})
    state = record.state()
    assert state["model"]["w"].item() == 1.0 and state["category_ids"] == [1, 3]
    assert state["best_box_ap"] == 1.0 and "classes" not in state and "weights" not in state
    assert CheckpointRecord.read(state).category_ids == [1, 3]
