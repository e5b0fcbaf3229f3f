"""``segnest export``: a checkpoint as a stand-alone inference model, verified against
``segnest predict``.

Formats (``--format``), with the default file name next to the checkpoint:

- ``pt2`` (``best.pt2``, the default and recommended): a ``torch.export`` ExportedProgram;
  ``torch.export.load(path).module()`` runs it with any torch of this version or newer,
  no segnest needed.
- ``aoti`` (``best.aoti.pt2``): the same program compiled ahead of time by AOTInductor into
  a shared library for this platform and this CPU's instruction set (or this GPU);
  ``torch._inductor.aoti_load_package(path)`` runs it without Python-level tracing.
  Exporting needs a C++ compiler and takes a minute or more.
- ``onnx`` (``best.onnx``): ONNX opset 17 for ONNX Runtime and other ONNX runtimes.
- ``openvino`` (``best.openvino.xml`` and its weights ``best.openvino.bin``): OpenVINO IR
  for OpenVINO's CPU runtime (the optional extra ``segnest[openvino]``), logits graph
  only; the metadata is in the graph's ``rt_info`` (:mod:`segnest.inference.openvino`).
- ``torchscript`` (``best.torchscript.pt``): legacy; ``torch.jit`` is deprecated upstream in
  favour of ``torch.export``. Logits graph only.

Graphs, all with dynamic batch, height and width:

- logits (the default): ``image`` float32 ``(N, in_channels, H, W)`` normalized as in
  training, ``(pixel / 255 - mean) / std`` per channel, H and W >= 32 -> ``logits`` float32
  ``(N, classes, H, W)``. ``segnest predict`` first resizes an image so that its long side
  is ``base_size`` and maps the softmax back to the image's size; a caller does the same.
- end-to-end (``--end-to-end``; pt2, aoti, onnx): ``image`` uint8 ``(N, H, W, in_channels)``
  (NHWC, 0-255, as an image decodes) -> ``labels`` uint8 ``(N, H, W)`` train ids, at the
  input's size. Inside the graph, exactly as ``segnest predict`` runs by default: /255,
  mean/std, a bilinear resize to the working size (long side = ``base_size``, rounded as
  :func:`segnest.inference.strategies.multi_scale_inference` rounds it; no resize when the
  checkpoint has no base size), the model, softmax, probabilities resized back to H x W,
  argmax. Single scale, whole image, no flip: for ``--multi-scale``/``--flip`` use
  ``segnest predict`` or a logits export. A torch.export graph (pt2, aoti) refuses an image
  whose short side becomes less than 9 pixels at the working size (an aspect ratio beyond
  base_size / 9, e.g. 57:1 at 512): torch.export specialises a 1-pixel feature map.

Metadata: one JSON object, stored as the ONNX ``metadata_props`` entry ``segnest``, as the
extra file ``segnest.json`` of a pt2 or TorchScript archive (``torch.export.load(path,
extra_files={"segnest.json": ""})``) and as the ``segnest`` entry of an AOTI package's
metadata (``aoti_load_package(path).get_metadata()``); :func:`read_metadata` reads any of
them. Keys: ``segnest_version``, ``format``, ``graph`` (``logits`` or ``end_to_end``),
``classes``, ``palette`` (RGB per class), ``mean``, ``std`` (0-1 scale), ``in_channels``,
``input`` and ``output`` (``name``, ``dtype``, ``layout``, ``shape``, ``range`` or
``meaning``), ``base_size``, ``inference`` (what the graph does of predict's pipeline),
``model``, ``dataset``, ``iteration``.

Verification, before the file appears (it is written atomically): on a batch of 2 images at
each of three sizes -- ``--size`` square, a non-square one and an odd one -- the exported
model's labels must equal ``segnest predict``'s (:class:`Predictor`) on at least
:data:`AGREEMENT` of the pixels; a logits export's labels are taken through predict's own
pipeline with the exported model in place of PyTorch's, and its logits must also match
PyTorch's within :data:`TOLERANCE`. Otherwise nothing is written. Without onnxruntime an
ONNX export is written unverified, and says so.

``--out`` may replace only an earlier export in the same format; the checkpoint, another
checkpoint or any other file already there is refused before the export starts, as is a
folder that cannot be written.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from segnest.errors import SegnestError
from segnest.inference.backends import (
    METADATA_FILE,
    METADATA_KEY,
    parse_onnx,
    require_extra,
)
from segnest.inference.backends import read_metadata as read_metadata  # its public place
from segnest.inference.config import ExportConfig, InferenceFlags
from segnest.inference.openvino import (
    XML_SUFFIX,
    OpenVinoModel,
    StagedIR,
    is_ir,
    openvino,
    to_openvino,
    weights_path,
)
from segnest.inference.outputs import identities, prepare_folder, refuse_input_file, resolved
from segnest.inference.predictor import Predictor
from segnest.inference.strategies import _resize, infer
from segnest.models.factory import checkpoint_task
from segnest.runtime.checkpoint import load_checkpoint
from segnest.runtime.compiling import has_cxx
from segnest.runtime.files import atomic_path
from segnest.runtime.record import CheckpointRecord
from segnest.schema import MIN_INPUT_SIZE, FlagNames, validate

SUFFIXES = {"pt2": ".pt2", "aoti": ".aoti.pt2", "onnx": ".onnx", "openvino": ".openvino.xml",
            "torchscript": ".torchscript.pt"}
END_TO_END_SUFFIX = ".end2end"  # best.end2end.onnx: the file name tells the graphs apart
ONNX_OPSET = 17
TOLERANCE = 1e-4  # max abs difference of exported to PyTorch logits
AGREEMENT = 0.999  # share of pixels whose label equals segnest predict's
CHECK_BATCH = 2
# The shortest side a torch.export end-to-end graph takes at the working size (see above).
MIN_WORKING_SIDE = 9

Runner = Callable[[torch.Tensor], torch.Tensor]


def guard_name(min_side: int) -> str:
    """The name of :class:`MinSideGuard` inside a logits graph: ONNX Runtime names the
    failing node in its error, so the name says what was refused."""
    return f"input_outside_limits_min_side_{min_side}"


@functools.cache
def _scripted_min_side_check() -> Callable[[torch.Tensor, int], torch.Tensor]:
    def refuse_small_image(image: torch.Tensor, min_side: int) -> torch.Tensor:
        if image.size(2) < min_side or image.size(3) < min_side:
            raise RuntimeError(
                f"input outside limits: an image of {image.size(2)} x {image.size(3)} pixels; "
                f"this model takes at least {min_side} pixels a side (its metadata's "
                "input.min_side)")
        return image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation notice
        return torch.jit.script(refuse_small_image)


class MinSideGuard(nn.Module):
    """An image ``(N, C, H, W)`` passed on unchanged, bit for bit, when H and W are at least
    ``min_side`` (the metadata's ``input.min_side``); otherwise the exported graph itself
    fails with an error naming the limit, so that a caller who runs the file directly (not
    through segnest) gets no labels for an input the model does not take. Each exporter
    gets the guard it can hold:

    - torch.export (pt2, aoti): ``torch._check`` on each side becomes a constraint on the
      program's dynamic height and width, checked on every call of a pt2 program ("Guard
      failed: x.size()[2] >= 32"). AOTInductor checks such constraints only with torch's
      switch ``AOTI_RUNTIME_CHECK_INPUTS=1`` in the environment, so the program also holds
      ``torch._assert_async`` on a tensor computed from the sizes: AOTInductor compiles it
      into a kernel that throws on every call ("input outside limits: this model takes at
      least 32 pixels a side ..."), constraint or not (a pt2 program refuses the size at
      its constraint first).
    - ONNX (``torch.onnx`` export): the image times ``ones(1).gather(0, [min(H, W) <
      min_side])``, exactly 1.0 for a valid image; the index out of range fails the
      GatherElements node in ONNX Runtime, whose error names the node,
      ``/input_outside_limits_min_side_32/...``. A Reshape to a mismatched shape would not
      do (ONNX Runtime's ReshapeFusion rewrites such a shape to -1 and runs it).
    - OpenVINO: the same multiplication built into the converted (or NNCF-quantized) model
      by :func:`guard_ir`, after conversion and quantization, which would otherwise see it.
    - TorchScript: a scripted check that raises with the sizes and the limit."""

    def __init__(self, min_side: int) -> None:
        super().__init__()
        self.min_side = min_side

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if torch.onnx.is_in_onnx_export():
            sides = torch._shape_as_tensor(image)[2:]
            small = (sides.amin(0, keepdim=True) < self.min_side).to(torch.int64)
            return image * image.new_ones(1).gather(0, small).view(1, 1, 1, 1)
        if torch.jit.is_tracing():
            return _scripted_min_side_check()(image, self.min_side)
        height, width = image.shape[2], image.shape[3]
        # A C++ string literal in AOTInductor's kernel: no quotes or backslashes.
        torch._assert_async(
            torch.scalar_tensor(torch.sym_min(height, width), dtype=torch.int64)
            >= self.min_side,
            f"input outside limits: this model takes at least {self.min_side} pixels a side "
            "(its metadata's input.min_side)")
        for axis, side in (("height", height), ("width", width)):
            torch._check(side >= self.min_side, lambda axis=axis, side=side: (
                f"input outside limits: image {axis} {side} is below this model's "
                f"min_side {self.min_side}"))
        return image


def guard_ir(model: Any, min_side: int) -> Any:
    """``model`` (an ``openvino.Model`` taking one ``(N, C, H, W)`` image) with
    :class:`MinSideGuard`'s multiplication in front of everything that reads the image: the
    image times ``GatherElements([1.0], [min(H, W) < min_side])``, exactly 1.0 for a valid
    image, so the outputs stay bit for bit those of ``model``; for a smaller image the index
    is out of range and OpenVINO's CPU plugin fails the node
    ``input_outside_limits_min_side_32/GatherElements``. Built after conversion and NNCF
    quantization, so that neither sees (or quantizes) it. OpenVINO folds an indexed Gather
    from a constant, and a Reshape to a mismatched shape, at compile time; GatherElements
    stays a run-time operation in the CPU plugin (tests/test_openvino.py runs it)."""
    ov = openvino()
    ops = ov.opset13
    name = guard_name(min_side)
    image = model.get_parameters()[0]
    readers = list(image.output(0).get_target_inputs())

    def named(node: Any, kind: str) -> Any:
        node.set_friendly_name(f"{name}/{kind}")
        return node

    i64 = functools.partial(ops.constant, dtype=np.int64)
    sides = named(ops.gather(ops.shape_of(image, "i64"), i64([2, 3]), i64(0)), "Gather")
    smallest = named(ops.reduce_min(sides, i64([0]), keep_dims=True), "ReduceMin")
    small = named(ops.convert(ops.less(smallest, i64([min_side])), "i64"), "Convert")
    one = named(ops.gather_elements(ops.constant(np.ones(1, np.float32)), small, 0),
                "GatherElements")
    guarded = named(ops.multiply(image, one), "Multiply")
    for reader in readers:
        reader.replace_source_output(guarded.output(0))
    model.validate_nodes_and_infer_types()
    return model


class LogitsOnly(nn.Module):
    """The segmentation model in eval mode, returning the main logits as a plain tensor;
    with ``min_side``, images with a smaller side are refused (:class:`MinSideGuard`)."""

    def __init__(self, model: nn.Module, min_side: int | None = None) -> None:
        super().__init__()
        self.model = model.eval()
        self.guard = None if min_side is None else guard_name(min_side)
        if self.guard is not None:
            self.add_module(self.guard, MinSideGuard(min_side))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if self.guard is not None:
            image = getattr(self, self.guard)(image)
        out = self.model(image)
        return out["out"] if isinstance(out, dict) else out


class CeilAvgPool(nn.Module):
    """``AvgPool2d(k, k, ceil_mode=True, count_include_pad=False)`` (ResNeSt's shortcut
    pool) as sums over a zero-padded input divided by the count of real pixels: the same
    values up to float rounding. torch 2.x's AOTInductor miscompiles the ceil-mode pool for
    dynamic odd sizes (it reads past the input: 1e31 logits at 33 x 61), so programs for
    torch.export carry this one instead."""

    def __init__(self, kernel: int) -> None:
        super().__init__()
        self.kernel = kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k, (height, width) = self.kernel, x.shape[-2:]
        pads = (0, (-width) % k, 0, (-height) % k)
        sums = F.avg_pool2d(F.pad(x, pads), k, k)
        counts = F.avg_pool2d(F.pad(x.new_ones(1, 1, height, width), pads), k, k)
        return sums / counts


def _square(value: int | tuple[int, ...]) -> int | None:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    return pair[0] if len(pair) == 2 and pair[0] == pair[1] else None


def without_ceil_pools(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose ceil-mode average pools (kernel = stride > 1, no padding,
    padding not counted) are :class:`CeilAvgPool`."""
    model = copy.deepcopy(model)
    for name, module in list(model.named_modules()):
        if not (isinstance(module, nn.AvgPool2d) and module.ceil_mode
                and not module.count_include_pad and _square(module.padding) == 0):
            continue
        kernel = _square(module.kernel_size)
        if kernel is None or kernel < 2 or _square(module.stride) != kernel:
            continue
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, CeilAvgPool(kernel))
    return model


def working_size(image: torch.Tensor, base_size: int) -> tuple[Any, Any]:
    """The size ``segnest predict`` resizes an NHWC ``image`` to at scale 1.0: long side =
    ``base_size``, each side ``max(1, int(side * ratio + 0.5))`` in float64, as
    ``strategies._scaled_size`` computes it (integer arithmetic would round differently on
    exact halves). Written so that it stays symbolic: SymInt arithmetic for torch.export,
    float64 tensor arithmetic for the ONNX tracer (1-element tensors: the exporter would
    compute 0-dim ones in float32)."""
    if torch.jit.is_tracing():
        sides = torch._shape_as_tensor(image)[1:3].to(torch.float64)
        ratio = torch.tensor([float(base_size)], dtype=torch.float64) / sides.amax(0, keepdim=True)
        half = torch.tensor([0.5], dtype=torch.float64)
        size = torch.floor(sides * ratio + half).clamp(min=1).to(torch.int64)
        return size[0], size[1]
    height, width = image.shape[1], image.shape[2]
    ratio = float(base_size) / torch.sym_max(height, width)
    return (torch.sym_max(1, torch.sym_int(height * ratio + 0.5)),
            torch.sym_max(1, torch.sym_int(width * ratio + 0.5)))


class EndToEnd(nn.Module):
    """uint8 NHWC images -> uint8 label maps at their size, as ``segnest predict`` runs by
    default (see the module docstring)."""

    def __init__(self, model: nn.Module, mean: tuple[float, ...], std: tuple[float, ...],
                 base_size: int | None) -> None:
        super().__init__()
        self.model = LogitsOnly(model)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
        self.base_size = base_size

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = (image.permute(0, 3, 1, 2).float() / 255 - self.mean) / self.std
        if self.base_size is not None:
            x = _resize(x, working_size(image, self.base_size))
        probs = self.model(x).softmax(dim=1)
        return _resize(probs, (image.shape[1], image.shape[2])).argmax(dim=1).to(torch.uint8)


def export_metadata(predictor: Predictor, checkpoint: dict[str, Any], fmt: str,
                    end_to_end: bool) -> dict[str, Any]:
    """The JSON object stored in an export (keys: see the module docstring)."""
    from segnest import __version__

    settings, channels = predictor.settings, predictor.in_channels
    record = CheckpointRecord.read(checkpoint)
    if end_to_end:
        inputs = {"name": "image", "dtype": "uint8", "layout": "NHWC",
                  "shape": ["N", "H", "W", channels], "range": [0, 255]}
        if fmt in ("pt2", "aoti") and settings.base_size:
            inputs["max_aspect_ratio"] = round(settings.base_size / MIN_WORKING_SIDE, 2)
        outputs = {"name": "labels", "dtype": "uint8", "layout": "NHW", "shape": ["N", "H", "W"],
                   "meaning": "train id of each pixel (an index into classes) at the input's "
                              "size"}
        inference = ("in the graph: /255, mean/std, bilinear resize to long side base_size, "
                     "model, softmax resized back, argmax; single scale, whole image, no flip "
                     "(segnest predict's defaults)")
    else:
        inputs = {"name": "image", "dtype": "float32", "layout": "NCHW",
                  "shape": ["N", channels, "H", "W"], "min_side": MIN_INPUT_SIZE,
                  "range": "(pixel / 255 - mean) / std per channel (uint16: pixel / 65535)"}
        outputs = {"name": "logits", "dtype": "float32", "layout": "NCHW",
                   "shape": ["N", predictor.num_classes, "H", "W"],
                   "meaning": "class scores at the input's size: argmax over dim 1 = train "
                              "id, softmax over dim 1 = probabilities"}
        inference = ("none in the graph; segnest predict resizes the image to long side "
                     "base_size (bilinear), runs the model, resizes the softmax back, argmax")
    return {
        "segnest_version": __version__, "format": fmt,
        "graph": "end_to_end" if end_to_end else "logits",
        "classes": list(predictor.classes), "palette": predictor.palette.tolist(),
        "mean": [float(v) for v in settings.mean], "std": [float(v) for v in settings.std],
        "in_channels": channels, "input": inputs, "output": outputs,
        "base_size": settings.base_size, "inference": inference,
        "model": record.model_name, "dataset": record.dataset, "iteration": record.iteration,
    }


# ---------------------------------------------------------------- writing each format


def _dynamic_dims(end_to_end: bool) -> dict[int, Any]:
    from torch.export import Dim

    # DYNAMIC, not a named Dim with a range: the backbone's ceil-mode pooling yields guards
    # (2 * ((h - 1) // 8) < 1 + (h - 1) // 4) true for every h that torch.export cannot
    # prove, which a named Dim turns into an error.
    batch = height = width = Dim.DYNAMIC
    return {0: batch, 1: height, 2: width} if end_to_end else {0: batch, 2: height, 3: width}


def exported_program(module: nn.Module, example: torch.Tensor,
                     end_to_end: bool) -> torch.export.ExportedProgram:
    """``module`` traced by ``torch.export`` with dynamic batch, height and width."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.export.export(module, (example,),
                                   dynamic_shapes=(_dynamic_dims(end_to_end),))


def export_pt2(module: nn.Module, example: torch.Tensor, path: Path, *, end_to_end: bool,
               metadata: dict[str, Any]) -> None:
    program = exported_program(module, example, end_to_end)
    # A file object: torch warns about a path not ending in .pt2, as the temporary one.
    with open(path, "wb") as handle:
        torch.export.save(program, handle, extra_files={METADATA_FILE: json.dumps(metadata)})


def export_aoti(module: nn.Module, example: torch.Tensor, path: Path, *, end_to_end: bool,
                metadata: dict[str, Any]) -> None:
    from torch._inductor import aoti_compile_and_package

    program = exported_program(module, example, end_to_end)
    configs = {"aot_inductor.metadata": {METADATA_KEY: json.dumps(metadata)}}
    # A file object, because a package path must end in .pt2 and the temporary one does not.
    with open(path, "wb") as handle, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        aoti_compile_and_package(program, package_path=handle, inductor_configs=configs)


def export_onnx(module: nn.Module, example: torch.Tensor, path: Path, *, end_to_end: bool,
                metadata: dict[str, Any] | None = None) -> None:
    """``module`` (a :class:`LogitsOnly` or :class:`EndToEnd`) as an ONNX model at ``path``
    with dynamic batch, height and width and ``metadata`` under ``metadata_props``.

    The TorchScript-based exporter (dynamo=False) needs no extra package; the dynamo
    exporter needs onnxscript and is only the fallback for a torch without the former."""
    if end_to_end:
        names = (["image"], ["labels"])
        axes = {"image": {0: "batch", 1: "height", 2: "width"},
                "labels": {0: "batch", 1: "height", 2: "width"}}
    else:
        names = (["image"], ["logits"])
        axes = {"image": {0: "batch", 2: "height", 3: "width"},
                "logits": {0: "batch", 2: "height", 3: "width"}}
    kwargs: dict[str, Any] = dict(input_names=names[0], output_names=names[1],
                                  opset_version=ONNX_OPSET, dynamic_axes=axes)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        try:
            torch.onnx.export(module, (example,), str(path), dynamo=False, **kwargs)
        except TypeError:
            try:
                import onnxscript  # noqa: F401
            except ImportError:
                raise SegnestError(
                    "ONNX export with this torch version needs the onnxscript package; "
                    "install it with 'pip install onnxscript onnx onnxruntime' or use "
                    "--format pt2") from None
            torch.onnx.export(module, (example,), str(path), dynamo=True, external_data=False,
                              **kwargs)
    if metadata is not None:
        add_onnx_metadata(path, metadata)


def add_onnx_metadata(path: Path, metadata: dict[str, Any]) -> None:
    """Store ``metadata`` (see :func:`export_metadata`) in the ONNX model at ``path``."""
    try:
        import onnx
    except ImportError:
        raise SegnestError("ONNX export needs the onnx package to store the classes, palette "
                           "and normalisation in the model; install it with 'pip install "
                           "onnx onnxruntime'") from None
    model = onnx.load(str(path))
    del model.metadata_props[:]
    entry = model.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(metadata)
    onnx.save(model, str(path))


def export_torchscript(module: nn.Module, example: torch.Tensor, path: Path, *,
                       end_to_end: bool, metadata: dict[str, Any]) -> None:
    assert not end_to_end, "the settings refuse --end-to-end for torchscript"
    with torch.no_grad(), warnings.catch_warnings():
        # torch.jit's deprecation notices are for segnest's maintainers, not its users.
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(module, example, check_trace=False)
        torch.jit.save(traced, str(path), _extra_files={METADATA_FILE: json.dumps(metadata)})


EXPORTERS = {"pt2": export_pt2, "aoti": export_aoti, "onnx": export_onnx,
             "torchscript": export_torchscript}


def load_exported(fmt: str, path: Path) -> Runner | None:
    """A function running the export at ``path`` on a tensor; None when the format's runtime
    is not installed (onnxruntime)."""
    if fmt == "pt2":
        with open(path, "rb") as handle:
            module = torch.export.load(handle).module()
        return lambda x: module(x)
    if fmt == "aoti":
        from torch._inductor import aoti_load_package

        with open(path, "rb") as handle:
            return aoti_load_package(handle)
    if fmt == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            return torch.jit.load(str(path), map_location="cpu")
    try:
        import onnxruntime
    except ImportError:
        return None
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda x: torch.from_numpy(session.run(None, {"image": x.numpy()})[0])


# ---------------------------------------------------------------- the command


def check_sizes(size: int, base_size: int | None = None) -> list[tuple[int, int]]:
    """(height, width) of the check images: the example size, a non-square one and an odd
    one, to prove H and W are not baked in. With ``base_size`` (a logits graph, whose labels
    are checked through predict's resize to long side ``base_size``), images are made tall
    enough that the working size keeps the graph's smallest side, MIN_INPUT_SIZE: the graph
    refuses anything smaller."""
    other = max(MIN_INPUT_SIZE, (size * 3 // 4) // 8 * 8)
    sizes = [(size, size), (other, size + 8),
             (max(MIN_INPUT_SIZE + 1, size * 5 // 8) | 1, (size + size // 4) | 1)]
    if base_size is None:
        return sizes
    return [(max(height, math.ceil(MIN_INPUT_SIZE * width / base_size)) | (height & 1), width)
            for height, width in sizes]


def check_images(height: int, width: int, channels: int, seed: int) -> torch.Tensor:
    """A seeded uint8 batch ``(CHECK_BATCH, H, W, C)`` of smooth blobs plus a little
    noise: a photograph's statistics more than white noise's, whose labels would flip at
    every near-tie."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(CHECK_BATCH, channels, max(2, height // 8), max(2, width // 8),
                        generator=generator)
    smooth = _resize(coarse, (height, width)) * 235
    noise = torch.rand(CHECK_BATCH, channels, height, width, generator=generator) * 20
    return (smooth + noise).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def normalized(images: torch.Tensor, predictor: Predictor) -> torch.Tensor:
    """NHWC uint8 images as the logits graph takes them (what predict feeds its model)."""
    mean = torch.tensor(predictor.settings.mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(predictor.settings.std, dtype=torch.float32).view(1, -1, 1, 1)
    return (images.permute(0, 3, 1, 2).float() / 255 - mean) / std


def verify(run: Runner, reference: nn.Module, predictor: Predictor, images: torch.Tensor,
           end_to_end: bool) -> tuple[float, float | None]:
    """(share of pixels whose label equals segnest predict's, max abs difference of the
    logits to ``reference``'s (PyTorch) or None for an end-to-end graph) on one batch of
    NHWC uint8 images.
    A runtime failure or a wrong output shape counts as no agreement."""
    expected = np.stack(predictor([image.numpy() for image in images]))
    try:
        with torch.inference_mode():
            if end_to_end:
                labels, difference = run(images), None
            else:
                x = normalized(images, predictor)
                logits = run(x)
                difference = (float((logits - reference(x)).abs().max())
                              if logits.shape == (x.shape[0], predictor.num_classes,
                                                  *x.shape[2:]) else math.inf)
                labels = infer(run, x, predictor.num_classes, predictor.settings).argmax(dim=1)
    except Exception:  # onnxruntime and AOTI raise their own types: the graph is wrong
        return 0.0, None if end_to_end else math.inf
    if tuple(labels.shape) != expected.shape:
        return 0.0, difference
    return float((labels.numpy() == expected).mean()), difference


def prepare_export(cfg: ExportConfig) -> tuple[ExportConfig, Path, dict[str, Any]]:
    """(``cfg`` validated, the file to write, the loaded checkpoint): what every task's
    exporter starts from, each refusal one line before any work."""
    cfg = validate(cfg, FlagNames())  # a command's settings: named as its flags
    source = Path(cfg.checkpoint)
    suffix = (END_TO_END_SUFFIX if cfg.end_to_end else "") + SUFFIXES[cfg.format]
    target = Path(cfg.out) if cfg.out else source.with_name(source.stem + suffix)
    if cfg.format == "onnx":
        require_extra("onnx", "--format onnx", alternative=" or use --format pt2")
    check_target(target, source, cfg.format)
    return cfg, target, load_checkpoint(cfg.checkpoint)


def run_export(cfg: ExportConfig) -> Path:
    """Export a segmentation checkpoint's model (``segnest export`` picks the exporter by
    the checkpoint's task: :func:`segnest.tasks.dispatch.run_export`); raises SegnestError
    when the check fails."""
    cfg, target, checkpoint = prepare_export(cfg)
    if checkpoint_task(checkpoint) == "detection":
        raise SegnestError(f"{cfg.checkpoint} is a detection checkpoint; export it with "
                           "'segnest export' (segnest.tasks.dispatch.run_export)")
    return export_segmentation(cfg, checkpoint, target)


def export_segmentation(cfg: ExportConfig, checkpoint: dict[str, Any], target: Path) -> Path:
    """Export the segmentation ``checkpoint`` (``cfg`` validated) to ``target``, verified
    against segnest's own inference before the atomic write."""
    fmt, end_to_end = cfg.format, cfg.end_to_end
    source = Path(cfg.checkpoint)
    if fmt == "openvino":
        openvino()  # installed, or one line before any work
    if fmt == "aoti" and not has_cxx():
        raise SegnestError("--format aoti compiles C++ and needs a compiler (g++ or clang++) "
                           "on PATH, or CXX set to one; install one (e.g. 'apt install g++') "
                           "or use --format pt2")
    predictor = Predictor.from_checkpoint(checkpoint, validate(InferenceFlags(
        device="cpu")), source=str(source))
    settings = predictor.settings
    reference = LogitsOnly(predictor.model)
    model = without_ceil_pools(predictor.model) if fmt in ("pt2", "aoti") else predictor.model
    # The logits graph refuses what its metadata's min_side excludes (MinSideGuard; an
    # OpenVINO model gets it after conversion, guard_ir); an end-to-end graph resizes any
    # image itself.
    module = (EndToEnd(model, settings.mean, settings.std, settings.base_size) if end_to_end
              else LogitsOnly(model, min_side=None if fmt == "openvino" else MIN_INPUT_SIZE)
              ).eval()
    metadata = export_metadata(predictor, checkpoint, fmt, end_to_end)
    channels = predictor.in_channels
    batches = [check_images(h, w, channels, seed) for seed, (h, w) in
               enumerate(check_sizes(cfg.size, None if end_to_end else settings.base_size))]
    example = batches[0] if end_to_end else normalized(batches[0], predictor)

    if fmt == "openvino":
        staged = StagedIR(guard_ir(to_openvino(module, example), MIN_INPUT_SIZE), target,
                          metadata)
        try:
            run = OpenVinoModel(staged.xml)
            results = [verify(run, reference, predictor, batch, end_to_end)
                       for batch in batches]
            _refuse_unfaithful(results, batches, fmt, target)
            staged.commit()
        finally:
            staged.discard()
    else:
        with atomic_path(target) as temp:
            EXPORTERS[fmt](module, example, temp, end_to_end=end_to_end, metadata=metadata)
            run = load_exported(fmt, temp)
            results = (None if run is None else [verify(run, reference, predictor, batch,
                                                        end_to_end) for batch in batches])
            if results is not None:
                _refuse_unfaithful(results, batches, fmt, target)

    graph = (f"uint8 image (N,H,W,{channels}) -> uint8 labels (N,H,W)" if end_to_end else
             f"normalized image (N,{channels},H,W) -> logits (N,{predictor.num_classes},H,W)")
    print(f"exported {fmt} to {target}: {graph}, any N, H and W; "
          f"{_describe_check(results, batches)}")
    return target


def _describe_sizes(batches: list[torch.Tensor]) -> str:
    return ", ".join(f"{b.shape[0]}x{b.shape[1]}x{b.shape[2]}" for b in batches)


def _describe_check(results: list[tuple[float, float | None]] | None,
                    batches: list[torch.Tensor]) -> str:
    if results is None:
        return "not verified: onnxruntime is not installed (pip install onnxruntime)"
    shares = ", ".join(f"{100 * share:.3f}%" for share, _ in results)
    text = (f"labels equal to segnest predict's on {shares} of the pixels at "
            f"{_describe_sizes(batches)} (N x H x W)")
    differences = [d for _, d in results if d is not None]
    if differences:
        text += f"; logits within {max(differences):.1e} of PyTorch"
    return text


def _refuse_unfaithful(results: list[tuple[float, float | None]], batches: list[torch.Tensor],
                       fmt: str, target: Path) -> None:
    worst = min(share for share, _ in results)
    differences = [d for _, d in results if d is not None]
    if worst < AGREEMENT:
        raise SegnestError(
            f"exported {fmt} model's labels equal segnest predict's on only "
            f"{100 * worst:.3f}% of the pixels (at least {100 * AGREEMENT:g}% needed; "
            f"{_describe_check(results, batches)}); the export is not faithful, not "
            f"writing {target}")
    if differences and max(differences) > TOLERANCE:
        raise SegnestError(
            f"exported {fmt} model's logits differ from PyTorch by up to "
            f"{max(differences):.2e} (tolerance {TOLERANCE:g}); the export is not faithful, "
            f"not writing {target}")


def check_target(target: Path, checkpoint: Path, fmt: str) -> None:
    """Refuse a target that is the checkpoint or an existing file other than an earlier
    ``fmt`` export; create its folder."""
    if target.is_dir():
        raise SegnestError(f"--out {target} is a folder; give a file name, e.g. "
                           f"--out {target / ('model' + SUFFIXES[fmt])}")
    refuse_input_file(target, identities({checkpoint: f"the checkpoint {checkpoint}"}),
                      "--out")
    if target.exists() and not is_export(target, fmt):
        raise SegnestError(f"--out {target} exists and is not a {fmt} export; choose another "
                           "file name or delete that file yourself")
    if fmt == "openvino":
        if not target.name.endswith(XML_SUFFIX):
            raise SegnestError(f"--out {target}: an OpenVINO model is an .xml graph beside "
                               f"its .bin weights; give a name ending in {XML_SUFFIX}")
        weights = weights_path(target)
        refuse_input_file(weights, identities({checkpoint: f"the checkpoint {checkpoint}"}),
                          "--out's weights file")
        if weights.exists() and not target.exists():
            raise SegnestError(f"{weights} exists without its graph {target}; choose another "
                               "--out or delete that file yourself")
    prepare_folder(resolved(target).parent, "--out's folder")


def is_export(path: Path, fmt: str) -> bool:
    """Whether ``path`` holds an earlier export in ``fmt``, by its content: a TorchScript
    archive is a zip with ``constants.pkl`` and ``code/``; a pt2 archive (torch.export.save)
    a zip with ``archive_format`` and ``models/``, an AOTI package one with
    ``archive_format`` and ``data/aotinductor/``, which a torch.save checkpoint lacks; an
    ONNX model must parse as one, with a graph of at least one node."""
    try:
        if fmt == "onnx":
            return _is_onnx_file(path)
        if fmt == "openvino":
            return is_ir(path)
        if not zipfile.is_zipfile(path):
            return False
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (OSError, zipfile.BadZipFile):
        return False
    if fmt == "torchscript":
        return (any(name.endswith("/constants.pkl") for name in names)
                and any("/code/" in name for name in names))
    packaged = any(name.endswith("/archive_format") for name in names)
    compiled = any("/data/aotinductor/" in name for name in names)
    if fmt == "aoti":
        return packaged and compiled
    return packaged and not compiled and any("/models/" in name for name in names)


def _is_onnx_file(path: Path) -> bool:
    """Whether ``path`` parses as an ONNX model with a graph (with onnx, else onnxruntime
    loads it; with neither nothing counts as ONNX, so nothing is replaced)."""
    try:
        if parse_onnx(path) is not None:
            return True
        import onnxruntime
    except (SegnestError, ImportError):
        return False
    try:
        onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception:  # onnxruntime's own exception types: not a model it can run
        return False
    return True
