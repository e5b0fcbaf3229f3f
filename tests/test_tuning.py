"""Specs for hardware decisions: made by one function from a measurement (patched here:
no test depends on this machine's CPU), cached per CPU and software, applied to the model
inference runs, and printed by ``segnest bench``."""

import json

import pytest
import torch
from torch import nn

from segnest.inference.strategies import inference_model, predict_logits
from segnest.models import create_model
from segnest.runtime import compiling, precision, tuning
from segnest.runtime.precision import Autocast
from segnest.tools.bench import run_bench
from segnest.tools.config import BenchConfig

BF16 = torch.bfloat16


@pytest.fixture
def timings(monkeypatch, tmp_path):
    """``timings({rate: (fp32_s, bf16_s)})``: what measuring each dilation gives (in an
    empty cache folder); returns the list of the rates measured."""
    measured = []
    monkeypatch.setenv("SEGNEST_CACHE", str(tmp_path / "cache"))

    def set_timings(per_rate):
        def measure(dilation, dtype):
            measured.append(dilation)
            return per_rate[dilation]
        monkeypatch.setattr(tuning, "measure_dilated", measure)
        return measured
    monkeypatch.setattr(precision, "cpu_native_bf16", lambda: True)
    return set_timings


def tiny_segmenter():
    torch.manual_seed(0)
    return create_model("deeplabv3_resnest14", num_classes=3, stage_width=8, stem_width=8,
                        head_channels=16).eval()


def aspp(prepared):
    return next(m for m in prepared.modules() if hasattr(m, tuning.FLOAT32_DILATIONS))


def dilated_conv_dtypes(runner, model_modules):
    dtypes = {}
    for module in model_modules:
        if isinstance(module, nn.Conv2d) and module.dilation[0] > 1:
            module.register_forward_hook(
                lambda m, args, out: dtypes.__setitem__(m.dilation[0], out.dtype))
    with torch.inference_mode():
        runner(torch.randn(1, 3, 32, 32))
    return dtypes


@pytest.mark.parametrize("faster_in_bf16", [{12, 36}, {24}])
def test_each_aspp_dilation_runs_in_the_precision_measured_faster(timings, faster_in_bf16):
    timings({rate: (2e-3, 1e-3) if rate in faster_in_bf16 else (1e-3, 2e-3)
             for rate in (12, 24, 36)})
    prepared = inference_model(tiny_segmenter(), precision=BF16)
    assert aspp(prepared).float32_dilations == {12, 24, 36} - faster_in_bf16
    dtypes = dilated_conv_dtypes(prepared, aspp(prepared).modules())
    assert dtypes == {rate: BF16 if rate in faster_in_bf16 else torch.float32
                      for rate in (12, 24, 36)}


def test_fp32_inference_decides_nothing_and_leaves_the_model_alone(timings):
    measured = timings({})
    model = tiny_segmenter()
    inference_model(model)
    assert measured == [] and aspp(model).float32_dilations == {12, 24, 36}


def test_bench_prints_the_decisions_inference_ran_with_measured_once(timings, capsys):
    measured = timings({12: (2e-3, 1e-3), 24: (2e-3, 1e-3), 36: (1e-3, 3e-3)})
    report = run_bench(BenchConfig(model="deeplabv3_resnest14", size=32, batch=1, warmup=0,
                                   runs=1, num_classes=3, precision="bf16", device="cpu"))
    printed = capsys.readouterr().out
    assert sorted(measured) == [12, 24, 36]  # bench and inference_model share one decision
    assert "hardware        CPU: Test CPU" in printed
    assert "ASPP 3x3 conv, dilation 12: bf16 (bf16 1.0 ms vs fp32 2.0 ms" in printed
    assert "ASPP 3x3 conv, dilation 36: fp32 (bf16 3.0 ms vs fp32 1.0 ms" in printed
    assert any(line.startswith("compiled inference: frozen weights")
               for line in report["decisions"])


def test_measurements_are_cached_per_cpu_and_a_bad_cache_costs_only_a_new_measurement(
        timings, monkeypatch, tmp_path):
    measured = timings({12: (2e-3, 1e-3)})

    def decide():
        tuning.hardware_decisions.cache_clear()  # as a new process would
        return tuning.hardware_decisions("cpu", BF16, (12,))

    assert decide().float32_dilations == frozenset() and measured == [12]
    folder = tmp_path / "cache" / "hardware"
    [cache] = folder.iterdir()
    assert "cached in" in decide().lines()[0] and measured == [12]
    cache.write_text("{not json")
    assert decide().float32_dilations == frozenset() and measured == [12, 12]
    assert json.loads(cache.read_text())["timings"] == {"12": [2e-3, 1e-3]}
    monkeypatch.setattr(tuning, "cpu_model", lambda: "Another CPU")
    decide()
    assert measured == [12, 12, 12]  # another CPU is measured on its own
    for old in folder.iterdir():
        old.unlink()
    folder.rmdir()
    folder.write_text("a file where the cache folder should be")
    decisions = decide()
    assert measured == [12, 12, 12, 12] and "not writable" in decisions.lines()[0]


def test_eager_16_bit_inference_casts_the_weights_once_with_the_same_logits(timings):
    timings({12: (2e-3, 1e-3), 24: (1e-3, 2e-3), 36: (2e-3, 1e-3)})
    model = tiny_segmenter()
    prepared = inference_model(model, fuse=False, precision=BF16)
    convs = {name: m for name, m in prepared.module.named_modules()
             if isinstance(m, nn.Conv2d)}
    assert convs["head.0.branches.2.0"].weight.dtype == torch.float32  # dilation 24
    assert convs["head.0.branches.1.0"].weight.dtype == BF16
    assert convs["backbone.conv1.0"].weight.dtype == BF16
    # Autocast recasting the float32 weights on every call: the same numbers.
    per_call = inference_model(model, fuse=False)
    aspp(per_call).float32_dilations = frozenset({24})
    per_call = Autocast(per_call.to(memory_format=torch.channels_last), BF16)
    x = torch.randn(1, 3, 40, 32)
    with torch.inference_mode():
        torch.testing.assert_close(predict_logits(prepared, x), predict_logits(per_call, x),
                                   atol=0, rtol=0)


def test_compiled_inference_gets_a_static_graph_per_input_size(monkeypatch):
    calls = []
    monkeypatch.setattr(compiling, "has_cxx", lambda: True)
    monkeypatch.setattr(torch, "compile", lambda model, **kw: calls.append(kw) or model)
    compiling.compile_model(nn.Conv2d(1, 1, 1), frozen=True)
    assert calls == [{"dynamic": False}]
