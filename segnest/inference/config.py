"""The settings of the inference commands (``segnest eval``, ``predict``, ``export``,
``quantize``) and of ``segnest.load_model``, declared with their rules
(:mod:`segnest.schema`): typed Python values (scales are a tuple of floats, layer types a
tuple of names), checked in Python terms for library callers; the command line parses its
strings into these types and words the same errors as flags.

Torch-free: the command line imports it to build its flags."""

from __future__ import annotations

from dataclasses import dataclass, field

from segnest.errors import SegnestError
from segnest.presets import DATASETS
from segnest.schema import (
    DEVICE,
    DEVICE_HELP,
    MIN_INPUT_SIZE,
    PRECISION_HELP,
    PRECISIONS,
    Names,
    help_,
)

INFERENCE_MODES = ("whole", "slide")
EVAL_SPLITS = ("train", "val", "test")
# pt2 (torch.export) first: the recommended format and the default; torchscript is legacy.
EXPORT_FORMATS = ("pt2", "aoti", "onnx", "openvino", "torchscript")
# The formats that take --end-to-end (uint8 image in, label map out).
END_TO_END_FORMATS = ("pt2", "aoti", "onnx")
# Convolution types ``segnest quantize`` tells apart (segnest.inference.quantize): 1x1,
# dense kxk, grouped (Split-Attention's radix groups) and dilated dense (the ASPP's).
QUANTIZE_LAYER_TYPES = ("pointwise", "dense", "grouped", "dilated")
# The runtimes ``segnest quantize`` writes int8 models for.
QUANTIZE_BACKENDS = ("onnxruntime", "openvino")
# What --save-confidence writes, for both commands' --help.
CONFIDENCE_PNG = ("8-bit PNG, round(255 x the largest class probability averaged over the "
                  "scales and flips)")


def _stride_within_window(cfg: InferenceFlags, names: Names) -> None:
    if cfg.stride is not None and cfg.window_size is not None and cfg.stride > cfg.window_size:
        raise SegnestError(f"{names.show('stride', cfg.stride)} is larger than "
                           f"{names.show('window_size', cfg.window_size)} and would skip "
                           "pixels; use a stride of at most the window size")


def _confidence_needs_save_pred(cfg: EvalConfig, names: Names) -> None:
    if cfg.save_confidence and not cfg.save_pred:
        raise SegnestError(f"{names.name('save_confidence')} writes beside the predictions "
                           f"and needs {names.name('save_pred')}; add "
                           f"{names.name('save_pred')} FOLDER")


def _end_to_end_format(cfg: ExportConfig, names: Names) -> None:
    if cfg.end_to_end and cfg.format not in END_TO_END_FORMATS:
        formats = f"{', '.join(END_TO_END_FORMATS[:-1])} or {END_TO_END_FORMATS[-1]}"
        raise SegnestError(f"{names.name('end_to_end')} is not available for "
                           f"{names.name('format')} {cfg.format} (legacy); use "
                           f"{names.name('format')} {formats}, or leave out "
                           f"{names.name('end_to_end')} for a logits model")


@dataclass
class InferenceFlags:
    """The inference settings that ``segnest eval``, ``segnest predict`` and
    ``segnest.load_model`` share; turned into an inference strategy by
    ``segnest.inference.settings.InferenceSettings.from_flags``."""

    checks = (_stride_within_window,)

    multi_scale: bool = field(default=False, metadata=help_("average the dataset's eval scales"))
    flip: bool = field(default=False, metadata=help_("add horizontally flipped views"))
    scales: tuple[float, ...] | None = field(default=None, metadata=help_(
        "the scales to average (implies multi-scale); on the command line comma-separated, "
        "e.g. 0.5,1.0", above=0))
    mode: str = field(default="whole", metadata=help_("inference mode", choices=INFERENCE_MODES))
    base_size: int | None = field(
        default=None, metadata=help_("long side at scale 1.0 (default: the checkpoint's)", min=1)
    )
    window_size: int | None = field(
        default=None,
        metadata=help_("sliding-window size (default: the checkpoint's training crop)",
                       renamed_from="crop_size", min=1),
    )
    stride: int | None = field(
        default=None, metadata=help_("sliding-window stride (default 2/3 of the window)", min=1)
    )
    fuse_bn: bool = field(default=True, metadata=help_("fold BN into convs (same outputs, faster)"))
    compile: bool = field(
        default=False, metadata=help_("torch.compile with frozen weights (compiles per input size)")
    )
    batch_size: int = field(default=1, metadata=help_(
        "images (whole mode: those of equal working size) or windows (slide mode) per "
        "forward pass; never padded, results equal batch 1", min=1))
    precision: str = field(
        default="fp32", metadata=help_(PRECISION_HELP, choices=PRECISIONS))
    device: str | None = field(default=None, metadata=help_(DEVICE_HELP, pattern=DEVICE))


@dataclass
class EvalConfig(InferenceFlags):
    """``segnest eval``: metrics of a checkpoint on a dataset split."""

    checks = (_confidence_needs_save_pred,)

    checkpoint: str = field(default="", metadata=help_("segnest checkpoint (.pt)", required=True))
    dataset: str | None = field(
        default=None, metadata=help_("dataset (default: the checkpoint's)", choices=DATASETS)
    )
    data_root: str | None = field(default=None, metadata=help_(
        "dataset root (default: the checkpoint's, else ./data/<dataset>)"))
    split: str = field(default="val", metadata=help_("dataset split", choices=EVAL_SPLITS))
    save_pred: str | None = field(default=None, metadata=help_("write predictions here"))
    save_confidence: bool = field(default=False, metadata=help_(
        f"also write each prediction's confidence to <save-pred>_confidence/ (needs "
        f"--save-pred): {CONFIDENCE_PNG}"))
    out: str | None = field(
        default=None, metadata=help_("metrics folder (default next to checkpoint)")
    )
    samples: int | None = field(
        default=None, metadata=help_("first N images only (default all)", min=1))
    skip_bad_samples: bool = field(
        default=False, metadata=help_("warn about and skip unreadable samples instead of stopping")
    )
    workers: int = field(default=2, metadata=help_("data loader workers", min=0))


@dataclass
class PredictConfig(InferenceFlags):
    """``segnest predict``: coloured masks (and overlays) for images of any size and mode."""

    inputs: list[str] = field(default_factory=list, metadata=help_("image files or folders"))
    checkpoint: str = field(default="", metadata=help_("segnest checkpoint (.pt)", required=True))
    out: str = field(default="predictions", metadata=help_("output folder"))
    overlay: bool = field(default=False, metadata=help_("also write image/mask overlays"))
    save_confidence: bool = field(default=False, metadata=help_(
        f"also write <stem>_confidence.png: {CONFIDENCE_PNG}"))
    skip_bad_samples: bool = field(
        default=False, metadata=help_("warn about and skip unreadable samples instead of stopping")
    )


@dataclass
class ExportConfig:
    """``segnest export``: a stand-alone inference model from a checkpoint, verified."""

    checks = (_end_to_end_format,)

    checkpoint: str = field(default="", metadata=help_("segnest checkpoint (.pt)", required=True))
    format: str = field(default="pt2", metadata=help_(
        "pt2: torch.export program (recommended); aoti: AOTInductor package compiled for "
        "this machine; onnx: ONNX Runtime; openvino: OpenVINO IR (.xml + .bin); torchscript: "
        "legacy", choices=EXPORT_FORMATS))
    end_to_end: bool = field(default=False, metadata=help_(
        "uint8 N x H x W x C image in, uint8 label map out, pre- and post-processing in the "
        "graph (pt2, aoti, onnx)"))
    out: str | None = field(
        default=None, metadata=help_("output file (default next to checkpoint)")
    )
    size: int = field(
        default=512,
        metadata=help_("example input side used for tracing and the checks", min=MIN_INPUT_SIZE),
    )


@dataclass
class QuantizeConfig:
    """``segnest quantize``: an int8 ONNX or OpenVINO model of a checkpoint for CPU inference."""

    checkpoint: str = field(default="", metadata=help_("segnest checkpoint (.pt)", required=True))
    out: str | None = field(
        default=None, metadata=help_("output file (default next to checkpoint, .int8.onnx)")
    )
    dataset: str | None = field(
        default=None,
        metadata=help_("dataset of the calibration and check images (default: the "
                       "checkpoint's)", choices=DATASETS),
    )
    data_root: str | None = field(
        default=None, metadata=help_("dataset root (default: the checkpoint's)")
    )
    calibration_images: int = field(
        default=16, metadata=help_("training images that calibrate the int8 ranges", min=1)
    )
    check_images: int = field(
        default=16,
        metadata=help_("validation images on which the int8 labels are compared with fp32",
                       min=1),
    )
    layer_types: tuple[str, ...] = field(
        default=QUANTIZE_LAYER_TYPES,
        metadata=help_("convolution types to quantize (onnxruntime); on the command line "
                       "comma-separated, of " + ",".join(QUANTIZE_LAYER_TYPES),
                       choices=QUANTIZE_LAYER_TYPES),
    )
    backend: str = field(default="onnxruntime", metadata=help_(
        "onnxruntime: int8 ONNX (.int8.onnx); openvino: NNCF int8 OpenVINO IR "
        "(.int8.openvino.xml, needs segnest[openvino])", choices=QUANTIZE_BACKENDS))
