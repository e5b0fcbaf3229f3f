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
    empty cache folder), for inference and for training unless a ``("train", rate)`` entry
    gives training's; returns the list of the rates measured (training's as
    ``("train", rate)``)."""
    measured = []
    monkeypatch.setenv("SEGNEST_CACHE", str(tmp_path / "cache"))

    def set_timings(per_rate):
        def measure(dilation, dtype, training=False):
            measured.append(("train", dilation) if training else dilation)
            return per_rate.get(("train", dilation) if training else dilation,
                                per_rate.get(dilation))
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
    assert "ASPP 3x3 conv, dilation 12: bf16 (forward bf16 1.0 ms vs fp32 2.0 ms" in printed
    assert "ASPP 3x3 conv, dilation 36: fp32 (forward bf16 3.0 ms vs fp32 1.0 ms" in printed
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


def test_training_decides_each_dilation_by_its_own_forward_and_backward_timing(timings):
    """Training's choice is its own measurement (forward + backward), made and cached apart
    from inference's, through the same function, and applied to the model that trains."""
    measured = timings({12: (2e-3, 1e-3), 24: (2e-3, 1e-3), 36: (1e-3, 2e-3),
                        ("train", 12): (1e-3, 2e-3), ("train", 36): (2e-3, 1e-3)})
    model = tiny_segmenter().train()
    decisions = tuning.prepare_for_training(model, torch.device("cpu"), BF16)
    assert aspp(model).float32_dilations == {12} == decisions.float32_dilations
    assert sorted(measured, key=str) == [("train", 12), ("train", 24), ("train", 36)]
    assert "dilation 12: fp32 (forward + backward bf16 2.0 ms vs fp32 1.0 ms" in \
        decisions.lines()[0]
    assert next(model.parameters()).is_contiguous(memory_format=torch.channels_last) or \
        model.backbone.conv1[0].weight.is_contiguous(memory_format=torch.channels_last)
    dtypes = {}
    for module in aspp(model).modules():
        if isinstance(module, nn.Conv2d) and module.dilation[0] > 1:
            module.register_forward_hook(
                lambda m, args, out: dtypes.__setitem__(m.dilation[0], out.dtype))
    with torch.autocast("cpu", dtype=BF16):
        model(torch.randn(2, 3, 32, 32))
    assert dtypes == {12: torch.float32, 24: BF16, 36: BF16}
    inference = inference_model(tiny_segmenter(), precision=BF16)
    assert aspp(inference).float32_dilations == {36}  # inference's own measurement
    assert {12, 24, 36} <= set(measured)


def test_fp32_training_decides_nothing(timings):
    measured = timings({})
    model = tiny_segmenter().train()
    decisions = tuning.prepare_for_training(model, torch.device("cpu"), None)
    assert measured == [] and aspp(model).float32_dilations == {12, 24, 36}
    assert decisions.lines() == ["memory layout: the model's own (NCHW) (rule: oneDNN's "
                                 "16-bit and frozen convolutions run in NHWC)"]


def test_16_bit_cpu_training_prints_the_decisions_it_runs_with(timings, folder_dataset,
                                                              tmp_path, tiny_train_config,
                                                              capsys):
    from segnest.tasks.segmentation.task import run_train

    timings({12: (1e-3, 2e-3), 24: (2e-3, 1e-3), 36: (2e-3, 1e-3)})
    run_train(tiny_train_config(folder_dataset, tmp_path / "run", iters=1, precision="bf16"))
    printed = capsys.readouterr().out
    assert "hardware: ASPP 3x3 conv, dilation 12: fp32 (forward + backward" in printed
    assert "hardware: ASPP 3x3 conv, dilation 24: bf16 (forward + backward" in printed


def test_a_measurement_on_a_busy_cpu_is_used_but_not_cached(timings, monkeypatch, tmp_path):
    measured = timings({12: (2e-3, 1e-3)})
    monkeypatch.setattr(tuning, "busy_cpu", lambda: "load 3.1 on 2 cores")
    decisions = tuning.hardware_decisions("cpu", BF16, (12,))
    assert decisions.float32_dilations == frozenset() and measured == [12]
    assert "measured now on a busy CPU (load 3.1 on 2 cores), not cached" in \
        decisions.lines()[0]
    assert not (tmp_path / "cache" / "hardware").exists()
    monkeypatch.setattr(tuning, "busy_cpu", lambda: None)
    tuning.hardware_decisions.cache_clear()
    tuning.hardware_decisions("cpu", BF16, (12,))
    assert measured == [12, 12] and (tmp_path / "cache" / "hardware").exists()


def test_busy_cpu_compares_the_load_with_the_cores_of_this_process(monkeypatch):
    monkeypatch.undo()  # the real function, not the suite's stand-in
    monkeypatch.setattr(tuning.os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr(tuning.os, "getloadavg", lambda: (2.6, 1.0, 1.0))
    assert tuning.busy_cpu() == "load 2.6 on 2 cores"
    monkeypatch.setattr(tuning.os, "getloadavg", lambda: (1.4, 1.0, 1.0))
    assert tuning.busy_cpu() is None


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


@pytest.fixture
def loss_timings(monkeypatch, tmp_path):
    """``loss_timings(bands_s, full_size_s)``: what timing the two loss paths gives (in an
    empty cache folder); returns the list of the shapes measured."""
    from segnest.models import pixelwise

    measured = []
    monkeypatch.setenv("SEGNEST_CACHE", str(tmp_path / "cache"))

    def set_timings(bands_s, full_s):
        def measure(batch, classes, size, output_stride, align_corners):
            measured.append((batch, classes, *size))
            return bands_s, full_s
        monkeypatch.setattr(pixelwise, "_time_loss_paths", measure)
        return measured
    return set_timings


@pytest.mark.parametrize("bands_s, full_s, chosen", [(1e-3, 2e-3, "in bands"),
                                                     (2e-3, 1e-3, "full size")])
def test_the_segmentation_loss_takes_the_path_measured_faster_for_its_shape(
        loss_timings, bands_s, full_s, chosen):
    from segnest.models.pixelwise import loss_upsampling

    measured = loss_timings(bands_s, full_s)
    choice = loss_upsampling(torch.device("cpu"), 2, 150, (256, 192))
    assert choice.chosen == chosen and measured == [(2, 150, 256, 192)]
    assert f"in bands {1e3 * bands_s:.1f} ms vs full size {1e3 * full_s:.1f} ms" in choice.why
    again = loss_upsampling(torch.device("cpu"), 2, 150, (256, 192))
    assert again.chosen == chosen and "cached in" in again.why and len(measured) == 1
    loss_upsampling(torch.device("cpu"), 4, 150, (256, 192))  # another shape: measured
    assert len(measured) == 2
    small = loss_upsampling(torch.device("cpu"), 8, 8, (96, 96))  # the demo's: 2.2 MB
    assert small.chosen == "in bands" and small.why.startswith("rule:") and len(measured) == 2


def test_the_full_size_loss_is_not_considered_where_it_would_not_fit_in_memory(
        loss_timings, monkeypatch):
    from segnest.models import pixelwise

    measured = loss_timings(2e-3, 1e-3)
    monkeypatch.setattr(pixelwise, "available_bytes", lambda: 2**30)
    choice = pixelwise.loss_upsampling(torch.device("cpu"), 16, 150, (512, 512))
    assert choice.chosen == "in bands" and choice.why.startswith("memory:") and not measured
    gpu = pixelwise.loss_upsampling(torch.device("cuda"), 2, 150, (512, 512))
    assert gpu.chosen == "full size" and not measured


@pytest.mark.parametrize("bands_s, full_s, chosen, logits_side", [
    (2e-3, 1e-3, "full size", 32), (1e-3, 2e-3, "in bands", 4)])
def test_training_takes_its_loss_the_way_measured_faster(
        loss_timings, folder_dataset, tmp_path, tiny_train_config, capsys, monkeypatch,
        bands_s, full_s, chosen, logits_side):
    from segnest.models import pixelwise
    from segnest.tasks.segmentation import task

    loss_timings(bands_s, full_s)
    monkeypatch.setattr(pixelwise, "MEASURED_FROM_BYTES", 0)  # the tiny crops are measured
    seen = []
    real = pixelwise.upsampled_cross_entropy
    monkeypatch.setattr("segnest.tasks.segmentation.losses.upsampled_cross_entropy",
                        lambda logits, target, *args: seen.append(logits.shape)
                        or real(logits, target, *args))
    task.run_train(tiny_train_config(folder_dataset, tmp_path / "run", iters=2))
    assert f"hardware: segmentation loss upsampling: {chosen} (forward + backward" in \
        capsys.readouterr().out
    # 32 x 32 crops: full-size logits reach the loss, or the head's 1/8 ones.
    assert seen and all(shape[-2:] == (logits_side, logits_side) for shape in seen)


def test_a_resumed_run_keeps_the_decisions_its_checkpoint_recorded(
        timings, loss_timings, folder_dataset, tmp_path, tiny_train_config, capsys,
        monkeypatch):
    """Another measurement at resume time (another load, another CPU) must not change the
    numbers of a run that continues: the checkpoint records the choices it trained with."""
    from segnest.models import pixelwise
    from segnest.runtime.checkpoint import load_checkpoint
    from segnest.tasks.segmentation import task

    monkeypatch.setattr(pixelwise, "MEASURED_FROM_BYTES", 0)
    timings({12: (2e-3, 1e-3), 24: (2e-3, 1e-3), 36: (1e-3, 2e-3)})
    loss_timings(2e-3, 1e-3)
    work = tmp_path / "run"
    task.run_train(tiny_train_config(folder_dataset, work, iters=2, precision="bf16"))
    first = capsys.readouterr().out
    assert "hardware: segmentation loss upsampling: full size (forward" in first
    recorded = load_checkpoint(work / "last.pt")["hardware"]
    assert recorded[pixelwise.LOSS_UPSAMPLING] == "full size"
    assert recorded[tuning.dilation_what(12)] == "bf16"
    assert recorded[tuning.dilation_what(36)] == "fp32"

    tuning.hardware_decisions.cache_clear()
    timings({12: (1e-3, 2e-3), 24: (1e-3, 2e-3), 36: (2e-3, 1e-3)})  # the opposite now
    loss_timings(1e-3, 2e-3)
    monkeypatch.setenv("SEGNEST_CACHE", str(tmp_path / "another-cache"))
    task.run_train(tiny_train_config(folder_dataset, work, iters=4, precision="bf16",
                                     resume="auto"))
    resumed = capsys.readouterr().out
    assert ("hardware: segmentation loss upsampling: full size (recorded by the checkpoint "
            "resumed)") in resumed
    assert "hardware: ASPP 3x3 conv, dilation 12: bf16 (recorded by the checkpoint" in resumed
    assert "hardware: ASPP 3x3 conv, dilation 36: fp32 (recorded by the checkpoint" in resumed
    assert load_checkpoint(work / "last.pt")["hardware"] == recorded
