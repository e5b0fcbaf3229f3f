"""Specs for --precision: which dtype each device gets, the one-line refusals, the --amp
alias, bf16 autocast in training (fp32 loss, weights and BN statistics) and in inference.

No test depends on this machine's CPU: native bf16 is monkeypatched either way. bf16 runs
on every CPU (emulated where it is not native, only slower), so tiny models run it here.
"""

import pytest
import torch
from torch import nn

from segnest.cli import main
from segnest.commands.config import resolve_config
from segnest.engine.schedule import PolyLR
from segnest.errors import EXIT_ERROR, SegnestError
from segnest.inference.strategies import inference_model, predict_logits
from segnest.models import create_model
from segnest.runtime import precision
from segnest.runtime.checkpoint import load_checkpoint
from segnest.runtime.precision import (
    needs_grad_scaler,
    requested_precision,
    resolve_precision,
)
from segnest.schema import PRECISIONS
from segnest.tasks.classification.config import PretrainConfig
from segnest.tasks.segmentation.config import TrainConfig
from segnest.tasks.segmentation.task import run_train, train_one_step
from segnest.tools.bench import run_bench
from segnest.tools.config import BenchConfig

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.fixture
def native_bf16(monkeypatch):
    """``native_bf16(flag)``: this CPU has native bf16 (AVX512-BF16/AMX) or not."""
    def set_native(flag: bool) -> None:
        monkeypatch.setattr(precision, "cpu_native_bf16", lambda: flag)
    return set_native


@pytest.fixture
def gpu(monkeypatch):
    """``gpu(bf16)``: a CUDA GPU with or without native bf16 (nothing runs on it)."""
    def set_gpu(bf16: bool) -> None:
        monkeypatch.setattr(precision, "cuda_bf16", lambda device: bf16)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Old GPU")
    return set_gpu


def test_auto_picks_bf16_on_a_cpu_with_native_bf16_and_fp32_without(native_bf16):
    native_bf16(True)
    assert resolve_precision("auto", CPU) is torch.bfloat16
    assert resolve_precision("bf16", CPU) is torch.bfloat16
    assert resolve_precision("fp32", CPU) is None
    native_bf16(False)
    assert resolve_precision("auto", CPU) is None
    assert resolve_precision("fp32", CPU) is None


def test_bf16_on_a_cpu_without_native_bf16_is_refused_with_what_to_use(native_bf16):
    native_bf16(False)
    with pytest.raises(SegnestError, match="no native bf16.*use --precision fp32") as err:
        resolve_precision("bf16", CPU)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("native, hint", [(True, "bf16 .native on this CPU."),
                                          (False, "fp32 .or auto.")])
def test_fp16_on_a_cpu_is_refused_and_names_the_cpu_precision_to_use(native_bf16, native,
                                                                      hint):
    native_bf16(native)
    with pytest.raises(SegnestError, match=f"--precision fp16 needs a CUDA GPU.*{hint}"):
        resolve_precision("fp16", CPU)


def test_gpus_get_bf16_where_native_else_fp16(gpu):
    gpu(True)
    assert resolve_precision("auto", CUDA) is torch.bfloat16
    assert resolve_precision("bf16", CUDA) is torch.bfloat16
    assert resolve_precision("fp16", CUDA) is torch.float16
    gpu(False)
    assert resolve_precision("auto", CUDA) is torch.float16
    with pytest.raises(SegnestError, match="Old GPU.*no native bf16; use --precision fp16"):
        resolve_precision("bf16", CUDA)


def test_only_fp16_on_a_gpu_scales_gradients():
    assert needs_grad_scaler(CUDA, torch.float16)
    for device, dtype in ((CUDA, torch.bfloat16), (CUDA, None), (CPU, torch.bfloat16),
                          (CPU, None)):
        assert not needs_grad_scaler(device, dtype)


def test_native_bf16_is_read_from_the_cpu_capabilities(monkeypatch):
    for capability, expected in (({"avx512_bf16": False, "amx_bf16": True}, True),
                                 ({"avx512_bf16": True, "amx_bf16": False}, True),
                                 ({"avx512_bf16": False, "amx_bf16": False, "avx2": True}, False)):
        monkeypatch.setattr(torch._C._cpu, "_get_cpu_capability", lambda c=capability: c)
        assert precision.cpu_native_bf16() is expected


def test_amp_is_the_old_fp16_and_conflicts_with_another_precision():
    base = dict(dataset="folder", data_root="x", iters=1, base_size=48, crop_size=32)
    assert requested_precision(resolve_config(TrainConfig, {**base, "amp": True})) == "fp16"
    assert requested_precision(resolve_config(TrainConfig, base)) == "fp32"
    assert requested_precision(resolve_config(TrainConfig, {**base, "amp": True,
                                                            "precision": "fp16"})) == "fp16"
    with pytest.raises(SegnestError, match="--amp means --precision fp16 but "
                                           "--precision 'bf16' is given too"):
        resolve_config(TrainConfig, {**base, "amp": True, "precision": "bf16"})
    with pytest.raises(SegnestError, match="--amp means --precision fp16"):
        resolve_config(PretrainConfig, {"dataset": "mini", "amp": True, "precision": "auto"})


@pytest.mark.parametrize("command", [["train"], ["pretrain"], ["eval", "--checkpoint", "x.pt"],
                                     ["predict", "x.png", "--checkpoint", "x.pt"], ["bench"],
                                     ["demo"]])
def test_every_command_takes_precision_and_refuses_an_unknown_one(command, capsys):
    assert main([*command, "--precision", "fp8"]) == EXIT_ERROR
    err = capsys.readouterr().err.strip()
    assert err == (f"segnest: error: --precision 'fp8' is not one of {', '.join(PRECISIONS)}; "
                   "pick one of those")


@pytest.mark.parametrize("command", [
    ["bench", "--model", "resnest14", "--size", "32"],
    ["demo", "--work-dir", "{tmp}/demo"],
    ["predict", "{tmp}/none.png", "--checkpoint", "{tmp}/none.pt", "--out", "{tmp}/out"],
])
def test_bf16_without_native_support_is_one_line_before_any_work(command, native_bf16, tmp_path,
                                                                 capsys):
    native_bf16(False)
    argv = [part.format(tmp=tmp_path) for part in command]
    assert main([*argv, "--precision", "bf16", "--device", "cpu"]) == EXIT_ERROR
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "has no native bf16" in err
    assert list(tmp_path.iterdir()) == []  # nothing was written


def test_train_refuses_bf16_without_native_support_before_work(native_bf16, folder_dataset,
                                                               tmp_path, tiny_train_config):
    native_bf16(False)
    with pytest.raises(SegnestError, match="no native bf16"):
        run_train(tiny_train_config(folder_dataset, tmp_path / "run", precision="bf16"))
    assert not (tmp_path / "run" / "last.pt").exists()


def _tiny_segmenter(**kw) -> nn.Module:
    torch.manual_seed(0)
    return create_model("deeplabv3_resnest14", num_classes=3, stage_width=8, stem_width=8,
                        head_channels=16, **kw)


def test_a_bf16_train_step_convolves_in_bf16_and_keeps_loss_weights_and_bn_in_fp32(
        tiny_train_config, tmp_path, monkeypatch):
    import segnest.tasks.segmentation.task as segmentation

    model = _tiny_segmenter()
    conv_dtypes = []
    model.backbone.conv1[0].register_forward_hook(
        lambda module, args, out: conv_dtypes.append(out.dtype))
    seen = []

    def recording_loss(outputs, *args, **kwargs):
        seen.append(({k: v.dtype for k, v in outputs.items()}, torch.is_autocast_enabled("cpu")))
        loss, aux = segmentation.segmentation_loss.__wrapped__(outputs, *args, **kwargs)
        seen.append(loss.dtype)
        return loss, aux

    recording_loss.__wrapped__ = segmentation.segmentation_loss
    monkeypatch.setattr(segmentation, "segmentation_loss", recording_loss)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    batch = {"image": torch.randn(2, 3, 32, 32), "mask": torch.randint(0, 3, (2, 32, 32))}
    scalars = train_one_step(model, batch, optimizer, PolyLR(optimizer, 10), scaler,
                             tiny_train_config(tmp_path, tmp_path / "run"), CPU,
                             precision=torch.bfloat16)
    assert conv_dtypes == [torch.bfloat16]
    # The logits reach the loss in fp32, outside autocast, and the loss is fp32.
    assert seen == [({"out": torch.float32, "aux": torch.float32}, False), torch.float32]
    assert torch.isfinite(torch.tensor(scalars["loss"]))
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(b.dtype in (torch.float32, torch.int64) for b in model.buffers())


def test_bf16_training_records_its_precision_and_resuming_in_fp32_says_so(
        native_bf16, folder_dataset, tmp_path, tiny_train_config, capsys):
    native_bf16(True)
    run_train(tiny_train_config(folder_dataset, tmp_path / "run", iters=3, precision="bf16"))
    state = load_checkpoint(tmp_path / "run" / "last.pt")
    assert state["precision"] == "bf16" and state["config"]["precision"] == "bf16"
    capsys.readouterr()
    run_train(tiny_train_config(folder_dataset, tmp_path / "run", iters=4, resume="auto"))
    out = capsys.readouterr().out
    assert "trained in bf16, this run continues in fp32" in out
    assert load_checkpoint(tmp_path / "run" / "last.pt")["precision"] == "fp32"


def test_bf16_inference_is_close_to_fp32_with_fp32_logits_and_leaves_the_model_alone():
    model = _tiny_segmenter().eval()
    x = torch.randn(1, 3, 48, 40)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.inference_mode():
        reference = predict_logits(inference_model(model), x).softmax(1)
        logits = predict_logits(inference_model(model, precision=torch.bfloat16), x)
        unfused = predict_logits(inference_model(model, fuse=False, precision=torch.bfloat16), x)
    assert logits.dtype == torch.float32 and unfused.dtype == torch.float32
    torch.testing.assert_close(logits.softmax(1), reference, atol=0.05, rtol=0)
    torch.testing.assert_close(unfused.softmax(1), reference, atol=0.05, rtol=0)
    for key, value in model.state_dict().items():
        assert value.dtype == before[key].dtype and torch.equal(value, before[key]), key
    assert model.backbone.conv1[0].weight.is_contiguous()  # not moved to channels_last


def test_bench_reports_the_precision_it_ran(native_bf16):
    native_bf16(True)
    report = run_bench(BenchConfig(model="deeplabv3_resnest14", size=32, batch=1, warmup=0,
                                   runs=1, num_classes=3, precision="bf16", device="cpu"),
                       quiet=True)
    assert report["precision"] == "bf16" and report["channels_last"]
    assert report["images_per_s"] > 0
    train = run_bench(BenchConfig(model="resnest14", size=32, batch=2, mode="train", warmup=0,
                                  runs=1, num_classes=3, precision="auto", device="cpu"),
                      quiet=True)
    assert train["precision"] == "bf16" and train["channels_last"]


def test_16_bit_training_on_a_cpu_runs_in_channels_last_and_fp32_keeps_its_layout():
    from segnest.runtime.precision import for_training

    weight = lambda model: model.backbone.conv1[0].weight  # noqa: E731
    model = for_training(_tiny_segmenter(), CPU, torch.bfloat16)
    assert weight(model).is_contiguous(memory_format=torch.channels_last)
    assert weight(model).dtype == torch.float32
    assert weight(for_training(_tiny_segmenter(), CPU, None)).is_contiguous()


def test_under_cpu_autocast_the_aspp_dilated_branches_run_in_fp32_and_the_rest_in_bf16():
    model = _tiny_segmenter().eval()
    dtypes = {}
    for name, module in model.head.named_modules():
        if isinstance(module, nn.Conv2d):
            module.register_forward_hook(
                lambda m, args, out, name=name: dtypes.__setitem__(name, out.dtype))
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.randn(1, 3, 32, 32))
    dilated = {name for name, m in model.head.named_modules()
               if isinstance(m, nn.Conv2d) and m.dilation[0] > 1}
    assert len(dilated) == 3
    assert {name: dtypes[name] for name in dilated} == dict.fromkeys(dilated, torch.float32)
    assert {dtypes[name] for name in dtypes if name not in dilated} == {torch.bfloat16}


@pytest.mark.slow  # compiles
def test_compiled_bf16_inference_is_close_to_fp32():
    model = _tiny_segmenter().eval()
    x = torch.randn(1, 3, 48, 40)
    with torch.inference_mode():
        reference = predict_logits(inference_model(model), x).softmax(1)
        compiled = predict_logits(
            inference_model(model, compile=True, precision=torch.bfloat16), x)
    assert compiled.dtype == torch.float32
    torch.testing.assert_close(compiled.softmax(1), reference, atol=0.05, rtol=0)


def test_the_flag_choices_are_the_precisions_runtime_resolves():
    from segnest.runtime.precision import PRECISION_DTYPES

    assert set(PRECISIONS) == {*PRECISION_DTYPES, "auto"}
