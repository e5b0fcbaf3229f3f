"""Checkpoint files: written atomically, checksummed, loaded without ever executing code.

A checkpoint is a plain dict of tensors and Python primitives written with ``torch.save``
through :func:`segnest.runtime.files.atomic_open`, so a crash at any moment leaves either the
old checkpoint or the new one. Loading always uses ``torch.load(weights_only=True)``: a
file that needs arbitrary unpickling is refused with an explanation, never loaded unsafely.
Every way loading can fail -- a damaged file, a file of another kind (ONNX, TorchScript,
safetensors, text, ...), a folder, no permission -- is one :class:`SegnestError` line that
says what the file is and what to pass instead (:func:`describe_file`).

Bit rot: ``torch.load`` does not notice a changed byte inside a tensor's storage, so
``save_checkpoint`` stores a SHA-256 over every tensor and scalar of the dict under
``"checksum"`` and ``load_checkpoint`` recomputes it. A bare state dict (all values tensors,
e.g. ``segnest pretrain --export``) is written without one, so other tools can still pass it
straight to ``load_state_dict``; files without a checksum load as before, except that a
training checkpoint (config and optimizer) without one, or a checksum of an unknown
algorithm, loads with a warning that names it.

What a training run stores in a checkpoint, and how it resumes, is
:mod:`segnest.engine`'s business.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import re
import warnings
import zipfile
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from segnest.errors import SegnestError
from segnest.runtime.files import atomic_open, remove_stale_temp_files

CHECKSUM_KEY = "checksum"
CHECKSUM_ALGORITHM = "sha256-tensors-v1"
_REFUSED_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")
_PASS_INSTEAD = ("pass a PyTorch checkpoint instead: a .pt file written by segnest train or "
                 "pretrain (e.g. <work-dir>/best.pt), or an official ResNeSt .pth for --pretrained")
# Leaves whose repr is the same in every process (unlike, say, an object's default repr).
_STABLE_LEAVES = (bool, int, float, complex, str, bytes, type(None), torch.dtype, torch.device)
_PARALLEL_FROM_BYTES = 16 * 2**20  # below this, starting threads costs more than it saves


def save_checkpoint(state: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Write ``state`` to ``path`` atomically with its checksum, creating the directory if
    needed. Temp files of writers that died mid-save are removed first; those of live
    writers in the same folder are left alone."""
    target = Path(path)
    state = dict(state)
    if not all(isinstance(value, torch.Tensor) for value in state.values()):
        state[CHECKSUM_KEY] = {"algorithm": CHECKSUM_ALGORITHM, "digest": state_checksum(state)}
    with atomic_open(target, "wb") as handle:
        remove_stale_temp_files(target.parent)
        torch.save(state, handle)


def load_checkpoint(
    path: str | os.PathLike, map_location: str | torch.device = "cpu", mmap: bool = False,
    verify: bool = True,
) -> dict[str, Any]:
    """Load a checkpoint dict with ``weights_only=True``, turning every failure into one line.

    ``mmap=True`` maps tensor storage lazily instead of reading it, which makes looking into
    many large checkpoints cheap -- with ``verify=False``: verifying the checksum reads every
    tensor (through the page cache, without copying them into memory). The returned dict
    no longer holds the ``"checksum"`` entry.
    """
    path = Path(path)
    if not path.exists():
        raise SegnestError(
            f"checkpoint {path} does not exist; "
            "check the path given to --checkpoint / --resume / --pretrained"
        )
    # torch.load reads safetensors files too where that package is installed (nncf, timm
    # and transformers bring it): a checkpoint is refused as one either way (segnest writes
    # none; --pretrained reads them itself).
    if _is_safetensors_file(path):
        raise SegnestError(f"checkpoint {path} is {describe_file(path)}")
    # A truncated zip lacks its central directory, which torch cannot map; such a file is
    # read normally so that it fails with the ordinary corruption error below.
    use_mmap = mmap and zipfile.is_zipfile(path)
    try:
        with warnings.catch_warnings():
            # torch announces it will hand a TorchScript file to torch.jit.load; it then
            # refuses to (weights_only), and the error below says what the file is.
            warnings.filterwarnings("ignore", message=".*looks like a TorchScript archive")
            state = torch.load(path, map_location=map_location, weights_only=True,
                               mmap=use_mmap)
    except Exception as error:  # whatever a foreign or damaged file makes torch raise
        raise _load_error(path, error) from error
    if not isinstance(state, Mapping):
        raise SegnestError(
            f"checkpoint {path} holds a {type(state).__name__}, not a dict; "
            "save checkpoints as a dict such as {'model': model.state_dict()}"
        )
    state = dict(state)
    stored = state.pop(CHECKSUM_KEY, None)
    if not verify:
        return state
    algorithm = stored.get("algorithm") if isinstance(stored, Mapping) else None
    if algorithm == CHECKSUM_ALGORITHM:
        if state_checksum(state) != stored.get("digest"):
            raise SegnestError(
                f"checkpoint {path} fails its checksum: its tensors changed since it was "
                f"written (disk or copy error); use an earlier checkpoint{_siblings(path)} "
                "or --resume auto"
            )
    elif stored is not None:
        warnings.warn(f"checkpoint {path} carries a checksum of unknown kind ({algorithm!r}; "
                      f"this segnest checks {CHECKSUM_ALGORITHM!r}), so it loads unverified; "
                      "a newer segnest may have written it", stacklevel=2)
    elif is_training_checkpoint(state):
        warnings.warn(f"checkpoint {path} is a segnest training checkpoint (config and "
                      "optimizer) without the checksum segnest writes, so it was saved by "
                      "another tool or altered since, and loads unverified", stacklevel=2)
    return state


def is_training_checkpoint(state: Mapping[str, Any]) -> bool:
    """Whether ``state`` claims to be a segnest training checkpoint: it carries the run's
    config and its optimizer state, which only ``segnest train``/``pretrain`` write."""
    return isinstance(state.get("config"), Mapping) and "optimizer" in state


def check_state_dict_target(target: str | os.PathLike, flag: str,
                            reserved: Mapping[Path, str]) -> None:
    """Refuse, before any work, a place a bare state dict cannot be written: a folder, a
    path below a file, one of the ``reserved`` paths (resolved path -> what it is, e.g. the
    run's own checkpoints, which exist only later) or an existing file other than an
    earlier bare state dict. What the file is is decided by loading it (lazily, its
    tensors not read), never by its name."""
    target = Path(target)
    if target.is_dir():
        raise SegnestError(f"{flag} {target} is a folder; give a file name, e.g. "
                           f"{flag} {target / 'backbone.pth'}")
    blocking = next((parent for parent in target.parents if parent.is_file()), None)
    if blocking is not None:
        raise SegnestError(f"{flag} {target}: {blocking} is a file, not a folder; choose "
                           "another location")
    resolved = target.resolve()
    if resolved in reserved:
        raise SegnestError(f"{flag} {target} is {reserved[resolved]}, which this run writes "
                           "itself; choose another file name")
    if not target.exists():
        return
    try:
        state = load_checkpoint(target, mmap=True, verify=False)
    except SegnestError:
        what = "it is not a PyTorch checkpoint that loads"
    else:
        if state and all(isinstance(value, torch.Tensor) for value in state.values()):
            return
        what = ("it is a segnest training checkpoint" if is_training_checkpoint(state)
                else "it holds more than tensors")
    raise SegnestError(f"{flag} {target} exists and is not an earlier bare state dict ({what}); "
                       "choose another file name or delete that file yourself")


def state_checksum(state: Mapping[str, Any]) -> str:
    """SHA-256 over every tensor (dtype, shape, bytes) and scalar of ``state``, nested dicts
    and lists included, in the dict's own order (which ``torch.save`` keeps); the
    ``"checksum"`` entry itself is left out.

    Each tensor gets its own SHA-256, which enters the overall one in place of its bytes:
    the tensors are hashed on several threads (hashlib releases the GIL), which keeps the
    checksum a fraction of the time ``torch.save`` takes.
    """
    parts: list[bytes | torch.Tensor] = []
    _flatten({k: v for k, v in state.items() if k != CHECKSUM_KEY}, parts)
    tensors = [part for part in parts if isinstance(part, torch.Tensor)]
    if sum(t.numel() * t.element_size() for t in tensors) > _PARALLEL_FROM_BYTES:
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            tensor_digests = iter(list(pool.map(_tensor_digest, tensors)))
    else:
        tensor_digests = iter([_tensor_digest(t) for t in tensors])
    digest = hashlib.sha256()
    for part in parts:
        digest.update(next(tensor_digests) if isinstance(part, torch.Tensor) else part)
    return digest.hexdigest()


def _flatten(value: Any, parts: list[bytes | torch.Tensor]) -> None:
    """``value`` as a stream of structure bytes and tensors, depth first."""
    if isinstance(value, torch.Tensor):
        parts.append(f"tensor:{value.dtype}:{tuple(value.shape)};".encode())
        parts.append(value)
    elif isinstance(value, Mapping):
        parts.append(b"{%d" % len(value))
        for key, item in value.items():
            _flatten(key, parts)
            _flatten(item, parts)
    elif isinstance(value, list | tuple):
        parts.append(b"[%d" % len(value))
        for item in value:
            _flatten(item, parts)
    elif isinstance(value, _STABLE_LEAVES):
        parts.append(f"{type(value).__name__}:{value!r};".encode())
    else:
        parts.append(f"{type(value).__name__};".encode())


def _tensor_digest(tensor: torch.Tensor) -> bytes:
    tensor = tensor.detach()
    if tensor.device.type == "meta":
        return b"meta"
    if tensor.layout != torch.strided:
        tensor = tensor.to_dense()
    # Raw bytes whatever the dtype (numpy has no bfloat16): a flat contiguous uint8 view,
    # which costs no copy for a CPU tensor that is already contiguous (e.g. mmap-loaded).
    data = tensor.resolve_conj().resolve_neg().cpu().contiguous().reshape(-1)
    return hashlib.sha256(memoryview(data.view(torch.uint8).numpy())).digest()


def _siblings(path: Path, limit: int = 2) -> str:
    """' such as iter_200.pt, last.pt beside it' naming the newest other checkpoints."""
    try:
        others = sorted((p for p in path.parent.glob("*.pt") if p.name != path.name),
                        key=lambda p: p.stat().st_mtime, reverse=True)[:limit]
    except OSError:
        return ""
    return f" such as {', '.join(p.name for p in others)} beside it" if others else ""


def _load_error(path: Path, error: Exception) -> SegnestError:
    if isinstance(error, PermissionError) or (path.is_file() and not os.access(path, os.R_OK)):
        return SegnestError(
            f"cannot read checkpoint {path}: permission denied; make it readable "
            f"(chmod u+r {path}) or pass a copy you can read"
        )
    description = describe_file(path)
    if description is not None:
        return SegnestError(f"checkpoint {path} is {description}")
    if isinstance(error, pickle.UnpicklingError):
        refused = _REFUSED_GLOBAL.search(str(error))
        if refused is not None or "global" in str(error).lower():
            what = refused.group(1) if refused else "a Python object"
            return SegnestError(
                f"checkpoint {path} contains pickled Python code or objects ({what}); segnest "
                "loads only weights (torch.load with weights_only=True) and never unpickles "
                "code; re-save it from trusted code with plain tensors, e.g. "
                "torch.save({'model': model.state_dict()}, path)"
            )
    reason = str(error).splitlines()[0] if str(error) else type(error).__name__
    return SegnestError(
        f"checkpoint {path} is corrupt or truncated ({reason}); use an earlier one or "
        "--resume auto"
    )


def describe_file(path: str | os.PathLike) -> str | None:
    """What ``path`` is when it is not a PyTorch checkpoint, and what to pass instead, as
    the end of a sentence ("checkpoint X is ..."); None when it looks like a PyTorch
    checkpoint (so a failure to load it means damage) or is not recognised.

    Recognised: a folder, an empty file, TorchScript, torch.export (.pt2), ONNX,
    safetensors, other zip archives, NumPy, HDF5 (Keras), images, gzip/tar archives, web
    pages, Git LFS pointers and other text.
    """
    path = Path(path)
    if path.is_dir():
        try:
            inside = sorted(p.name for p in path.iterdir() if p.suffix in (".pt", ".pth"))[:3]
        except OSError:
            inside = []
        example = ", ".join(str(path / name) for name in inside) or f"{path / 'best.pt'}"
        return f"a folder, not a file; pass the checkpoint file inside it, e.g. {example}"
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            head = handle.read(4096)
    except OSError:
        return None
    if size == 0:
        return ("empty (0 bytes): corrupt or truncated, e.g. by an interrupted copy or a full "
                "disk; use an earlier checkpoint or --resume auto")
    if zipfile.is_zipfile(path):
        return _describe_zip(path)
    if head.startswith((b"PK", b"\x80")) or b"PK\x03\x04".startswith(head):
        return None  # the start of a zip or a pickle, torch's own formats: damaged
    if _is_safetensors(head, size):
        return ("a safetensors file, not a PyTorch checkpoint; convert it with "
                "torch.save({'model': safetensors.torch.load_file(path)}, 'model.pt') "
                "and pass model.pt")
    if path.suffix.lower() == ".onnx" or _is_onnx(head):
        return ("an ONNX model (e.g. from segnest export), which runs in ONNX Runtime; "
                "segnest needs the PyTorch checkpoint it was exported from, e.g. best.pt")
    for magic, what in _MAGIC:
        if head.startswith(magic):
            return f"{what}, not a PyTorch checkpoint; {_PASS_INSTEAD}"
    if head[257:262] == b"ustar":
        return f"a tar archive; unpack it and pass the checkpoint inside, or {_PASS_INSTEAD}"
    return _describe_text(head)


_MAGIC = (
    (b"\x89HDF\r\n\x1a\n", "an HDF5 file (e.g. Keras or TensorFlow weights)"),
    (b"\x93NUMPY", "a NumPy array file (.npy)"),
    (b"\x89PNG", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"GIF8", "a GIF image"),
    (b"\x1f\x8b", "a gzip-compressed file (e.g. .tar.gz); unpack it first"),
)


def _describe_zip(path: Path) -> str | None:
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError):
        return None
    if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
        return ("a TorchScript program (torch.jit.save, e.g. segnest export --format "
                "torchscript); segnest loads weights only and never runs saved code, so pass "
                "the .pt checkpoint it was exported from, e.g. best.pt")
    if any(n.endswith(("/archive_format", "serialized_exported_program.json",
                       "/models/model.json")) for n in names):
        return ("a torch.export program (.pt2, from torch.export.save), not a checkpoint; "
                "pass the .pt checkpoint its model was trained into, e.g. best.pt")
    if any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
        return None  # a torch.save archive: if it fails to load, it is damaged
    if names and all(n.endswith(".npy") for n in names):
        return f"a NumPy archive (.npz), not a PyTorch checkpoint; {_PASS_INSTEAD}"
    shown = ", ".join(names[:3]) or "nothing"
    return (f"a zip archive holding {shown}, not a PyTorch checkpoint; unpack it and pass "
            f"the checkpoint inside, or {_PASS_INSTEAD}")


def _is_safetensors(head: bytes, size: int) -> bool:
    """An 8-byte little-endian header length, then the JSON header itself."""
    if len(head) < 10:
        return False
    header_length = int.from_bytes(head[:8], "little")
    return 2 <= header_length <= size - 8 and head[8:9] == b"{"


def _is_safetensors_file(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            head = handle.read(16)
        return _is_safetensors(head, path.stat().st_size)
    except OSError:
        return False  # the loader reports an unreadable file


def _is_onnx(head: bytes) -> bool:
    """A ModelProto starts with field 1 (ir_version, a varint) and then a length-delimited
    field (producer name, graph, ...): tag 0x08, a small varint, a tag of wire type 2."""
    if len(head) < 3 or head[0] != 0x08 or not 1 <= head[1] <= 0x7F:
        return False
    return head[2] in (0x12, 0x1A, 0x22, 0x2A, 0x32, 0x3A, 0x42)


def _describe_text(head: bytes) -> str | None:
    text = head.decode("utf-8", errors="ignore")
    if not text or len(text.encode()) < 0.9 * len(head):
        return None
    printable = sum(ch.isprintable() or ch in "\t\r\n" for ch in text)
    if printable < 0.95 * len(text):
        return None
    lowered = text.lstrip().lower()
    if lowered.startswith("version https://git-lfs"):
        return ("a Git LFS pointer, not the weights themselves; fetch them with "
                "'git lfs pull' and pass the file again")
    if lowered.startswith(("<!doctype html", "<html")):
        return ("a web page, not weights: the download saved an HTML page (a sign-in or "
                "redirect page?); download the file itself and pass it again")
    first_line = text.strip().splitlines()[0][:40] if text.strip() else ""
    return f"a text file (it begins {first_line!r}), not a PyTorch checkpoint; {_PASS_INSTEAD}"
