"""Training on real data without --pretrained says, once, that the backbone starts from
scratch and what that costs; the mini set (the demo pretrains its own backbone) does not."""

from segnest.tasks.segmentation.config import TrainConfig
from segnest.tasks.segmentation.task import from_scratch_warning, run_train


def test_a_folder_run_without_pretrained_warns_once_that_it_trains_from_scratch(
        folder_dataset, tmp_path, tiny_train_config, capsys):
    run_train(tiny_train_config(folder_dataset, tmp_path / "run", iters=1, val_interval=1,
                                tensorboard=False))
    lines = [line for line in capsys.readouterr().out.splitlines() if "from scratch" in line]
    assert len(lines) == 1
    assert lines[0].startswith("warning:") and "ImageNet-pretrained" in lines[0]


def test_the_warning_names_the_official_weights_of_the_backbone():
    for dataset in ("ade20k", "cityscapes", "folder"):
        warning = from_scratch_warning(TrainConfig(dataset=dataset, backbone="resnest101"))
        assert "--pretrained resnest101 or timm:resnest101e.in1k" in warning
        assert "far lower mIoU" in warning
    small = from_scratch_warning(TrainConfig(dataset="folder", backbone="resnest14"))
    assert "--pretrained timm:resnest14d.gluon_in1k" in small
    narrow = from_scratch_warning(TrainConfig(dataset="folder", backbone="resnest14",
                                              stage_width=16))
    assert "segnest pretrain --export" in narrow and "timm:" not in narrow


def test_no_warning_for_the_mini_set_a_pretrained_backbone_or_a_resumed_run():
    assert from_scratch_warning(TrainConfig(dataset="mini", backbone="resnest14")) is None
    assert from_scratch_warning(TrainConfig(dataset="ade20k", pretrained="r.pth")) is None
    assert from_scratch_warning(TrainConfig(dataset="ade20k", resume="auto")) is None
