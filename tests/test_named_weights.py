"""--pretrained NAME: official and timm ImageNet weights found in the standard caches, hash
checked, one line when they cannot be had. No test touches the network: the caches are
folders made here, and the download functions are replaced."""

import hashlib
import shutil
from pathlib import Path

import pytest
import torch

from segnest.errors import SegnestError
from segnest.models import create_model, load_pretrained
from segnest.models.resnest import RESNEST_VARIANTS
from segnest.models.weights import NAMED_WEIGHTS, TIMM_BACKBONES, resolve_pretrained
from segnest.runtime import hub

TIMM_14 = "timm:resnest14d.gluon_in1k"


@pytest.fixture(autouse=True)
def caches(tmp_path, monkeypatch):
    """Empty torch.hub and Hugging Face caches under tmp_path; downloads fail the test."""
    for name in ("HF_HUB_CACHE", "HF_HOME", "HF_HUB_OFFLINE", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))

    def no_network(*args, **kwargs):
        raise AssertionError("a test tried to download")

    monkeypatch.setattr(hub, "_download_url", no_network)
    monkeypatch.setattr(hub, "_download_hf", no_network)
    return tmp_path


def classifier_state(backbone: str = "resnest14", seed: int = 0) -> dict:
    torch.manual_seed(seed)
    return create_model(backbone, num_classes=1000).state_dict()


def put_in_hf_cache(hub_cache: Path, repo_id: str, file_name: str, state: dict,
                    commit: str = "0123abcd" * 5) -> Path:
    """``state`` saved where huggingface_hub would have put it: a blob named by its sha256,
    a snapshot link to it, refs/main naming the commit."""
    folder = hub_cache / ("models--" + repo_id.replace("/", "--"))
    (folder / "blobs").mkdir(parents=True)
    saved = folder / "saved"
    torch.save(state, saved)
    blob = folder / "blobs" / hashlib.sha256(saved.read_bytes()).hexdigest()
    saved.rename(blob)
    snapshot = folder / "snapshots" / commit / file_name
    snapshot.parent.mkdir(parents=True)
    snapshot.symlink_to(Path("../..") / "blobs" / blob.name)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(commit)
    return snapshot


@pytest.mark.parametrize("timm_name, backbone", [("resnest14d", "resnest14"),
                                                 ("resnest26d", "resnest26")])
def test_timm_small_resnest_state_dicts_load_key_for_key(timm_name, backbone):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    source = timm.create_model(timm_name, pretrained=False).state_dict()
    model = create_model(backbone, num_classes=1000)
    assert set(model.state_dict()) == set(source)
    model.load_state_dict(source, strict=True)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, source[key], atol=0, rtol=0, msg=key)
    assert TIMM_BACKBONES[timm_name] == backbone


def test_timm_name_loads_from_the_hugging_face_cache_into_a_segmentation_model(caches):
    state = classifier_state()
    cached = put_in_hf_cache(caches / "hf" / "hub", "timm/resnest14d.gluon_in1k",
                             "pytorch_model.bin", state)
    model = create_model("deeplabv3_resnest14", num_classes=3)
    report = load_pretrained(model, TIMM_14)
    assert report.path == cached
    assert report.loaded == len(state) - 2  # every backbone tensor, fc.weight/bias skipped
    for key, value in model.backbone.state_dict().items():
        torch.testing.assert_close(value, state[key], atol=0, rtol=0, msg=key)


def test_hf_hub_cache_variable_beats_hf_home(caches, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(caches / "elsewhere"))
    cached = put_in_hf_cache(caches / "elsewhere", "timm/resnest14d.gluon_in1k",
                             "pytorch_model.bin", classifier_state())
    assert resolve_pretrained("timm:resnest14d") == cached  # the default tag's short name


def test_a_damaged_cached_blob_is_refused(caches):
    cached = put_in_hf_cache(caches / "hf" / "hub", "timm/resnest14d.gluon_in1k",
                             "pytorch_model.bin", classifier_state())
    with open(cached.resolve(), "r+b") as blob:
        blob.seek(200)
        blob.write(b"\x00" * 16)
    with pytest.raises(SegnestError, match="sha256.*damaged"):
        resolve_pretrained(TIMM_14)


def test_offline_without_the_file_is_one_line_saying_what_to_fetch_and_where(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SegnestError) as err:
        resolve_pretrained(TIMM_14)
    message = str(err.value)
    assert "\n" not in message and "HF_HUB_OFFLINE" in message
    assert "https://huggingface.co/timm/resnest14d.gluon_in1k/resolve/main/" in message
    with pytest.raises(SegnestError) as err:
        resolve_pretrained("resnest50")
    message = str(err.value)
    assert "\n" not in message
    assert "releases/download/weights_step1/resnest50-528c19ca.pth" in message
    assert str(hub.torch_hub_checkpoint_dir() / "resnest50-528c19ca.pth") in message


def test_without_huggingface_hub_a_missing_timm_file_names_the_extra(monkeypatch):
    monkeypatch.setattr(hub, "_hub_installed", lambda: False)
    with pytest.raises(SegnestError, match=r"segnest\[hub\]"):
        resolve_pretrained(TIMM_14)


def test_missing_timm_weights_are_fetched_once_into_the_cache(caches, monkeypatch):
    calls = []
    state = classifier_state()

    def fake_download(repo_id, file_name, revision):
        calls.append((repo_id, file_name))
        return put_in_hf_cache(hub.hf_hub_cache_dir(), repo_id, file_name, state)

    monkeypatch.setattr(hub, "_hub_installed", lambda: True)
    monkeypatch.setattr(hub, "_download_hf", fake_download)
    first = resolve_pretrained(TIMM_14)
    assert resolve_pretrained(TIMM_14) == first
    assert len(calls) == 1 and calls[0][0] == "timm/resnest14d.gluon_in1k"
    assert first.is_relative_to(caches / "hf" / "hub")


def test_official_name_is_fetched_into_torch_home_with_its_hash_prefix(caches, monkeypatch):
    calls = []

    def fake_download(url, target, hash_prefix):
        calls.append((url, hash_prefix))
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(b"pretend")

    monkeypatch.setattr(hub, "_download_url", fake_download)
    path = resolve_pretrained("resnest101")
    assert path == caches / "torch" / "hub" / "checkpoints" / "resnest101-22405ba7.pth"
    assert calls == [("https://github.com/zhanghang1989/ResNeSt/releases/download/"
                      "weights_step1/resnest101-22405ba7.pth", "22405ba7")]


def test_a_cached_official_file_with_the_wrong_content_is_refused(caches):
    folder = caches / "torch" / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    torch.save(classifier_state(), folder / "resnest50-528c19ca.pth")
    with pytest.raises(SegnestError, match="sha256 starts with"):
        load_pretrained(create_model("resnest50"), "resnest50")


def test_named_weights_for_another_backbone_say_which_backbone_they_fit(caches):
    put_in_hf_cache(caches / "hf" / "hub", "timm/resnest14d.gluon_in1k", "pytorch_model.bin",
                    classifier_state())
    small = create_model("deeplabv3_resnest14", num_classes=3, stage_width=16, stem_width=16)
    with pytest.raises(SegnestError, match="use --backbone resnest14 without --stage-width"):
        load_pretrained(small, TIMM_14)


def test_an_unknown_name_lists_the_known_ones():
    with pytest.raises(SegnestError) as err:
        resolve_pretrained("timm:resnest99")
    assert TIMM_14 in str(err.value) and "resnest269" in str(err.value)


def test_a_local_file_named_like_weights_wins_over_the_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save(classifier_state(), tmp_path / "resnest50")
    assert resolve_pretrained("resnest50") == Path("resnest50")


def test_safetensors_files_load_like_pickled_ones(caches):
    safetensors = pytest.importorskip("safetensors.torch")
    state = classifier_state()
    cached = put_in_hf_cache(caches / "hf" / "hub", "timm/resnest14d.gluon_in1k",
                             "model.safetensors", {})
    blob = cached.resolve()
    blob.unlink()
    safetensors.save_file(state, str(caches / "st"))
    digest = hashlib.sha256((caches / "st").read_bytes()).hexdigest()
    shutil.move(caches / "st", blob.parent / digest)
    cached.unlink()
    cached.symlink_to(Path("../..") / "blobs" / digest)
    model = create_model("resnest14", num_classes=1000)
    report = load_pretrained(model, TIMM_14)
    assert report.path == cached and report.loaded == len(state)


def test_every_timm_name_maps_to_a_segnest_backbone():
    for name, weights in NAMED_WEIGHTS.items():
        assert weights.backbone in RESNEST_VARIANTS
        assert name.startswith("timm:") or name == weights.backbone


def test_a_failed_download_is_one_line_with_each_reason(monkeypatch):
    def unreachable(url, target, hash_prefix):
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")

    monkeypatch.setattr(hub, "_download_url", unreachable)
    with pytest.raises(SegnestError) as err:
        resolve_pretrained("resnest200")
    message = str(err.value)
    assert "\n" not in message and message.count("name resolution") == 2
    assert "put it at" in message


def test_train_takes_timm_weights_by_name_from_the_cache_and_says_what_it_loaded(
        caches, folder_dataset, capsys):
    from segnest.cli import main

    state = classifier_state()
    cached = put_in_hf_cache(caches / "hf" / "hub", "timm/resnest14d.gluon_in1k",
                             "pytorch_model.bin", state)
    flags = ["train", "--dataset", "folder", "--data-root", str(folder_dataset),
             "--pretrained", TIMM_14, "--iters", "1", "--batch-size", "2", "--base-size", "48",
             "--crop-size", "32", "--workers", "0", "--device", "cpu", "--head-channels", "16",
             "--no-tensorboard", "--work-dir", str(caches / "run")]
    assert main(flags) == 0
    said = capsys.readouterr().out
    assert f"loaded {len(state) - 2} backbone tensors from {TIMM_14} ({cached})" in said
    assert "from scratch" not in said

    # Offline without the file: one line, no run folder.
    shutil.rmtree(caches / "hf")
    os_env = {"HF_HUB_OFFLINE": "1"}
    with pytest.MonkeyPatch.context() as patch:
        for key, value in os_env.items():
            patch.setenv(key, value)
        assert main(flags[:-1] + [str(caches / "run2")]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "HF_HUB_OFFLINE" in err[0] and "resnest14d.gluon_in1k" in err[0]
    assert not (caches / "run2").exists()  # refused before the work folder was made


def test_a_damaged_official_file_in_the_torch_hub_cache_is_refused_with_what_to_delete(caches):
    """As torch.hub's check_hash: the cached file's sha256 must start with the hex digits of
    its name; resolving the name already refuses it, naming the file to delete, and does not
    download over it."""
    folder = caches / "torch" / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    cached = folder / "resnest50-528c19ca.pth"
    cached.write_bytes(b"truncated download")
    with pytest.raises(SegnestError) as err:
        resolve_pretrained("resnest50")
    message = str(err.value)
    assert "\n" not in message and "not 528c19ca" in message
    assert f"delete {cached} and run again to download it anew" in message
    assert cached.read_bytes() == b"truncated download"


def test_a_damaged_hub_blob_names_the_blob_to_delete(caches):
    cached = put_in_hf_cache(caches / "hf" / "hub", "timm/resnest14d.gluon_in1k",
                             "pytorch_model.bin", classifier_state())
    blob = cached.resolve()
    blob.write_bytes(blob.read_bytes()[:-10])  # a truncated download
    with pytest.raises(SegnestError) as err:
        load_pretrained(create_model("resnest14", num_classes=1000), TIMM_14)
    message = str(err.value)
    assert "\n" not in message and f"delete {blob} and run again" in message
