"""``segnest quantize``: int8 post-training quantization for CPU inference, in ONNX Runtime
(``--backend onnxruntime``, the default, described first) or OpenVINO (``--backend
openvino``: the model converted as ``segnest export --format openvino`` does, quantized by
NNCF's post-training quantization calibrated on the same training images; see
:mod:`segnest.inference.openvino`).

The checkpoint's model (batch norms folded) is exported to ONNX as ``segnest export`` does,
then ONNX Runtime's static quantization rewrites chosen convolutions as int8 QDQ pairs:
weights per output channel (symmetric int8), activations per tensor (uint8), their ranges
calibrated on ``--calibration-images`` training images of the checkpoint's dataset, read,
normalized and resized exactly as single-scale inference feeds the model. Everything
else (attention, softmax, resizing, the remaining convolutions) stays fp32.

Only the convolution types in ``--layer-types`` are quantized; the types
(``QUANTIZE_LAYER_TYPES``) are told apart from the graph: ``pointwise`` (1x1), ``dense``
(kxk, one group, no dilation: the stem, the head's 3x3), ``grouped`` (Split-Attention's
radix groups, dilated or not) and ``dilated`` (dense with dilation: the ASPP). The default
holds the types that ran faster in int8 than in fp32 (experiments/benchmarks/README.md).

Before the file is written (atomically), the int8 model's labels are compared with the fp32
model's on ``--check-images`` validation images, which calibration never saw; the agreement
and both models' mIoU on those images are printed, with a warning below
``AGREEMENT_WARNING``. ``--out`` follows the rules of
``segnest export``: never the checkpoint, and only an earlier ONNX model may be replaced.

``segnest eval --checkpoint best.int8.onnx`` measures the result on a whole split
(:mod:`segnest.inference.backends`).
"""

from __future__ import annotations

import tempfile
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from segnest.data import build_dataset, recorded_data_root
from segnest.errors import SegnestError
from segnest.inference.backends import OnnxModel
from segnest.inference.config import InferenceFlags, QuantizeConfig
from segnest.inference.export import (
    LogitsOnly,
    add_onnx_metadata,
    check_target,
    export_metadata,
    export_onnx,
    guard_ir,
    require_extra,
)
from segnest.inference.metrics import ConfusionMatrix, percent
from segnest.inference.openvino import (
    OpenVinoModel,
    StagedIR,
    openvino,
    quantize_ir,
    to_openvino,
)
from segnest.inference.predictor import Predictor
from segnest.inference.settings import InferenceSettings
from segnest.inference.strategies import (
    _scaled_size,
    _working_image,
    image_size,
    inference_model,
    segment,
)
from segnest.models import model_from_checkpoint
from segnest.runtime.checkpoint import load_checkpoint
from segnest.runtime.files import atomic_path
from segnest.runtime.record import CheckpointRecord
from segnest.schema import MIN_INPUT_SIZE, FlagNames, validate

# The default file name next to the checkpoint, per backend (config.QUANTIZE_BACKENDS).
SUFFIXES = {"onnxruntime": ".int8.onnx", "openvino": ".int8.openvino.xml"}
# Below this share of equal labels the int8 model is reported as suspect.
AGREEMENT_WARNING = 0.95


def _onnxruntime() -> Any:
    for module in ("onnx", "onnxruntime"):
        require_extra(module, "segnest quantize")
    import onnxruntime
    import onnxruntime.quantization  # noqa: F401
    return onnxruntime


def conv_layer_types(model: Any) -> dict[str, str]:
    """Conv node name -> its type in QUANTIZE_LAYER_TYPES, for an ``onnx.ModelProto``."""
    shapes = {init.name: tuple(init.dims) for init in model.graph.initializer}
    types_ = {}
    for node in model.graph.node:
        if node.op_type != "Conv":
            continue
        attrs = {a.name: a for a in node.attribute}
        group = attrs["group"].i if "group" in attrs else 1
        dilations = list(attrs["dilations"].ints) if "dilations" in attrs else []
        kernel = (list(attrs["kernel_shape"].ints) if "kernel_shape" in attrs
                  else list(shapes.get(node.input[1], (0, 0, 1, 1))[2:]))
        if group > 1 and any(k > 1 for k in kernel):
            types_[node.name] = "grouped"
        elif all(k == 1 for k in kernel):
            types_[node.name] = "pointwise"
        elif any(d > 1 for d in dilations):
            types_[node.name] = "dilated"
        else:
            types_[node.name] = "dense"
    return types_


def calibration_batches(dataset: Any, count: int, settings: InferenceSettings
                        ) -> Iterator[torch.Tensor]:
    """``count`` images spread evenly over ``dataset``, each as single-scale inference
    feeds it to the model: normalized with the checkpoint's mean/std, long side resized to
    the base size, (1, N, h, w)."""
    positions = np.linspace(0, len(dataset) - 1, num=min(count, len(dataset)))
    for index in sorted({int(round(p)) for p in positions}):
        image, _ = dataset.load(index)
        size = _scaled_size(*image_size(image), 1.0, settings.base_size)
        yield _working_image(image, size, settings).unsqueeze(0)


def _reader(batches: Sequence[torch.Tensor], input_name: str) -> Any:
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter(batches)

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self.items, None)
            return None if batch is None else {input_name: batch.numpy()}

    return Reader()


def quantize_onnx(source: Path, target: Path, batches: Sequence[torch.Tensor],
                  layer_types: Sequence[str]) -> dict[str, int]:
    """Write ``source`` (an fp32 ONNX model) to ``target`` with the convolutions of
    ``layer_types`` quantized to int8, calibrated on ``batches``; returns the number of
    convolutions quantized per type (0 for types left in fp32)."""
    _onnxruntime()
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    # ONNX Runtime's recommended preparation: shapes inferred, constants folded (the
    # exporter shares equal tensors through Identity nodes, which would hide a convolution's
    # bias from the quantizer), so that every convolution is seen as it will run.
    prepared = source.with_name(source.stem + ".prepared.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
    source = prepared
    types_ = conv_layer_types(onnx.load(str(source)))
    chosen = [name for name, kind in types_.items() if kind in layer_types]
    counts = {kind: sum(1 for name in chosen if types_[name] == kind) for kind in layer_types}
    if not chosen:
        raise SegnestError(f"the model has no convolution of the types {','.join(layer_types)}; "
                           "choose others with --layer-types")
    input_name = onnx.load(str(source), load_external_data=False).graph.input[0].name
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_static(
            str(source), str(target), _reader(batches, input_name),
            quant_format=QuantFormat.QDQ, per_channel=True,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
            op_types_to_quantize=["Conv"], nodes_to_quantize=chosen,
        )
    return counts


def label_agreement(reference: Any, candidate: Any, dataset: Any, count: int,
                    settings: InferenceSettings) -> dict[str, Any]:
    """How ``candidate``'s labels under ``settings`` compare with ``reference``'s over the
    first ``count`` images of ``dataset``: ``agreement`` (share of equal pixels),
    ``images``, and the mIoU (percent) of each against the ground truth
    (``reference_miou``, ``candidate_miou``)."""
    equal = total = images = 0
    num_classes = int(dataset.num_classes)
    scores = {name: ConfusionMatrix(num_classes, dataset.ignore_index)
              for name in ("reference", "candidate")}
    with torch.inference_mode():
        for index in range(min(count, len(dataset))):
            image, mask = dataset.load(index)
            target = torch.from_numpy(mask)
            # The banded labels eval and predict give (segment), for both models.
            (_, expected, _), = segment(reference, [(index, image)], num_classes, settings)
            (_, got, _), = segment(candidate, [(index, image)], num_classes, settings)
            scores["reference"].update(expected.long(), target)
            scores["candidate"].update(got.long(), target)
            equal += int((expected == got).sum())
            total += expected.numel()
            images += 1
    return {"agreement": equal / max(total, 1), "images": images,
            "reference_miou": scores["reference"].compute()["mIoU"],
            "candidate_miou": scores["candidate"].compute()["mIoU"]}


def _dataset(cfg: QuantizeConfig, checkpoint: dict[str, Any], split: str) -> Any:
    record = CheckpointRecord.read(checkpoint)
    trained = record.dataset
    name = cfg.dataset or trained
    if not name:
        raise SegnestError(f"checkpoint {cfg.checkpoint} does not name its dataset; pass "
                           "--dataset (and --data-root) for the calibration images")
    same = name == trained
    root = cfg.data_root
    if root is None and same and record.trained("data_root"):
        root = str(recorded_data_root(record.trained("data_root"), cfg.checkpoint,
                                      record.trained("work_dir")))
    return build_dataset(name, root, split,
                         label_map=record.trained("label_map") if same else None,
                         in_channels=record.in_channels)


def run_quantize(cfg: QuantizeConfig) -> dict[str, Any]:
    """``segnest quantize``; returns the target, the quantized counts (ONNX Runtime), the
    agreement and the mIoU of both models on the check images."""
    cfg = validate(cfg, FlagNames())  # a command's settings: named as its flags
    backend = cfg.backend
    layer_types = cfg.layer_types
    if backend == "openvino":
        openvino()  # installed, or one line before any work
    else:
        _onnxruntime()
    source = Path(cfg.checkpoint)
    target = Path(cfg.out) if cfg.out else source.with_name(source.stem + SUFFIXES[backend])
    check_target(target, source, "openvino" if backend == "openvino" else "onnx")
    checkpoint = load_checkpoint(cfg.checkpoint)
    model = inference_model(model_from_checkpoint(checkpoint, source=str(source)))
    settings = InferenceSettings.from_flags(InferenceFlags(), checkpoint, cfg.dataset)
    calibration = list(calibration_batches(_dataset(cfg, checkpoint, "train"),
                                           cfg.calibration_images, settings))
    val = _dataset(cfg, checkpoint, "val")
    predictor = Predictor.from_checkpoint(checkpoint, InferenceFlags(device="cpu"),
                                          source=str(source))
    fmt = "openvino" if backend == "openvino" else "onnx"
    # The classes, palette and normalisation travel with the model, as in every segnest
    # export (read them with segnest.inference.export.read_metadata).
    metadata = export_metadata(predictor, checkpoint, fmt, end_to_end=False)
    # LogitsOnly must be in eval mode: the exporters restore the wrapper's mode on the
    # whole model afterwards, and a model left training (dropout) would make the reference
    # of the agreement check random.
    # The int8 graph refuses images below its metadata's min_side as the fp32 export does
    # (export.MinSideGuard); an IR gets the guard after NNCF's quantization (guard_ir), its
    # outputs those of the unguarded int8 IR.
    logits = LogitsOnly(model, min_side=None if backend == "openvino" else MIN_INPUT_SIZE).eval()
    if backend == "openvino":
        counts: dict[str, int] = {}
        quantized = guard_ir(quantize_ir(to_openvino(logits, calibration[0]), calibration),
                             MIN_INPUT_SIZE)
        metadata["quantization"] = {
            "dtype": "int8", "method": "NNCF post-training quantization, performance preset",
            "calibration_images": len(calibration)}
        staged = StagedIR(quantized, target, metadata)
        try:
            check = label_agreement(model, OpenVinoModel(staged.xml), val, cfg.check_images,
                                    settings)
            _report(check, settings, target)
            staged.commit()
        finally:
            staged.discard()
        what = "quantized to int8 with NNCF"
        runtime = "run with openvino"
    else:
        with tempfile.TemporaryDirectory(prefix="segnest-quantize-") as folder:
            fp32 = Path(folder) / "model.onnx"
            with torch.no_grad():
                export_onnx(logits, calibration[0], fp32, end_to_end=False)
            with atomic_path(target) as temp:
                counts = quantize_onnx(fp32, temp, calibration, layer_types)
                metadata["quantization"] = {
                    "dtype": "int8", "method": "onnxruntime static QDQ, per-channel weights",
                    "layer_types": list(layer_types), "convolutions": counts,
                    "calibration_images": len(calibration)}
                add_onnx_metadata(temp, metadata)
                check = label_agreement(model, OnnxModel(temp), val, cfg.check_images,
                                        settings)
                _report(check, settings, target)
        kinds = ", ".join(f"{n} {kind}" for kind, n in counts.items())
        what = f"quantized {sum(counts.values())} convolutions to int8 ({kinds})"
        runtime = "run with onnxruntime"
    print(f"{what}, calibrated on {len(calibration)} training images -> {target}: normalized "
          f"image (N,C,H,W) -> logits (N,classes,H,W), {runtime}")
    return {"target": target, "counts": counts, **check}


def _report(check: dict[str, Any], settings: InferenceSettings, target: Path) -> None:
    """The agreement and the mIoU change, printed before the model is written."""
    change = check["candidate_miou"] - check["reference_miou"]
    print(f"int8 labels agree with fp32 on {100 * check['agreement']:.2f}% of the pixels of "
          f"{check['images']} validation images ({settings.describe()}); mIoU "
          f"{percent(check['reference_miou'])} -> {percent(check['candidate_miou'])} "
          f"({change:+.2f})")
    if check["agreement"] < AGREEMENT_WARNING:
        print(f"warning: int8 labels differ from fp32 on more than "
              f"{100 * (1 - AGREEMENT_WARNING):.0f}% of the pixels; measure its mIoU with "
              f"'segnest eval --checkpoint {target}' before using it, or quantize fewer "
              "--layer-types")
