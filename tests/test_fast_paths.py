"""Fast paths give the plain path's results: BN folding, torch.compile, activation
checkpointing, bench."""

import pytest
import torch
from torch import nn

from segnest.errors import SegnestError
from segnest.inference.strategies import inference_model
from segnest.models import create_model
from segnest.models.fuse import fuse_bn
from segnest.runtime import compiling
from segnest.tools.bench import run_bench
from segnest.tools.config import BenchConfig

TINY = dict(stage_width=8, stem_width=8)


def randomize_norms(model: nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            n = module.num_features
            module.running_mean.copy_(torch.rand(n, generator=generator) - 0.5)
            module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
            module.weight.data.copy_(torch.rand(n, generator=generator) + 0.5)
            module.bias.data.copy_(torch.rand(n, generator=generator) - 0.5)


@pytest.mark.parametrize("name, kwargs", [
    ("resnest14", dict(output_stride=8)),
    ("resnest50_fast_2s2x40d", dict(num_classes=10, stage_width=16)),
    ("resnet50d", dict(num_classes=10)),
    ("deeplabv3_resnest14", dict(num_classes=5, head_channels=16)),
])
def test_folded_model_equals_plain_model_in_eval(name, kwargs):
    torch.manual_seed(0)
    model = create_model(name, **{**TINY, **kwargs}).eval()
    randomize_norms(model, 1)
    fused = fuse_bn(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules()), "original untouched"
    x = torch.randn(2, 3, 48, 40)
    with torch.inference_mode():
        expected, got = model(x), fused(x)
    if not isinstance(expected, dict):
        expected, got = {"logits": expected}, {"logits": got}
    assert list(got) == list(expected)
    for key in expected:
        # Float rounding only: 1e-4 absolute, or relative for the large logits.
        torch.testing.assert_close(got[key], expected[key], atol=1e-4, rtol=1e-4)


def test_folding_leaves_norms_without_running_stats_alone():
    model = create_model("resnest14", norm_layer=lambda c: nn.GroupNorm(2, c), **TINY).eval()
    fused = fuse_bn(model)
    x = torch.randn(1, 3, 32, 32)
    with torch.inference_mode():
        torch.testing.assert_close(fused(x)["layer4"], model(x)["layer4"])


def test_inference_model_folds_a_copy_and_keeps_outputs():
    torch.manual_seed(0)
    model = create_model("deeplabv3_resnest14", num_classes=5, head_channels=16, **TINY)
    randomize_norms(model, 2)
    folded = inference_model(model)
    assert folded is not model and model.training, "the trained model is left as it was"
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    plain = inference_model(model, fuse=False)
    assert plain is model and not model.training
    x = torch.randn(1, 3, 37, 45)
    with torch.inference_mode():
        torch.testing.assert_close(folded(x), plain(x), atol=1e-4, rtol=1e-4)


def test_compile_without_a_cxx_compiler_is_one_clear_error(monkeypatch):
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(compiling.shutil, "which", lambda name: None)
    with pytest.raises(SegnestError, match="needs a C\\+\\+ compiler"):
        compiling.compile_model(nn.Conv2d(1, 1, 1))


@pytest.mark.skipif(not compiling.has_cxx(), reason="inductor on CPU needs a C++ compiler")
def test_compiled_inference_equals_eager():
    """torch.compile with frozen weights (eval/predict/bench --compile), ~20 s to compile."""
    torch.manual_seed(0)
    model = create_model("deeplabv3_resnest14", num_classes=5, head_channels=16, aux=False,
                         **TINY)
    randomize_norms(model, 3)
    compiled = inference_model(model, compile=True)
    x = torch.randn(2, 3, 40, 48)
    with torch.inference_mode():
        expected = model.eval()(x)
        got = compiled(x)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def training_step(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    out = model(x)
    loss = nn.functional.cross_entropy(out["out"], target)
    loss = loss + 0.2 * nn.functional.cross_entropy(out["aux"], target)
    loss.backward()
    return loss.detach()


@pytest.mark.parametrize("dropblock_prob", [0.0, 0.2])
def test_checkpointed_training_step_equals_plain_step(dropblock_prob):
    torch.manual_seed(0)
    plain = create_model("deeplabv3_resnest26", num_classes=4, head_channels=16,
                         dropblock_prob=dropblock_prob, **TINY).train()
    randomize_norms(plain, 2)
    ckpt = create_model("deeplabv3_resnest26", num_classes=4, head_channels=16,
                        dropblock_prob=dropblock_prob, **TINY).train()
    ckpt.load_state_dict(plain.state_dict())
    ckpt.set_grad_checkpointing(True)
    x, target = torch.randn(2, 3, 40, 40), torch.randint(0, 4, (2, 40, 40))

    torch.manual_seed(7)
    loss_plain = training_step(plain, x, target)
    torch.manual_seed(7)
    loss_ckpt = training_step(ckpt, x, target)

    torch.testing.assert_close(loss_ckpt, loss_plain, atol=1e-5, rtol=0)
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-5, rtol=1e-5, msg=name)
    for (name, b), c in zip(plain.named_buffers(), ckpt.buffers(), strict=True):
        torch.testing.assert_close(c, b, atol=1e-6, rtol=0, msg=name)


def saved_tensor_count(model: nn.Module, x: torch.Tensor) -> int:
    count = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal count
        count += 1
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(x)
    return count


@pytest.mark.parametrize("train, fewer", [(True, True), (False, False)])
def test_checkpointing_keeps_fewer_tensors_only_in_training(train, fewer):
    plain = create_model("resnest26", **TINY).train(train)
    ckpt = create_model("resnest26", **TINY).train(train)
    ckpt.set_grad_checkpointing(True)
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    assert (saved_tensor_count(ckpt, x) < saved_tensor_count(plain, x)) == fewer


EXPECTED_KEYS = {"model", "mode", "device", "batch", "size", "images_per_s", "ms_per_step",
                 "peak_memory_mb", "gflop_per_step", "achieved_gflops", "conv_peak_gflops",
                 "fraction_of_conv_peak"}


@pytest.mark.parametrize("mode, extra", [
    ("infer", dict(fuse_bn=True)),
    ("train", dict(checkpoint_activations=True)),
])
def test_run_bench_reports_positive_numbers(mode, extra):
    # Training needs two samples: BN after Split-Attention's global pooling.
    batch = 1 if mode == "infer" else 2
    cfg = BenchConfig(model="resnest14", size=32, batch=batch, mode=mode, warmup=0, runs=1,
                      num_classes=3, device="cpu", **extra)
    report = run_bench(cfg)
    assert EXPECTED_KEYS <= set(report)
    for key in ("images_per_s", "ms_per_step", "gflop_per_step", "achieved_gflops",
                "conv_peak_gflops", "fraction_of_conv_peak"):
        assert report[key] > 0, key
    assert report["peak_memory_mb"] >= 0
    assert report["mode"] == mode


def test_run_bench_segmentation_train_and_errors():
    cfg = BenchConfig(model="deeplabv3_resnest14", size=32, batch=2, mode="train", warmup=0,
                      runs=1, num_classes=3, device="cpu")
    assert run_bench(cfg)["images_per_s"] > 0
    with pytest.raises(SegnestError, match="--batch 2"):
        run_bench(BenchConfig(model="resnest14", size=32, batch=1, mode="train", warmup=0,
                              runs=1, device="cpu"))
    with pytest.raises(SegnestError, match="mode"):
        run_bench(BenchConfig(model="resnest14", mode="fly", device="cpu"))
    if not torch.cuda.is_available():
        with pytest.raises(SegnestError, match="cuda"):
            run_bench(BenchConfig(model="resnest14", size=32, device="cuda"))
