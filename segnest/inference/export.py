"""``segnest export``: a checkpoint as a TorchScript or ONNX inference model, verified.

The exported graph takes one normalized image ``(1, N, H, W)`` (N = 3, RGB with ImageNet
mean/std unless the checkpoint was trained with ``--in-channels``/``--mean``/``--std``:
its ``inference`` entry holds them) and returns logits ``(1, C, H, W)``; apply argmax over
dimension 1 for the class map. Both formats are exported with dynamic height and width and
checked against PyTorch (max abs difference <= 1e-4) at the example size ``--size`` and at a
second, non-square size before the file is written (atomically). Should the second check
fail, the export is kept for the example size only, and the message says so.

``--out`` may replace only an earlier export in the same format (a TorchScript archive, an
ONNX model); the checkpoint, another checkpoint or any other file already there is refused
before the export starts, as is a folder that cannot be written.
"""

from __future__ import annotations

import math
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from segnest.config import MIN_INPUT_SIZE, ExportConfig, validate_config
from segnest.errors import SegnestError
from segnest.inference.outputs import identities, prepare_folder, refuse_input_file, resolved
from segnest.models import model_from_checkpoint
from segnest.runtime.checkpoint import load_checkpoint
from segnest.runtime.files import atomic_path

SUFFIXES = {"torchscript": ".torchscript.pt", "onnx": ".onnx"}
ONNX_OPSET = 17
TOLERANCE = 1e-4


class LogitsOnly(nn.Module):
    """The segmentation model in eval mode, returning the main logits as a plain tensor."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model.eval()

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        out = self.model(image)
        return out["out"] if isinstance(out, dict) else out


def _export_torchscript(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    with warnings.catch_warnings():
        # torch.jit's deprecation notices are for segnest's maintainers, not its users.
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(model, example, check_trace=False)
        traced.save(str(path))


def _export_onnx(model: nn.Module, example: torch.Tensor, path: Path, dynamic: bool) -> None:
    # The TorchScript-based exporter (dynamo=False) needs no extra package; the dynamo
    # exporter needs onnxscript and is only the fallback for a torch without the former.
    axes = {2: "height", 3: "width"}
    kwargs: dict[str, Any] = dict(
        input_names=["image"], output_names=["logits"], opset_version=ONNX_OPSET,
        dynamic_axes={"image": axes, "logits": axes} if dynamic else None,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        try:
            torch.onnx.export(model, (example,), str(path), dynamo=False, **kwargs)
            return
        except TypeError:
            pass
        try:
            import onnxscript  # noqa: F401
        except ImportError:
            raise SegnestError(
                "ONNX export with this torch version needs the onnxscript package; install "
                "it with 'pip install onnxscript onnx onnxruntime' or use --format torchscript"
            ) from None
        torch.onnx.export(model, (example,), str(path), dynamo=True, external_data=False,
                          **kwargs)


def _run_exported(fmt: str, path: Path, x: torch.Tensor) -> torch.Tensor | None:
    """The exported model's output on ``x``; None when no runtime is installed (ONNX)."""
    if fmt == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            loaded = torch.jit.load(str(path), map_location="cpu")
        with torch.inference_mode():
            return loaded(x)
    try:
        import onnxruntime
    except ImportError:
        return None
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {"image": x.numpy()})[0])


def _check_sizes(size: int) -> list[tuple[int, int]]:
    """The example size and a second, non-square one, to prove H and W are not baked in."""
    other = max(MIN_INPUT_SIZE, (size * 3 // 4) // 8 * 8)
    return [(size, size), (other, size + 8)]


def run_export(cfg: ExportConfig) -> Path:
    """Export the checkpoint's model; raises SegnestError when the check fails."""
    cfg = validate_config(cfg)  # as the command line does, for callers from Python
    fmt = cfg.format
    source = Path(cfg.checkpoint)
    target = Path(cfg.out) if cfg.out else source.with_name(source.stem + SUFFIXES[fmt])
    _check_target(target, source, fmt)
    checkpoint = load_checkpoint(cfg.checkpoint)
    model = LogitsOnly(model_from_checkpoint(checkpoint, source=str(cfg.checkpoint))).eval()

    generator = torch.Generator().manual_seed(0)
    channels = int(checkpoint.get("model_kwargs", {}).get("in_chans", 3))
    inputs = [torch.randn(1, channels, h, w, generator=generator)
              for h, w in _check_sizes(cfg.size)]
    with atomic_path(target) as temp:
        _export(fmt, model, inputs[0], temp, dynamic=True)
        differences = _differences(fmt, model, temp, inputs)
        dynamic = differences is None or differences[1] <= TOLERANCE
        if not dynamic:
            # The graph baked in the example size somewhere: keep a fixed-size export.
            if fmt == "onnx":
                _export(fmt, model, inputs[0], temp, dynamic=False)
            differences = _differences(fmt, model, temp, inputs[:1])
        if differences is not None and differences[0] > TOLERANCE:
            raise SegnestError(
                f"exported {fmt} model differs from PyTorch by up to {differences[0]:.2e} "
                f"(tolerance {TOLERANCE:g}); the export is not faithful, not writing {target}"
            )

    if differences is None:
        check = "not verified: onnxruntime is not installed (pip install onnxruntime)"
    else:
        check = f"max abs difference to PyTorch {max(differences):.2e}"
    shape = ("any H and W" if dynamic
             else f"fixed input size {cfg.size}x{cfg.size} only (re-export with --size)")
    print(f"exported {fmt} to {target}: normalized image (1,{channels},H,W) -> logits (1,C,H,W), "
          f"{shape}; {check}")
    return target


def _check_target(target: Path, checkpoint: Path, fmt: str) -> None:
    """Refuse a target that is the checkpoint or an existing file other than an earlier
    ``fmt`` export; create its folder."""
    if target.is_dir():
        raise SegnestError(f"--out {target} is a folder; give a file name, e.g. "
                           f"--out {target / ('model' + SUFFIXES[fmt])}")
    refuse_input_file(target, identities({checkpoint: f"the checkpoint {checkpoint}"}),
                      "--out")
    if target.exists() and not _is_export(target, fmt):
        raise SegnestError(f"--out {target} exists and is not a {fmt} export; choose another "
                           "file name or delete that file yourself")
    prepare_folder(resolved(target).parent, "--out's folder")


def _is_export(path: Path, fmt: str) -> bool:
    """Whether ``path`` holds an earlier export in ``fmt``: a TorchScript archive is a zip
    with ``constants.pkl`` and ``code/``, which a torch.save checkpoint lacks; an ONNX model
    is a protobuf starting with its ir_version field (byte 0x08), where a torch.save file
    starts with a zip or pickle header."""
    try:
        if fmt == "torchscript":
            if not zipfile.is_zipfile(path):
                return False
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
            return (any(name.endswith("/constants.pkl") for name in names)
                    and any("/code/" in name for name in names))
        with open(path, "rb") as handle:
            return handle.read(1) == b"\x08"
    except (OSError, zipfile.BadZipFile):
        return False


def _export(fmt: str, model: nn.Module, example: torch.Tensor, path: Path, dynamic: bool) -> None:
    with torch.no_grad():
        if fmt == "torchscript":
            _export_torchscript(model, example, path)
        else:
            _export_onnx(model, example, path, dynamic)


def _differences(fmt: str, model: nn.Module, path: Path,
                 inputs: list[torch.Tensor]) -> list[float] | None:
    """Max abs difference to PyTorch per input (inf on a shape mismatch or a runtime
    failure); None when the format's runtime is not installed."""
    differences = []
    for x in inputs:
        try:
            exported = _run_exported(fmt, path, x)
        except Exception:  # a runtime failure (onnxruntime raises its own types): wrong size
            differences.append(math.inf)
            continue
        if exported is None:
            return None
        with torch.inference_mode():
            reference = model(x)
        if exported.shape != reference.shape:
            differences.append(math.inf)
        else:
            differences.append(float((exported - reference).abs().max()))
    return differences
