"""Where downloaded weights live: the torch.hub and Hugging Face hub caches, shared with
every other PyTorch tool on the machine, so a file fetched once (by segnest, timm or
torch.hub) is found again instead of downloaded twice.

- torch.hub: ``<torch.hub.get_dir()>/checkpoints/<file>`` (``$TORCH_HOME/hub``, else
  ``$XDG_CACHE_HOME/torch/hub``, else ``~/.cache/torch/hub``). A file named
  ``<name>-<hex>.<ext>`` carries the start of its sha256, checked on download (by
  torch.hub) and each time the cached file is used (as torch.hub's ``check_hash`` does).
- Hugging Face hub: ``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else
  ``$XDG_CACHE_HOME/huggingface/hub``, else ``~/.cache/huggingface/hub``, in the hub's
  layout (``models--<org>--<name>/refs/main`` names a commit, ``snapshots/<commit>/<file>``
  links to ``blobs/<sha256>``). Reading the cache needs nothing installed; downloading
  needs ``huggingface_hub`` (``pip install 'segnest[hub]'``). A blob named by a sha256 (a
  Git LFS file: weights are) is checked against it each time it is used; a copy outside
  that layout (a cache made without symbolic links) carries no hash to check.

``HF_HUB_OFFLINE=1`` (the hub's own switch) means no download is tried from either place:
a file that is not cached is one :class:`SegnestError` line saying what to download and
where to put it. Outside offline mode a failed download is the same line with the reason.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from segnest.errors import SegnestError
from segnest.runtime.files import atomic_path

_TRUE = {"1", "on", "yes", "true"}
_SHA256_NAME = re.compile(r"^[0-9a-f]{64}$")
_HASH_CHUNK = 1 << 20
HUB_INSTALL = "pip install 'segnest[hub]'"


def offline() -> bool:
    """Whether downloads are switched off (``HF_HUB_OFFLINE``, as the hub reads it)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def torch_hub_checkpoint_dir() -> Path:
    """torch.hub's folder for downloaded checkpoints (honours ``TORCH_HOME``)."""
    import torch.hub

    return Path(torch.hub.get_dir()) / "checkpoints"


def hf_hub_cache_dir() -> Path:
    """The Hugging Face hub cache (honours ``HF_HUB_CACHE`` and ``HF_HOME``)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache).expanduser() / "huggingface" / "hub"


def sha256_of(path: Path) -> str:
    """The file's sha256, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def check_sha256_prefix(path: Path, prefix: str, fix: str) -> None:
    """Refuse ``path`` unless its sha256 starts with ``prefix`` (torch.hub's ``check_hash``
    for a file named ``<name>-<prefix>.<ext>``); ``fix`` says what to do instead."""
    actual = sha256_of(path)[: len(prefix)]
    if actual != prefix:
        raise SegnestError(f"{path}: its sha256 starts with {actual}, not {prefix} as its name "
                           f"says; {fix}")


def _first_line(error: BaseException) -> str:
    return str(error).splitlines()[0] if str(error) else type(error).__name__


def _download_url(url: str, target: Path, hash_prefix: str | None) -> None:
    """``url`` to ``target`` atomically, its sha256 checked against ``hash_prefix``."""
    from torch.hub import download_url_to_file

    with atomic_path(target) as temp:
        download_url_to_file(url, str(temp), hash_prefix=hash_prefix, progress=True)


def cached_url_file(urls: tuple[str, ...], file_name: str, hash_prefix: str | None,
                    what: str) -> Path:
    """``file_name`` in torch.hub's checkpoint folder, downloaded from the first of ``urls``
    that answers when it is not there yet (unless offline); ``what`` names it in errors."""
    target = torch_hub_checkpoint_dir() / file_name
    if target.is_file():
        if hash_prefix:
            check_sha256_prefix(target, hash_prefix, "the download is damaged or incomplete: "
                                f"delete {target} and run again to download it anew")
        return target
    put = f"download {urls[0]} and put it at {target} (or pass the file's path to --pretrained)"
    if offline():
        raise SegnestError(f"{what} is not in the torch.hub cache and HF_HUB_OFFLINE is set: {put}")
    reasons = []
    for url in urls:
        try:
            print(f"segnest: downloading {what} from {url} to {target}")
            _download_url(url, target, hash_prefix)
            return target
        except (OSError, RuntimeError, ValueError) as error:  # network, HTTP, hash mismatch
            reasons.append(f"{url}: {_first_line(error)}")
    raise SegnestError(f"{what} could not be downloaded ({'; '.join(reasons)}): {put}")


def _repo_folder(repo_id: str) -> Path:
    return hf_hub_cache_dir() / ("models--" + repo_id.replace("/", "--"))


def _cached_hf_path(repo_id: str, file_name: str, revision: str) -> Path | None:
    folder = _repo_folder(repo_id)
    ref = folder / "refs" / revision
    commit = ref.read_text().strip() if ref.is_file() else revision
    path = folder / "snapshots" / commit / file_name
    return path if path.is_file() else None


def find_hf_file(repo_id: str, file_names: tuple[str, ...], revision: str = "main"
                 ) -> Path | None:
    """The first of ``file_names`` of ``repo_id`` already in the cache, or None."""
    for name in file_names:
        if (path := _cached_hf_path(repo_id, name, revision)) is not None:
            return path
    return None


def check_hf_blob(path: Path) -> None:
    """A cached hub file links to ``blobs/<sha256>`` (for weights, stored with Git LFS):
    the content must hash to that name. A copy without the link is not checked."""
    blob = path.resolve()
    if blob.parent.name != "blobs" or not _SHA256_NAME.match(blob.name):
        return
    actual = sha256_of(blob)
    if actual != blob.name:
        raise SegnestError(
            f"{path}: its sha256 is {actual[:12]}..., not {blob.name[:12]}... as the hub "
            f"recorded; the download is damaged: delete {blob} and run again to download it "
            "anew")


def _download_hf(repo_id: str, file_name: str, revision: str) -> Path:
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(repo_id, file_name, revision=revision,
                                cache_dir=hf_hub_cache_dir()))


def _hub_installed() -> bool:
    try:
        import huggingface_hub  # noqa: F401
    except ImportError:
        return False
    return True


def cached_hf_file(repo_id: str, file_names: tuple[str, ...], what: str,
                   revision: str = "main") -> Path:
    """The first of ``file_names`` of the hub repository ``repo_id`` found in the cache,
    else the first downloaded (with ``huggingface_hub``, unless offline); its blob hash is
    checked. ``what`` names it in errors."""
    if (path := find_hf_file(repo_id, file_names, revision)) is not None:
        check_hf_blob(path)
        return path
    url = f"https://huggingface.co/{repo_id}/resolve/{revision}/{file_names[0]}"
    put = (f"run once online with huggingface_hub installed ({HUB_INSTALL}; it fills "
           f"{hf_hub_cache_dir()}), or download {url} and pass its path to --pretrained")
    if offline():
        raise SegnestError(f"{what} is not in the Hugging Face cache and HF_HUB_OFFLINE is "
                           f"set: {put}")
    if not _hub_installed():
        raise SegnestError(f"{what} is not in the Hugging Face cache ({hf_hub_cache_dir()}) "
                           f"and huggingface_hub is not installed: {put}")
    try:
        print(f"segnest: downloading {what} ({repo_id}/{file_names[0]}) into {hf_hub_cache_dir()}")
        path = _download_hf(repo_id, file_names[0], revision)
    except Exception as error:  # huggingface_hub raises its own HTTP and network types
        raise SegnestError(f"{what} could not be downloaded ({_first_line(error)}): "
                           f"{put}") from error
    check_hf_blob(path)
    return path
