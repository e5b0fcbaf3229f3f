"""Specs for what TensorBoard shows: named runs, one tag scheme for training validation and
eval, the settings as text and HParams, a confusion matrix, and flags' defaults in --help."""

import subprocess
import sys
from pathlib import Path

import numpy as np
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2
from torch.utils.tensorboard import SummaryWriter

from segnest.inference.config import EvalConfig
from segnest.inference.confusion import confusion_image, row_normalised
from segnest.inference.evaluate import run_eval
from segnest.inference.tensorboard import log_segmentation_results
from segnest.runtime.checkpoint import load_checkpoint
from segnest.tasks.segmentation.task import run_train

HEADLINE = {"headline/segmentation_mIoU", "headline/segmentation_pixAcc",
            "headline/segmentation_mAcc"}


def _events(folder: Path) -> EventAccumulator:
    return EventAccumulator(str(folder), size_guidance={
        "images": 0, "scalars": 0, "tensors": 0}).Reload()


def _hparams(events: EventAccumulator) -> tuple[dict, list[str]]:
    content = events.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(
        content["_hparams_/session_start_info"]).session_start_info
    experiment = plugin_data_pb2.HParamsPluginData.FromString(
        content["_hparams_/experiment"]).experiment
    values = {key: value.string_value or value.number_value
              for key, value in start.hparams.items()}
    return values, [info.name.tag for info in experiment.metric_infos]


def test_training_run_is_named_and_logs_the_shared_tag_scheme(folder_dataset, tmp_path,
                                                              tiny_train_config):
    work = tmp_path / "run"
    run_train(tiny_train_config(folder_dataset, work, iters=3))
    assert not list(work.glob("events.out.tfevents.*"))
    events = _events(work / "tb" / "train")
    scalars = set(events.Tags()["scalars"])
    assert {"segmentation/loss", "segmentation/lr"} | HEADLINE <= scalars
    assert {f"segmentation_per_class/IoU/{name}" for name in ("left", "right", "square")
            } <= scalars
    # TensorBoard sorts groups by name: the headline first, the per-class charts last
    groups = sorted({tag.split("/")[0] for tag in scalars})
    assert groups[0] == "headline" and groups[-1] == "segmentation_per_class"

    (matrix_image,) = events.Images("segmentation_images/confusion_matrix")
    confusion = load_checkpoint(work / "last.pt")["metrics"]["confusion"]
    expected = confusion_image(confusion, ["left", "right", "square"])
    assert (matrix_image.step, matrix_image.height, matrix_image.width) == (
        3, *expected.shape[:2])
    assert len([t for t in events.Tags()["images"] if "image_gt_pred" in t]) == 2

    (config,) = events.Tensors("config/text_summary")
    assert b"backbone: resnest14" in config.tensor_proto.string_val[0]
    hparams, metrics = _hparams(events)
    assert hparams["backbone"] == "resnest14" and hparams["iters"] == 3
    assert set(metrics) == HEADLINE
    assert "_hparams_/session_end_info" in events.PluginTagToContent("hparams")


def test_each_eval_is_its_own_named_run_beside_training_and_replaced_on_rerun(
        folder_dataset, tmp_path, tiny_train_config):
    work = tmp_path / "run"
    run_train(tiny_train_config(folder_dataset, work, iters=3))
    train_events = sorted((work / "tb" / "train").iterdir())
    for _ in range(2):
        run_eval(EvalConfig(checkpoint=str(work / "best.pt"), device="cpu", workers=0))
    run_eval(EvalConfig(checkpoint=str(work / "best.pt"), device="cpu", workers=0, flip=True))
    assert sorted(p.name for p in (work / "tb").iterdir()) == ["eval_val", "eval_val_flip",
                                                               "train"]
    assert sorted((work / "tb" / "train").iterdir()) == train_events
    assert len(list((work / "tb" / "eval_val").iterdir())) == 1
    events = _events(work / "tb" / "eval_val")
    scalars = set(events.Tags()["scalars"])
    assert HEADLINE <= scalars and "segmentation_per_class/IoU/left" in scalars
    assert not any(tag.startswith("segmentation/") for tag in scalars)  # no training scalars
    # the checkpoint's iteration
    assert [e.step for e in events.Scalars("headline/segmentation_mIoU")] == [3]
    assert "segmentation_images/confusion_matrix" in events.Tags()["images"]
    # the numbers as a table and as an image card in the headline group
    (table,) = events.Tensors("segmentation/results/text_summary")
    mIoU = events.Scalars("headline/segmentation_mIoU")[0].value
    assert f"{mIoU:.2f}" in table.tensor_proto.string_val[0].decode()
    assert "headline/segmentation_results" in events.Tags()["images"]
    assert events.Tensors("config/text_summary")
    hparams, metrics = _hparams(events)
    assert hparams["inference"] == "1 scale" and set(metrics) == HEADLINE
    # TensorBoard takes the HParams columns from one run: every run declares the same ones,
    # the evals with the training settings of their checkpoint.
    train_hparams, _ = _hparams(_events(work / "tb" / "train"))
    assert set(train_hparams) == set(hparams)
    assert hparams["backbone"] == train_hparams["backbone"] == "resnest14"
    assert train_hparams["inference"] == "1 scale"  # training validates single-scale
    assert _hparams(_events(work / "tb" / "eval_val_flip"))[0]["inference"] == "1 scale+flip"
    assert train_hparams["lr"] == hparams["lr"] > 0  # the number the run used, not "default"


def test_hparams_rows_are_named_apart_and_show_the_columns_that_matter(
        folder_dataset, tmp_path, tiny_train_config):
    work = tmp_path / "run"
    run_train(tiny_train_config(folder_dataset, work, iters=2))
    run_eval(EvalConfig(checkpoint=str(work / "best.pt"), device="cpu", workers=0, flip=True))
    names, columns = [], []
    for run in ("train", "eval_val_flip"):
        content = _events(work / "tb" / run).PluginTagToContent("hparams")
        data = plugin_data_pb2.HParamsPluginData
        names.append(data.FromString(content["_hparams_/session_start_info"])
                     .session_start_info.group_name)
        columns.append([info.name for info in data.FromString(
            content["_hparams_/experiment"]).experiment.hparam_infos])
    # TensorBoard shows the start of a name: the time, then what the run is
    assert names[0][8:].startswith(" train run ") and names[1][8:].startswith(" eval val flip run ")
    assert names[0] != names[1]
    assert columns[0] == columns[1]
    # TensorBoard sorts the columns by name and shows the first five: those that matter
    assert sorted(columns[0])[:5] == ["backbone", "crop", "inference", "iters", "lr"]
    assert "amp" not in columns[0] and len(columns[0]) == 6


def test_eval_with_out_keeps_its_run_in_the_out_folder(folder_dataset, tmp_path,
                                                       tiny_train_config):
    work = tmp_path / "run"
    run_train(tiny_train_config(folder_dataset, work, iters=3))
    out = tmp_path / "elsewhere"
    run_eval(EvalConfig(checkpoint=str(work / "last.pt"), device="cpu", workers=0,
                        out=str(out)))
    assert list((out / "tb" / "eval_val").glob("events.out.tfevents.*"))
    assert sorted(p.name for p in (work / "tb").iterdir()) == ["train"]


def test_many_classes_log_the_most_confused_pairs_as_text(tmp_path):
    names = [f"c{i}" for i in range(41)]
    confusion = np.eye(41, dtype=np.int64) * 10
    confusion[3, 7] = 30  # 75% of c3's pixels predicted as c7
    results = {"mIoU": 50.0, "pixAcc": 60.0, "mAcc": 55.0, "IoU": [50.0] * 41,
               "gt_pixels": [1] * 41, "pred_pixels": [1] * 41, "confusion": confusion.tolist()}
    with SummaryWriter(str(tmp_path)) as writer:
        log_segmentation_results(writer, results, names, np.zeros((41, 3), np.uint8), [], 5)
    events = _events(tmp_path)
    assert "segmentation_images/confusion_matrix" not in events.Tags()["images"]
    (text,) = events.Tensors("segmentation/most_confused/text_summary")
    first_row = text.tensor_proto.string_val[0].decode().splitlines()[2]
    assert first_row == "| c3 | c7 | 75.0% | 30 |"


def test_confusion_rows_are_shares_of_the_ground_truth():
    shares = row_normalised([[3, 1], [0, 0]])
    assert shares[0].tolist() == [0.75, 0.25] and np.isnan(shares[1]).all()
    image = confusion_image([[3, 1], [0, 0]], ["a", "b"])
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3


def test_help_shows_each_flags_default():
    text = subprocess.run([sys.executable, "-m", "segnest", "train", "--help"],
                          capture_output=True, text=True, check=True).stdout
    flat = " ".join(text.split())
    assert "SGD momentum [>= 0 and < 1] (default: 0.9)" in flat
    assert "--aux, --no-aux auxiliary FCN head on layer3 (default: on)" in flat
    # --batch-size, and the presets that change it
    assert "(default: 2; mini: 8; folder without a GPU: 8; mini detection: 4)" in flat
    # --crop-size: no built-in value, each preset's number
    assert "(default: ade20k: 480; cityscapes: 768; folder: 480; mini: 96)" in flat
    # sections instead of one flat list
    for section in ("model:", "data:", "optimisation:", "checkpoints:", "logging:",
                    "hardware:"):
        assert f"\n{section}\n" in text
