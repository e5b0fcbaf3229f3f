"""A classification checkpoint (segnest pretrain) evaluates on an image folder and predicts
photos: segnest eval (top-1/top-5, per-class accuracy), segnest predict (top-5 per photo as
JSON) and segnest.load_model, all with the same preprocessing and the checkpoint's class
names; flags of another task, unknown classes and other folder layouts are one line."""

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CLASSIFICATION_CLASSES, write_class_folder
from PIL import Image

import segnest
from segnest import cli
from segnest.errors import EXIT_ERROR, SegnestError
from segnest.inference.classification import ClassifierPredictor
from segnest.inference.config import EvalConfig, PredictConfig
from segnest.models import create_model
from segnest.tasks import dispatch
from segnest.tasks.dispatch import run_eval, run_predict

RELEASE = Path(__file__).parent / "data" / "release-0.1.0-classification.pt"
TINY = dict(num_classes=3, stage_width=16, stem_width=16)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return write_class_folder(tmp_path_factory.mktemp("classes"), {"val": 5})


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, images) -> Path:
    """An untrained tiny classifier whose head is sharpened so that it predicts several
    classes, as segnest pretrain records it."""
    torch.manual_seed(2)  # a seed whose model gets some images of some classes right
    model = create_model("resnest14", **TINY)
    with torch.no_grad():
        model.fc.weight.mul_(50)
    path = tmp_path_factory.mktemp("run") / "best.pt"
    torch.save({"model": model.state_dict(), "model_name": "resnest14", "model_kwargs": TINY,
                "task": "classification", "classes": list(CLASSIFICATION_CLASSES),
                "iteration": 3, "config": {"dataset": "imagenet", "data_root": str(images),
                                           "crop_size": 32, "crop_pct": 0.875}}, path)
    return path


def expected_counts(predictor: ClassifierPredictor, folder: Path) -> dict[str, list[bool]]:
    """Per class folder, whether each image's most probable class is that folder's."""
    return {name: [predictor.predict(file).names[0] == name
                   for file in sorted((folder / name).glob("*.png"))]
            for name in sorted(p.name for p in folder.iterdir())}


def test_eval_gives_top1_and_per_class_accuracy_of_the_predictor(checkpoint, images, tmp_path,
                                                                 capsys):
    out = tmp_path / "metrics"
    metrics = run_eval(EvalConfig(checkpoint=str(checkpoint), out=str(out), device="cpu",
                                  workers=0, batch_size=4))
    hits = expected_counts(segnest.load_model(checkpoint, device="cpu"), images / "val")
    every = [hit for per_class in hits.values() for hit in per_class]
    assert 0 < sum(every) < len(every)  # the model is neither always right nor always wrong
    assert metrics["top1"] == pytest.approx(100 * sum(every) / len(every))
    assert metrics["top5"] == 100.0  # 3 classes: top-3 holds every label
    written = json.loads((out / "metrics.json").read_text())
    assert written["top1"] == pytest.approx(metrics["top1"]) and written["images"] == 15
    for row in written["per_class"]:
        assert row["top1"] == pytest.approx(100 * np.mean(hits[row["class"]]))
    assert written["mean_class_top1"] == pytest.approx(
        np.mean([100 * np.mean(h) for h in hits.values()]))
    printed = capsys.readouterr().out
    assert "| blue" in printed and "top-1" in printed and str(out / "metrics.json") in printed
    assert (out / "metrics.md").read_text().startswith("| class")


def test_eval_takes_the_class_folders_themselves_and_any_subset_of_classes(
        checkpoint, images, tmp_path):
    whole = run_eval(EvalConfig(checkpoint=str(checkpoint), data_root=str(images / "val"),
                                out=str(tmp_path / "a"), device="cpu", workers=0))
    subset = tmp_path / "subset"
    shutil.copytree(images / "val" / "red", subset / "red")
    shutil.copytree(images / "val" / "blue", subset / "blue")
    metrics = run_eval(EvalConfig(checkpoint=str(checkpoint), data_root=str(subset),
                                  out=str(tmp_path / "b"), device="cpu", workers=0))
    rows = {row["class"]: row for row in whole["per_class"]}
    assert [row["class"] for row in metrics["per_class"]] == ["blue", "red"]
    for row in metrics["per_class"]:  # matched by name: red stays the model's class 2
        assert row["top1"] == pytest.approx(rows[row["class"]]["top1"])


@pytest.mark.parametrize("layout, says", [
    ("unknown", r"1 class folder\(s\) that .* was not trained on \(purple\)"),
    ("loose", "holds images but no class sub-folders"),
    ("missing", "image folder .* not found"),
])
def test_a_folder_of_another_layout_or_classes_is_one_line(checkpoint, images, tmp_path,
                                                           layout, says):
    folder = tmp_path / "data"
    if layout == "unknown":
        shutil.copytree(images / "val", folder)
        shutil.copytree(images / "val" / "red", folder / "purple")
    elif layout == "loose":
        folder.mkdir()
        shutil.copy(images / "val" / "red" / "0.png", folder / "0.png")
    with pytest.raises(SegnestError, match=says) as error:
        run_eval(EvalConfig(checkpoint=str(checkpoint), data_root=str(folder), device="cpu",
                            out=str(tmp_path / "out"), workers=0))
    assert "\n" not in str(error.value)
    assert not (tmp_path / "out" / "metrics.json").exists()


@pytest.mark.parametrize("command, flags, flag", [
    ("eval", {"multi_scale": True}, "--multi-scale"),
    ("eval", {"dataset": "ade20k"}, "--dataset"),
    ("predict", {"overlay": True}, "--overlay"),
    ("predict", {"scales": (0.5, 1.0)}, "--scales"),
])
def test_a_segmentation_flag_given_with_a_classification_checkpoint_is_one_line(
        checkpoint, images, tmp_path, command, flags, flag, monkeypatch):
    def no_work(*args, **kwargs):
        raise AssertionError("the flag must be refused before any work")

    monkeypatch.setattr(dispatch, "TASK_COMMANDS", {
        task: dataclasses.replace(commands, evaluate=no_work, predict=no_work)
        for task, commands in dispatch.TASK_COMMANDS.items()})
    if command == "eval":
        cfg = EvalConfig(checkpoint=str(checkpoint), **flags)
        call = run_eval
    else:
        cfg = PredictConfig(inputs=[str(images / "val")], checkpoint=str(checkpoint),
                            out=str(tmp_path / "out"), **flags)
        call = run_predict
    with pytest.raises(SegnestError, match=f"^{flag} does not apply to .*a classification "
                       f"checkpoint .*drop {flag}$") as error:
        call(cfg)
    assert "\n" not in str(error.value)


def test_eval_refuses_a_metrics_folder_inside_the_image_folder(checkpoint, images):
    with pytest.raises(SegnestError, match="--out .* lies inside the image folder"):
        run_eval(EvalConfig(checkpoint=str(checkpoint), out=str(images / "val" / "metrics"),
                            device="cpu", workers=0))
    assert not (images / "val" / "metrics").exists()


def test_predict_writes_the_top_classes_of_each_photo_with_the_checkpoint_names(
        checkpoint, images, tmp_path, capsys):
    photo = tmp_path / "photo.jpg"
    Image.open(images / "val" / "green" / "1.png").save(photo)
    written = run_predict(PredictConfig(inputs=[str(photo), str(images / "val" / "red")],
                                        checkpoint=str(checkpoint), out=str(tmp_path / "out"),
                                        device="cpu"))
    assert [p.relative_to(tmp_path / "out").as_posix() for p in written] == [
        "photo.json", *(f"{i}.json" for i in range(5))]
    predictor = segnest.load_model(checkpoint, device="cpu")
    result = json.loads(written[0].read_text())
    expected = predictor.predict(photo)
    assert [entry["class"] for entry in result["top"]] == expected.names
    assert {entry["class"] for entry in result["top"]} == set(CLASSIFICATION_CLASSES)
    assert sum(entry["score"] for entry in result["top"]) == pytest.approx(1.0, abs=1e-4)
    assert f"{photo}: {expected}" in capsys.readouterr().out


def test_predict_refuses_to_write_over_an_input(checkpoint, images, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    photo = folder / "a.png"
    shutil.copy(images / "val" / "red" / "0.png", photo)
    (folder / "b.json").write_text("{}")
    with pytest.raises(SegnestError, match="is the input folder"):
        run_predict(PredictConfig(inputs=[str(folder)], checkpoint=str(checkpoint),
                                  out=str(folder), device="cpu"))


def test_load_model_of_a_classification_checkpoint_is_a_classifier(checkpoint, images):
    predictor = segnest.load_model(checkpoint, device="cpu", top_k=2)
    assert isinstance(predictor, ClassifierPredictor)
    assert repr(predictor).startswith("ClassifierPredictor(resnest14 classifier, 3 classes: "
                                      "blue, green, red; top-2 of a 32 px centre crop")
    image = images / "val" / "blue" / "0.png"
    top = predictor.predict(image)
    assert len(top.names) == 2 and top.scores[0] >= top.scores[1]
    assert predictor(np.asarray(Image.open(image))) == top  # an array gives the same
    assert [t.names for t in predictor([image, image])] == [top.names, top.names]
    for call, says in ((lambda: segnest.load_model(checkpoint, flip=True), "no setting 'flip'"),
                       (lambda: segnest.load_model(checkpoint, top_k=0), "top_k"),
                       (lambda: predictor(np.zeros((8, 8), np.uint8)), "H x W x 3 uint8")):
        with pytest.raises(SegnestError, match=says) as error:
            call()
        assert "\n" not in str(error.value)


def test_the_command_line_evaluates_and_predicts_a_classification_checkpoint(
        checkpoint, images, tmp_path, capsys):
    assert cli.main(["eval", "--checkpoint", str(checkpoint), "--data-root", str(images),
                     "--out", str(tmp_path / "m"), "--device", "cpu", "--workers", "0"]) == 0
    assert (tmp_path / "m" / "metrics.json").is_file()
    assert cli.main(["predict", str(images / "val" / "red" / "0.png"), "--checkpoint",
                     str(checkpoint), "--out", str(tmp_path / "p"), "--device", "cpu"]) == 0
    assert (tmp_path / "p" / "0.json").is_file()
    assert cli.main(["eval", "--checkpoint", str(checkpoint), "--flip"]) == EXIT_ERROR
    assert "--flip does not apply" in capsys.readouterr().err


def test_a_release_classification_checkpoint_evaluates_to_its_recorded_top1_and_predicts(
        tmp_path):
    data = write_class_folder(tmp_path / "images")  # the folder it was trained on
    recorded = torch.load(RELEASE, weights_only=True)["metrics"]
    metrics = run_eval(EvalConfig(checkpoint=str(RELEASE), data_root=str(data), device="cpu",
                                  out=str(tmp_path / "eval"), workers=0))
    assert metrics["top1"] == pytest.approx(recorded["top1"], abs=1e-4)
    assert metrics["top5"] == pytest.approx(recorded["top5"], abs=1e-4)
    written = run_predict(PredictConfig(inputs=[str(data / "val" / "red")],
                                        checkpoint=str(RELEASE), out=str(tmp_path / "p"),
                                        device="cpu"))
    top = json.loads(written[0].read_text())["top"]
    assert {entry["class"] for entry in top} == {"blue", "green", "red"}


def test_folding_batch_norms_leaves_the_probabilities_unchanged(checkpoint, images):
    image = images / "val" / "green" / "2.png"
    fused = segnest.load_model(checkpoint, device="cpu")
    plain = segnest.load_model(checkpoint, device="cpu", fuse_bn=False)
    batch = fused.transform(fused.read(image)).unsqueeze(0)
    torch.testing.assert_close(fused.probabilities(batch), plain.probabilities(batch),
                               atol=1e-4, rtol=0)
    assert fused.predict(image).names == plain.predict(image).names


def test_a_checkpoint_pretrained_on_the_mini_set_evaluates_on_it_without_a_data_root(tmp_path):
    from segnest.data.mini import MINI_CLASSES

    torch.manual_seed(0)
    kwargs = dict(TINY, num_classes=len(MINI_CLASSES))
    path = tmp_path / "run" / "best.pt"
    path.parent.mkdir()
    torch.save({"model": create_model("resnest14", **kwargs).state_dict(),
                "model_name": "resnest14", "model_kwargs": kwargs, "task": "classification",
                "classes": sorted(MINI_CLASSES),
                "config": {"dataset": "mini", "crop_size": 64, "crop_pct": 1.0}}, path)
    metrics = run_eval(EvalConfig(checkpoint=str(path), device="cpu", workers=0, samples=16,
                                  batch_size=8))
    written = json.loads((tmp_path / "run" / "eval_val" / "metrics.json").read_text())
    assert written["images"] == 16 and written["top1"] == pytest.approx(metrics["top1"])
    assert written["data_root"].endswith("val")


def _eval_worker(rank: int, port: int, checkpoint: str, data: str, out: str) -> None:
    import os

    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        metrics = run_eval(EvalConfig(checkpoint=checkpoint, data_root=data, device="cpu",
                                      out=out, workers=0, batch_size=2, skip_bad_samples=True))
        Path(out, f"rank{rank}.json").write_text(json.dumps(metrics))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_two_processes_evaluate_every_image_once_to_the_single_process_numbers(
        checkpoint, images, tmp_path):
    import socket

    import torch.multiprocessing as mp

    data = Path(shutil.copytree(images, tmp_path / "data"))
    (data / "val" / "green" / "4.png").write_bytes(b"\x89PNG not really")
    alone = run_eval(EvalConfig(checkpoint=str(checkpoint), data_root=str(data), device="cpu",
                                out=str(tmp_path / "alone"), workers=0, skip_bad_samples=True))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    out = tmp_path / "two"
    out.mkdir()
    mp.spawn(_eval_worker, args=(port, str(checkpoint), str(data), str(out)), nprocs=2,
             join=True)
    for rank in range(2):
        metrics = json.loads((out / f"rank{rank}.json").read_text())
        assert metrics["top1"] == pytest.approx(alone["top1"])
        assert [(row["class"], row["images"]) for row in metrics["per_class"]] == [
            (row["class"], row["images"]) for row in alone["per_class"]]
        assert [row["top1"] for row in metrics["per_class"]] == pytest.approx(
            [row["top1"] for row in alone["per_class"]])
    written = json.loads((out / "metrics.json").read_text())
    assert written["images"] == 14 and written["skipped_samples"] == 1  # summed over ranks
