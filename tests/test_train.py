"""Specs for segnest train: exact resume, DDP + SyncBN equivalence, TensorBoard, bad config."""

import os
import socket

import pytest
import torch
from torch import nn

from segnest.errors import SegnestError
from segnest.models import create_model
from segnest.runtime.checkpoint import load_checkpoint
from segnest.tasks.segmentation.losses import segmentation_loss
from segnest.tasks.segmentation.task import run_train


def test_resumed_run_ends_with_the_weights_of_an_uninterrupted_run(
        folder_dataset, tmp_path, tiny_train_config):
    full = tiny_train_config(folder_dataset, tmp_path / "full")
    run_train(full)
    # iter_3.pt was written mid-epoch (8 images, batch 2 -> 4 iterations per epoch).
    resumed = tiny_train_config(folder_dataset, tmp_path / "resumed",
                          resume=str(tmp_path / "full" / "iter_3.pt"))
    result = run_train(resumed)
    assert result["iteration"] == 6
    a = load_checkpoint(tmp_path / "full" / "last.pt")["model"]
    b = load_checkpoint(tmp_path / "resumed" / "last.pt")["model"]
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=0, rtol=0, msg=key)


def test_resume_auto_continues_from_the_newest_checkpoint(
        folder_dataset, tmp_path, tiny_train_config):
    run_train(tiny_train_config(folder_dataset, tmp_path / "run", iters=3))
    result = run_train(tiny_train_config(folder_dataset, tmp_path / "run", iters=3, resume="auto"))
    assert result["iteration"] == 3  # already finished: nothing more to do


def test_tensorboard_holds_scalars_and_mask_panels(folder_dataset, tmp_path, tiny_train_config):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_train(tiny_train_config(folder_dataset, tmp_path / "tb", iters=3))
    events = EventAccumulator(str(tmp_path / "tb" / "tb" / "train"),
                              size_guidance={"images": 0}).Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"segmentation/loss", "segmentation/aux_loss", "segmentation/lr",
            "segmentation/images_per_s", "headline/segmentation_mIoU",
            "headline/segmentation_pixAcc", "headline/segmentation_mAcc"} <= scalars
    assert any(tag.startswith("segmentation_per_class/IoU/") for tag in scalars)
    images = events.Tags()["images"]
    assert len([t for t in images if t.startswith("segmentation_images/image_gt_pred/")]) == 2
    lrs = [e.value for e in events.Scalars("segmentation/lr")]
    assert lrs == sorted(lrs, reverse=True) and lrs[-1] < lrs[0]


def test_checkpoint_carries_the_model_settings(folder_dataset, tmp_path, tiny_train_config):
    run_train(tiny_train_config(folder_dataset, tmp_path / "ck", iters=3))
    state = load_checkpoint(tmp_path / "ck" / "best.pt")
    assert state["model_name"] == "deeplabv3_resnest14"
    assert state["model_kwargs"]["num_classes"] == 3
    assert state["classes"] == ["left", "right", "square"]
    model = create_model(state["model_name"], **state["model_kwargs"])
    model.load_state_dict(state["model"])


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(batch_size=1), "needs at least 2"),
        (dict(crop_size=200), "larger than any scaled image"),
        (dict(amp=True), "--amp needs a CUDA"),
        (dict(output_stride=4), "--output-stride"),
        (dict(backbone="resnest51"), "unknown --backbone"),
        (dict(dataset="voc"), "--dataset .voc. is not one of"),
        # COCO is a detection dataset (segnest train names the models: test_detection_train).
        (dict(dataset="coco"), "--dataset .coco. is not one of"),
    ],
)
def test_bad_configuration_fails_before_work_starts(folder_dataset, tmp_path, overrides,
                                                    message, tiny_train_config):
    with pytest.raises(SegnestError, match=message):
        run_train(tiny_train_config(folder_dataset, tmp_path / "bad", **overrides))
    assert not (tmp_path / "bad" / "last.pt").exists()


def test_resume_with_another_model_is_refused(folder_dataset, tmp_path, tiny_train_config):
    run_train(tiny_train_config(folder_dataset, tmp_path / "a", iters=3))
    other = tiny_train_config(folder_dataset, tmp_path / "b", head_channels=8,
                              resume=str(tmp_path / "a" / "last.pt"))
    with pytest.raises(SegnestError, match="was trained as"):
        run_train(other)


def test_training_without_the_aux_head_trains_and_evaluates(folder_dataset, tmp_path,
                                                             tiny_train_config):
    result = run_train(tiny_train_config(folder_dataset, tmp_path / "noaux", aux=False))
    assert result["iteration"] == 6 and not result["interrupted"]
    saved = load_checkpoint(tmp_path / "noaux" / "last.pt")
    assert saved["model_kwargs"]["aux"] is False
    assert not any(key.startswith("aux_head.") for key in saved["model"])
    assert 0.0 <= result["metrics"]["mIoU"] <= 100.0


def test_cli_no_aux_flag_trains(folder_dataset, tmp_path, tiny_flags):
    from segnest.cli import main

    code = main(["train", "--dataset", "folder", "--data-root", str(folder_dataset), "--iters",
                 "2", "--no-aux", "--no-tensorboard", "--work-dir", str(tmp_path / "w"),
                 *tiny_flags])
    assert code == 0
    assert "aux_head.0.0.weight" not in load_checkpoint(tmp_path / "w" / "last.pt")["model"]


def test_resume_with_another_length_and_lr_rebuilds_the_schedule(folder_dataset, tmp_path,
                                                                 tiny_train_config, capsys):
    """--iters 6 --lr 0.5 after a 3-iteration run: iterations 4-6 follow a 6-iteration poly
    schedule from 0.5 (not the finished 3-iteration one at lr 0), with the stored momentum
    buffers and the command line's optimizer settings."""
    run_train(tiny_train_config(folder_dataset, tmp_path / "run", iters=3))
    before = load_checkpoint(tmp_path / "run" / "last.pt")
    run_train(tiny_train_config(folder_dataset, tmp_path / "run", iters=6, lr=0.5,
                                weight_decay=0.0, resume="auto", checkpoint_interval=1,
                                keep_checkpoints=3))
    assert "iters 3 -> 6" in capsys.readouterr().out
    for iteration in (4, 5, 6):
        state = load_checkpoint(tmp_path / "run" / f"iter_{iteration}.pt")
        groups = state["optimizer"]["param_groups"]
        assert groups[0]["lr"] == pytest.approx(0.5 * (1 - iteration / 6) ** 0.9, abs=1e-12)
        assert groups[-1]["lr"] == pytest.approx(10 * groups[0]["lr"], abs=1e-12)  # head
        assert all(group["weight_decay"] == 0.0 for group in groups)
        assert state["scheduler"]["total_iters"] == 6
    after = load_checkpoint(tmp_path / "run" / "iter_4.pt")
    name = "backbone.conv1.0.weight"
    assert not torch.equal(before["model"][name], after["model"][name])


@pytest.mark.parametrize("change", [dict(batch_size=4), dict(seed=5)])
def test_resume_that_cannot_continue_exactly_is_refused(folder_dataset, tmp_path,
                                                        tiny_train_config, change):
    run_train(tiny_train_config(folder_dataset, tmp_path / "run", iters=3))
    flag = "--" + next(iter(change)).replace("_", "-")
    with pytest.raises(SegnestError, match=f"trained with {flag}"):
        run_train(tiny_train_config(folder_dataset, tmp_path / "run", iters=6, resume="auto",
                                    **change))


def test_resume_with_a_shorter_length_than_done_trains_nothing(folder_dataset, tmp_path,
                                                               tiny_train_config, capsys):
    run_train(tiny_train_config(folder_dataset, tmp_path / "run", iters=4))
    result = run_train(tiny_train_config(folder_dataset, tmp_path / "run", iters=2,
                                         resume="auto"))
    assert result["iteration"] == 4 and not result["interrupted"]
    assert "nothing to train" in capsys.readouterr().out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tiny_segmenter() -> nn.Module:
    torch.manual_seed(0)
    model = create_model("deeplabv3_resnest14", num_classes=3, stage_width=8, stem_width=8,
                         head_channels=16)
    # Dropout draws differ between one and two processes; the comparison is about BN.
    for name, module in list(model.named_modules()):
        for child_name, child in module.named_children():
            if isinstance(child, nn.Dropout):
                setattr(module, child_name, nn.Identity())
    return model.train()


def _ddp_worker(rank: int, world: int, port: int, batch, out_dir: str) -> None:
    import torch.distributed as dist

    from segnest.runtime.distributed import convert_sync_batchnorm

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    model = convert_sync_batchnorm(_tiny_segmenter(), torch.device("cpu"))
    ddp = nn.parallel.DistributedDataParallel(model)
    images, masks = batch
    half = images.shape[0] // world
    part = slice(rank * half, (rank + 1) * half)
    loss, _ = segmentation_loss(ddp(images[part]), masks[part], aux_weight=0.2)
    loss.backward()
    total = loss.detach().clone()
    dist.all_reduce(total)
    if rank == 0:
        grads = {n: p.grad for n, p in model.named_parameters()}
        torch.save({"loss": total / world, "grads": grads}, os.path.join(out_dir, "ddp.pt"))
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_process_ddp_with_syncbn_equals_one_process_with_double_batch(tmp_path):
    torch.manual_seed(1)
    images = torch.randn(4, 3, 32, 32)
    masks = torch.randint(0, 3, (4, 32, 32))
    torch.multiprocessing.spawn(_ddp_worker, args=(2, _free_port(), (images, masks),
                                                   str(tmp_path)), nprocs=2)
    ddp = torch.load(tmp_path / "ddp.pt", weights_only=True)
    model = _tiny_segmenter()
    loss, _ = segmentation_loss(model(images), masks, aux_weight=0.2)
    loss.backward()
    torch.testing.assert_close(ddp["loss"], loss.detach(), atol=1e-5, rtol=0)
    for name, param in model.named_parameters():
        torch.testing.assert_close(ddp["grads"][name], param.grad, atol=1e-5, rtol=1e-4,
                                   msg=name)


def test_a_relative_data_root_is_stored_absolute(folder_dataset, tmp_path, tiny_train_config,
                                                 monkeypatch):
    from segnest.runtime.checkpoint import load_checkpoint

    monkeypatch.chdir(folder_dataset.parent)
    run_train(tiny_train_config(folder_dataset.name, tmp_path / "run", iters=1))
    stored = load_checkpoint(tmp_path / "run" / "last.pt")["config"]["data_root"]
    assert stored == str(folder_dataset.resolve())
