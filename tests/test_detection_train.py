"""Specs for ``segnest train --model <R-CNN>``: detection on the shared engine. Exact resume,
no overwrite, bad COCO data in one line, every parameter trained on a batch without
positives (so DDP needs no find_unused_parameters), the checkpoint usable by the detection
evaluation and predictor, TensorBoard's AP scalars, panels and HParams."""

import json
import os
import shutil
import signal
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

pytest.importorskip("pycocotools")

from segnest.cli import main  # noqa: E402
from segnest.data.mini import ensure_mini_detection  # noqa: E402
from segnest.errors import SegnestError  # noqa: E402
from segnest.inference.detection import DetectionPredictor  # noqa: E402
from segnest.inference.tensorboard import DETECTION_TAGS  # noqa: E402
from segnest.models import create_model  # noqa: E402
from segnest.models.detection.rcnn import ARCHITECTURES  # noqa: E402
from segnest.runtime.checkpoint import load_checkpoint  # noqa: E402
from segnest.tasks.detection import task as detection_task  # noqa: E402
from segnest.tasks.detection.config import DETECTION_MODELS, DetectionConfig  # noqa: E402
from segnest.tasks.detection.evaluate import run_detection_eval  # noqa: E402
from segnest.tasks.detection.task import run_detection  # noqa: E402

TINY = dict(model="mask_rcnn", dataset="mini", backbone="resnest14", stage_width=16,
            detector_width=16, roi_batch_size=32, train_min_size="64-80", test_min_size=64,
            max_size=96, iters=4, batch_size=2, lr=0.01, warmup_iters=1, val_interval=2,
            val_samples=3, checkpoint_interval=2, keep_checkpoints=10, panels=1,
            log_interval=1, workers=0, device="cpu")
TINY_FLAGS = [f"--{key.replace('_', '-')}={value}" for key, value in TINY.items()]


def tiny(work_dir: Path, **overrides) -> DetectionConfig:
    return DetectionConfig(**{**TINY, "work_dir": str(work_dir), **overrides})


def test_the_config_knows_every_detection_architecture():
    assert DETECTION_MODELS == tuple(ARCHITECTURES)


def test_resumed_run_ends_with_the_weights_of_an_uninterrupted_run(tmp_path):
    straight = run_detection(tiny(tmp_path / "straight", tensorboard=False))
    assert straight["iteration"] == 4 and not straight["interrupted"]
    resumed = run_detection(tiny(tmp_path / "resumed", tensorboard=False,
                                 resume=str(tmp_path / "straight" / "iter_2.pt")))
    assert resumed["iteration"] == 4
    expected = load_checkpoint(tmp_path / "straight" / "last.pt")
    actual = load_checkpoint(tmp_path / "resumed" / "last.pt")
    assert expected["model"].keys() == actual["model"].keys()
    for key, value in expected["model"].items():
        torch.testing.assert_close(actual["model"][key], value, atol=0, rtol=0, msg=key)
    assert actual["scheduler"] == expected["scheduler"]
    assert resumed["best_bbox_ap"] == straight["best_bbox_ap"]


def test_ctrl_c_saves_and_the_resumed_run_matches_an_uninterrupted_one(tmp_path, monkeypatch):
    straight = run_detection(tiny(tmp_path / "straight", tensorboard=False, iters=3,
                                  checkpoint_interval=0, val_interval=3))
    real_step = detection_task.train_one_step
    steps = []

    def ctrl_c_at_iteration_2(*args, **kwargs):
        scalars = real_step(*args, **kwargs)
        steps.append(1)
        if len(steps) == 2:
            os.kill(os.getpid(), signal.SIGINT)  # caught: the step ends, last.pt is saved
        return scalars

    monkeypatch.setattr(detection_task, "train_one_step", ctrl_c_at_iteration_2)
    settings = dict(tensorboard=False, iters=3, checkpoint_interval=0, val_interval=3)
    stopped = run_detection(tiny(tmp_path / "resumed", **settings))
    monkeypatch.setattr(detection_task, "train_one_step", real_step)
    assert stopped["interrupted"] and stopped["iteration"] == 2
    resumed = run_detection(tiny(tmp_path / "resumed", resume="auto", **settings))
    assert resumed["iteration"] == 3
    expected = load_checkpoint(Path(straight["work_dir"]) / "last.pt")["model"]
    actual = load_checkpoint(Path(resumed["work_dir"]) / "last.pt")["model"]
    for key, value in expected.items():
        torch.testing.assert_close(actual[key], value, atol=0, rtol=0, msg=key)


def test_a_new_run_in_a_folder_with_checkpoints_is_refused_and_keeps_them(tmp_path):
    run_detection(tiny(tmp_path / "run", tensorboard=False, iters=2))
    before = (tmp_path / "run" / "last.pt").read_bytes()
    with pytest.raises(SegnestError, match="--overwrite|--resume"):
        run_detection(tiny(tmp_path / "run", tensorboard=False, iters=2))
    assert (tmp_path / "run" / "last.pt").read_bytes() == before


def test_the_checkpoint_evaluates_and_predicts_through_the_detection_functions(tmp_path):
    result = run_detection(tiny(tmp_path / "run", tensorboard=False, iters=2, val_interval=2))
    best = tmp_path / "run" / "best.pt"
    checkpoint = load_checkpoint(best)
    assert checkpoint["task"] == "detection"
    assert checkpoint["best_bbox_ap"] == result["best_bbox_ap"]
    metrics = run_detection_eval(checkpoint, str(best), out=str(tmp_path / "eval"),
                                 save_pred=str(tmp_path / "results.json"), device="cpu",
                                 samples=3)
    # The evaluation of the same weights on the same images gives the run's own numbers.
    assert metrics["bbox_AP"] == pytest.approx(result["metrics"]["bbox_AP"], abs=1e-9)
    assert metrics["segm_AP"] == pytest.approx(result["metrics"]["segm_AP"], abs=1e-9)
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["bbox_AP"] == \
        metrics["bbox_AP"]
    predictor = DetectionPredictor.from_checkpoint(checkpoint, device="cpu", score_threshold=0.0)
    image = np.zeros((70, 90, 3), np.uint8)
    detections = predictor(image)
    assert (detections.height, detections.width) == (70, 90)
    assert predictor.classes == ["circle", "square", "triangle", "cross"]


def test_tensorboard_gets_loss_terms_ap_in_the_task_namespace_panels_and_hparams(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_detection(tiny(tmp_path / "run", iters=2, val_interval=2))
    events = EventAccumulator(str(tmp_path / "run" / "tb" / "train"),
                              size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"detection/loss", "detection/loss_mask", "detection/loss_classifier",
            "detection/lr", *DETECTION_TAGS, "detection/bbox_AP50"} <= scalars
    assert any(tag.startswith("detection_per_class/segm_AP/") for tag in scalars)
    panel = events.Images("detection_images/gt_pred/0")[0]
    assert panel.width == 2 * panel.height or panel.width > panel.height  # GT | prediction
    assert "_hparams_/session_start_info" in events.summary_metadata


def test_bad_coco_data_is_one_line_before_any_work(tmp_path, capsys):
    mini = ensure_mini_detection()
    data = json.loads((mini / "annotations" / "instances_train2017.json").read_text())
    data["images"][0]["file_name"] = "missing.png"
    bad = tmp_path / "train.json"
    bad.write_text(json.dumps(data))
    work = tmp_path / "run"
    code = main(["train", "--model", "faster_rcnn", "--train-ann", str(bad), "--train-images",
                 str(mini / "train2017"), "--val-ann",
                 str(mini / "annotations" / "instances_val2017.json"), "--val-images",
                 str(mini / "val2017"), "--work-dir", str(work), "--iters", "2",
                 "--warmup-iters", "1", "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert code != 0 and len(err.splitlines()) == 1
    assert "missing.png" in err and "Traceback" not in err
    assert not (work / "last.pt").exists()


@pytest.mark.parametrize("flags, message", [
    (["--model", "mask_rcnn", "--crop-size", "64"], "applies to segmentation"),
    (["--train-min-size", "640-800"], "applies to detection"),
    (["--model", "mask_rcnn", "--dataset", "ade20k"], "segmentation dataset"),
    (["--model", "mask_rcnn"], "--dataset coco needs --data-root"),
    (["--model", "mask_rcnn", "--train-ann", "a.json"], "needs all four"),
    (["--model", "mask_rcnn", "--dataset", "mini", "--train-min-size", "800-640"],
     "--train-min-size"),
    (["--model", "mask_rcnn", "--dataset", "mini", "--backbone", "resnet18"],
     "for detection"),
    (["--model", "yolo"], "--model"),
    # COCO is a detection dataset: segmentation's model refuses it, naming the models.
    (["--dataset", "coco"], "--dataset 'coco' is a detection dataset; give --model"),
])
def test_flags_the_model_does_not_read_or_cannot_use_are_one_line(flags, message, capsys):
    assert main(["train", *flags]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err


def test_the_model_decides_the_task_and_its_presets():
    from segnest.presets import DATASET_PRESETS
    from segnest.tasks.train import TrainFlags, resolve_train_config

    detection = resolve_train_config(TrainFlags, {"model": "mask_rcnn", "dataset": "mini"})
    assert (detection.iters, detection.detector_width) == (800, 32)
    # Each task's own settings: detection has no segmentation field at all.
    assert isinstance(detection, DetectionConfig) and not hasattr(detection, "crop_size")
    coco = resolve_train_config(TrainFlags, {"model": "faster_rcnn", "data_root": "/coco"})
    assert (coco.dataset, coco.iters, coco.warmup_iters) == ("coco", 90000, 1000)
    segmentation = resolve_train_config(TrainFlags, {"dataset": "mini"}, DATASET_PRESETS)
    assert segmentation.model == "deeplabv3" and segmentation.crop_size == 96
    assert not hasattr(segmentation, "detector_width")


def test_training_sizes_parse_as_a_range_a_list_or_one_size():
    kwargs = detection_task.detection_model_kwargs(tiny(Path("x"), train_min_size="64-80"), 4)
    assert (kwargs["train_min_size"], kwargs["train_size_sampling"]) == ([64, 80], "range")
    kwargs = detection_task.detection_model_kwargs(tiny(Path("x"), train_min_size="64,72"), 4)
    assert (kwargs["train_min_size"], kwargs["train_size_sampling"]) == ([64, 72], "choice")
    kwargs = detection_task.detection_model_kwargs(tiny(Path("x"), train_min_size="64"), 4)
    assert (kwargs["train_min_size"], kwargs["train_size_sampling"]) == ([64], "choice")


def test_norm_layers_get_no_weight_decay_and_biases_do():
    model = create_model("faster_rcnn_resnest14", num_classes=2, stage_width=16,
                         fpn_channels=16, head_channels=16, box_fc_channels=32)
    groups = detection_task.detection_param_groups(model, 0.01, 1e-4)
    decay = {id(p) for g in groups if g["weight_decay"] for p in g["params"]}
    norm = dict(model.named_modules())["roi_heads.box_head.0.1"]
    assert id(norm.weight) not in decay
    assert id(model.roi_heads.box_predictor.cls_score.bias) in decay
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sorted(id(p) for g in groups for p in g["params"]) == sorted(map(id, trainable))


def _targets_without_objects(model_name: str) -> tuple[list, list]:
    images = [torch.rand(3, 64, 72), torch.rand(3, 70, 64)]
    targets = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
                "masks": torch.zeros(0, image.shape[1], image.shape[2], dtype=torch.uint8)}
               for image in images]
    return images, targets


@pytest.mark.parametrize("architecture", list(ARCHITECTURES))
def test_every_trainable_parameter_gets_a_gradient_from_a_batch_without_positives(architecture):
    """Why DDP runs without find_unused_parameters: a rank whose images hold no object
    (no positive proposal, no mask to learn) still sends a gradient for every parameter."""
    torch.manual_seed(0)
    model = create_model(f"{architecture}_resnest14", num_classes=3, stage_width=16,
                         fpn_channels=16, head_channels=16, box_fc_channels=32,
                         roi_batch_size_per_image=32, train_min_size=(64,),
                         train_size_sampling="choice", test_min_size=64,
                         max_size=96).train()
    losses = model(*_targets_without_objects(architecture))
    sum(losses.values()).backward()
    missing = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _ddp_worker(rank: int, port: int, result_dir: str) -> None:
    from segnest.runtime.distributed import (
        cleanup_distributed,
        convert_sync_batchnorm,
        init_distributed,
    )

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    init_distributed("cpu")
    try:
        torch.manual_seed(0)
        model = create_model("cascade_mask_rcnn_resnest14", num_classes=3, stage_width=16,
                             fpn_channels=16, head_channels=16, box_fc_channels=32,
                             roi_batch_size_per_image=32, train_min_size=(64,),
                             train_size_sampling="choice",
                             test_min_size=64, max_size=96)
        model = convert_sync_batchnorm(model, "cpu")
        ddp = torch.nn.parallel.DistributedDataParallel(model)  # no find_unused_parameters
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
        torch.manual_seed(rank)
        for _ in range(2):  # DDP fails (or hangs) on the step after a missing gradient
            images, targets = _targets_without_objects("cascade_mask_rcnn")
            if rank == 0:  # rank 0 has objects, rank 1 none
                targets[0].update(boxes=torch.tensor([[8.0, 8.0, 40.0, 40.0]]),
                                  labels=torch.tensor([1]),
                                  masks=torch.ones(1, 64, 72, dtype=torch.uint8))
            loss = sum(ddp(images, targets).values())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
        torch.save(weights, os.path.join(result_dir, f"rank{rank}.pt"))
    finally:
        cleanup_distributed()


@pytest.mark.slow
def test_two_gloo_ranks_train_when_one_has_no_objects(tmp_path):
    context = mp.start_processes(_ddp_worker, args=(_free_port(), str(tmp_path)), nprocs=2,
                                 join=False, start_method="spawn")
    deadline = 240
    import time
    started = time.monotonic()
    while not context.join(timeout=5):
        if time.monotonic() - started > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("the ranks did not finish: a collective is waiting (a hang)")
    weights = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    for key, value in weights[0].items():  # the ranks stayed in step
        torch.testing.assert_close(weights[1][key], value, msg=key)


@pytest.mark.slow
def test_own_coco_data_trains_from_the_four_flags(tmp_path):
    mini = ensure_mini_detection()
    images = tmp_path / "pictures"
    shutil.copytree(mini / "val2017", images)
    ann = mini / "annotations" / "instances_val2017.json"
    result = run_detection(tiny(tmp_path / "run", dataset="coco", train_ann=str(ann),
                                train_images=str(images), val_ann=str(ann),
                                val_images=str(images), iters=2, tensorboard=False))
    assert result["iteration"] == 2
    assert load_checkpoint(tmp_path / "run" / "last.pt")["val_images"] == str(images)


def test_precision_comes_from_the_engine_bf16_trains_and_fp16_on_a_cpu_is_refused(
        tmp_path, monkeypatch):
    from segnest.runtime import precision

    monkeypatch.setattr(precision, "cpu_native_bf16", lambda: True)  # not this CPU's answer
    result = run_detection(tiny(tmp_path / "bf16", tensorboard=False, iters=2,
                                precision="bf16"))
    state = load_checkpoint(tmp_path / "bf16" / "last.pt")
    assert state["precision"] == "bf16" and result["iteration"] == 2
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    with pytest.raises(SegnestError, match="fp16 needs a CUDA GPU"):
        run_detection(tiny(tmp_path / "fp16", tensorboard=False, precision="fp16"))
    assert not (tmp_path / "fp16").exists()


def test_a_recipe_key_the_models_task_does_not_read_is_named_with_its_recipe(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: mask_rcnn\ndataset: mini\ncrop_size: 64\n")
    assert main(["train", "--config", str(recipe)]) != 0
    err = capsys.readouterr().err.strip()
    assert err == (f"segnest: error: crop_size: 64 in recipe {recipe} applies to segmentation "
                   "(--model deeplabv3) only, not to --model mask_rcnn; drop it")


@pytest.mark.parametrize("text", ["model: [mask_rcnn]\n", "model: mask_rcnn\ndataset: [mini]\n"])
def test_a_recipe_value_of_the_wrong_type_for_model_or_dataset_is_one_line(tmp_path, capsys,
                                                                          text):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text)
    assert main(["train", "--config", str(recipe)]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err and "segnest: error:" in err
