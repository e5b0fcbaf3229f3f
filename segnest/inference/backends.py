"""Exported models as eval and predict run them: ``segnest eval``/``predict`` and
``segnest.load_model`` take a logits ONNX file (``segnest export --format onnx``,
``segnest quantize``) or an OpenVINO IR (``segnest export --format openvino``,
``segnest quantize --backend openvino``) in place of a checkpoint, so a user measures the
model they will deploy through the same pipeline (resize, views, bands, metrics).

Everything else a checkpoint records comes from the file's export metadata
(:func:`read_metadata`, which reads that of every format): classes, palette, mean/std, input
channels, base size and the dataset. The graph runs on the CPU with ONNX Runtime, as it is
(no batch-norm folding, compilation or autocast). An end-to-end graph (uint8 image ->
labels) has its own resize and argmax inside and takes no part in multi-scale or banded
inference; it is refused with the way to measure it. The model refuses inputs outside
the limits its metadata documents (channels, the smallest side) instead of returning
labels for them (an exported graph also holds the smallest-side check itself; here it is
one line, and it covers files exported before graphs held it). ``--precision`` reaches
OpenVINO as its inference precision hint (``auto``: bf16 where the CPU has it natively);
ONNX Runtime runs a model as it is (fp32, or int8 where quantized).
"""

from __future__ import annotations

import importlib.util
import json
import os
import zipfile
from pathlib import Path
from typing import Any

import torch

from segnest.errors import SegnestError
from segnest.inference.openvino import OpenVinoModel, is_ir, read_ir_metadata
from segnest.runtime.precision import precision_name, resolve_precision

ONNX_SUFFIX = ".onnx"
METADATA_KEY = "segnest"  # ONNX metadata_props key, AOTI metadata key
METADATA_FILE = "segnest.json"  # extra file of a pt2 or TorchScript archive


def require_extra(module: str, what: str, alternative: str = "") -> None:
    """Refuse ``what`` in one line, before any work, when ``module`` (a package of the
    ``export`` extra: onnx, onnxruntime) is not installed. They stay an extra rather than
    core: pt2, the default format, needs neither, and ONNX Runtime alone is larger than
    the rest of a CPU install's own dependencies besides torch."""
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a module set to None in sys.modules, a broken one
        found = False
    if not found:
        raise SegnestError(f"{what} needs the {module} package, which a plain 'pip install "
                           f"segnest' leaves out; install the export extra with "
                           f"pip install 'segnest[export]'{alternative}")


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata JSON of a file written by ``segnest export`` (any format)."""
    path = Path(path)
    if is_ir(path):
        return read_ir_metadata(path)
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                for name in archive.namelist():
                    if name.endswith(f"/extra/{METADATA_FILE}"):
                        return json.loads(archive.read(name))
                    if name.endswith("wrapper_metadata.json"):  # an AOTI package
                        entries = json.loads(archive.read(name))
                        if METADATA_KEY in entries:
                            return json.loads(entries[METADATA_KEY])
        elif path.suffix.lower() == ".onnx" or _starts_like_onnx(path):
            found = _onnx_metadata(path)
            if found is not None:
                return json.loads(found)
    except (OSError, zipfile.BadZipFile, json.JSONDecodeError) as error:
        raise SegnestError(f"cannot read the export metadata of {path}: {error}; export the "
                           "model again with segnest export") from None
    raise SegnestError(f"{path} holds no segnest export metadata; pass a file written by "
                       "segnest export (older exports have none: export again)")


def _onnx_metadata(path: Path) -> str | None:
    model = parse_onnx(path)
    if model is not None:
        return next((p.value for p in model.metadata_props if p.key == METADATA_KEY), None)
    require_extra("onnxruntime", f"reading the metadata of {path}")
    import onnxruntime

    try:
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as error:  # onnxruntime raises its own exception types
        raise _corrupt_onnx(path, error) from None
    return session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)


def parse_onnx(path: Path) -> Any:
    """The ONNX ``ModelProto`` at ``path`` (weights in external files not loaded), or None
    when the onnx package is missing; a file that does not parse as a model with a graph
    is one line naming it."""
    try:
        import onnx
    except ImportError:
        return None
    try:
        model = onnx.load(str(path), load_external_data=False)
    except OSError:
        raise
    except Exception as error:  # protobuf's DecodeError and its kin
        raise _corrupt_onnx(path, error) from None
    if model.ir_version <= 0 or not model.graph.node:
        raise _corrupt_onnx(path, ValueError("no graph"))
    return model


def _corrupt_onnx(path: Path, error: Exception) -> SegnestError:
    reason = str(error).splitlines()[0] if str(error) else type(error).__name__
    return SegnestError(f"{path} is not a readable ONNX model ({reason}); it is truncated or "
                        "not ONNX: export it again with segnest export")


def _starts_like_onnx(path: Path) -> bool:
    """The first byte of an ONNX protobuf (its ir_version field); only a hint, never
    enough to replace a file (:func:`_is_onnx_file` parses it)."""
    with open(path, "rb") as handle:
        return handle.read(1) == b"\x08"




def is_exported_model(path: str | os.PathLike) -> bool:
    """Whether ``path`` names an exported model rather than a checkpoint: an ONNX file (by
    its suffix, what the user asked for; its content is then parsed, and a file that is not
    ONNX is one line) or an OpenVINO IR graph (by content)."""
    path = Path(path)
    return path.suffix.lower() == ONNX_SUFFIX or (path.is_file() and is_ir(path))


class OnnxModel:
    """An ONNX segmentation model (normalized image (B, N, H, W) -> logits (B, C, H, W), as
    ``segnest export``/``quantize`` write it) called like a PyTorch model: a CPU batch
    (B, N, H, W) in, logits (B, C, H, W) out (the exported graph has a dynamic batch).
    With the file's ``metadata``, an input of other channels or a side below the
    documented ``min_side`` is a SegnestError."""

    def __init__(self, path: str | os.PathLike, threads: int | None = None,
                 metadata: dict[str, Any] | None = None) -> None:
        require_extra("onnxruntime", f"running {path}")
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        try:
            self.session = onnxruntime.InferenceSession(str(path), options,
                                                        providers=["CPUExecutionProvider"])
        except Exception as error:  # onnxruntime's own exception types
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise SegnestError(f"ONNX Runtime cannot load {path} ({reason}); export the "
                               "model again with segnest export") from None
        self.input_name = self.session.get_inputs()[0].name
        self.path = Path(path)
        graph_input = (metadata or {}).get("input") or {}
        self.in_channels = (metadata or {}).get("in_channels")
        self.min_side = int(graph_input.get("min_side") or 1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.path, self.in_channels, self.min_side)
        images = x.detach().cpu().float().contiguous().numpy()
        return torch.from_numpy(self.session.run(None, {self.input_name: images})[0])


def check_input(x: torch.Tensor, path: Path, in_channels: int | None, min_side: int) -> None:
    """Refuse a batch outside the limits an export's metadata documents (its channels, its
    smallest side) in one line, before the runtime sees it."""
    if x.ndim != 4 or (in_channels is not None and x.shape[1] != in_channels):
        raise SegnestError(f"{path} takes (N, {in_channels}, H, W) images, got "
                           f"shape {tuple(x.shape)}")
    if min(x.shape[-2:]) < min_side:
        raise SegnestError(
            f"{path} takes images of at least {min_side} pixels a side (its "
            f"metadata's min_side), got {x.shape[-2]} x {x.shape[-1]} at the working "
            "resolution; raise --base-size or the scales")


class CheckedIR:
    """An :class:`OpenVinoModel` whose inputs are checked against its metadata first, as
    :class:`OnnxModel`'s are: one line instead of the runtime's error from the graph's own
    guard (``export.MinSideGuard``), and a check for IRs exported before graphs held one."""

    def __init__(self, ir: OpenVinoModel, path: Path, metadata: dict[str, Any]) -> None:
        self.ir, self.path = ir, path
        self.in_channels = metadata.get("in_channels")
        self.min_side = int((metadata.get("input") or {}).get("min_side") or 1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.path, self.in_channels, self.min_side)
        return self.ir(x)


def load_exported_model(path: str | os.PathLike, *, precision: str | None = None,
                        device: str | None = None, compile: bool = False
                        ) -> tuple[Any, dict[str, Any]]:
    """``(runner, checkpoint-like record)`` of the export at ``path``: the model called like
    a PyTorch model on CPU batches, and what :class:`~segnest.inference.predictor.Predictor`
    and ``segnest eval`` read of a checkpoint (classes, palette, ``model_kwargs``,
    ``inference``, ``dataset``, and ``exported``: format and quantization), from the
    export's metadata. Flags that only apply to a PyTorch model are refused, not ignored."""
    path = Path(path)
    if not path.is_file():
        raise SegnestError(f"model {path} does not exist; pass a checkpoint (.pt) or a "
                           "model written by segnest export (--format onnx or openvino)")
    if device not in (None, "cpu"):
        raise SegnestError(f"{path} is an exported model that runs on the CPU; drop --device "
                           f"{device} or pass the checkpoint it was exported from")
    if compile:
        raise SegnestError(f"--compile applies to checkpoints; {path} is an exported "
                           "model, already optimised by its runtime: drop --compile")
    ir = is_ir(path)
    if not ir:
        require_extra("onnxruntime", f"running {path}")
    metadata = read_metadata(path)
    if metadata.get("graph") == "detection":
        outputs = ", ".join(metadata.get("outputs") or ("boxes", "labels", "scores"))
        raise SegnestError(
            f"{path} is a detection model ({metadata.get('model')}) exported to "
            f"{metadata.get('format', 'onnx')}: image -> {outputs}; segnest eval and predict "
            "take the checkpoint it was exported from (.pt), or run the file with its runtime "
            "(docs/detection.md)")
    if metadata.get("graph", "logits") != "logits":
        raise SegnestError(
            f"{path} is an end-to-end graph (image -> labels, its own resize inside), which "
            "eval and predict cannot run through their pipeline; export a logits graph "
            "(segnest export without --end-to-end) to measure it, or run it with its runtime")
    classes = list(metadata.get("classes") or ())
    if not classes:
        raise SegnestError(f"{path} records no classes in its metadata; export it again "
                           "with segnest export")
    if ir:
        dtype = resolve_precision(precision or "fp32", torch.device("cpu"))
        runner: Any = CheckedIR(OpenVinoModel(path, precision=precision_name(dtype)), path,
                                metadata)
    elif precision not in (None, "fp32", "auto"):
        raise SegnestError(f"--precision {precision}: ONNX Runtime runs {path} as it is (fp32, "
                           "or int8 where quantized); drop --precision, or export with "
                           "--format openvino for bf16")
    else:
        runner = OnnxModel(path, metadata=metadata)
    record = {
        "classes": classes,
        "palette": metadata.get("palette"),
        "dataset": metadata.get("dataset"),
        "iteration": metadata.get("iteration"),
        "model_name": metadata.get("model"),
        "model_kwargs": {"num_classes": len(classes),
                         "in_chans": int(metadata.get("in_channels") or 3)},
        "inference": {"base_size": metadata.get("base_size"), "mean": metadata.get("mean"),
                      "std": metadata.get("std")},
        "config": {},
        "exported": {"format": metadata.get("format"),
                     "quantization": metadata.get("quantization")},
    }
    return runner, record
