"""Specs for the label census and the label checks that run before training."""

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segnest import cli
from segnest.commands.config import resolve_config
from segnest.data import FolderDataset, build_dataset
from segnest.data.census import check_train_labels, take_census
from segnest.errors import SegnestError
from segnest.inference import evaluate as evaluate_module
from segnest.inference.config import EvalConfig
from segnest.runtime.checkpoint import load_checkpoint
from segnest.tasks.segmentation.config import TrainConfig
from segnest.tasks.segmentation.task import run_train


@pytest.fixture(autouse=True)
def _census_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SEGNEST_CACHE", str(tmp_path / "cache"))


def _write(root: Path, classes: str, masks: list[np.ndarray], split: str = "train") -> Path:
    """A folder dataset whose ``split`` has one noise image per mask (2-D ids or HxWx3)."""
    (root / "images" / split).mkdir(parents=True, exist_ok=True)
    (root / "masks" / split).mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text(classes)
    rng = np.random.default_rng(0)
    for index, mask in enumerate(masks):
        image = rng.integers(0, 256, (*mask.shape[:2], 3), dtype=np.uint8)
        Image.fromarray(image).save(root / "images" / split / f"m{index}.png")
        Image.fromarray(mask.astype(np.uint8)).save(root / "masks" / split / f"m{index}.png")
    return root


def _halves(left: int, right: int, size: int = 8) -> np.ndarray:
    mask = np.full((size, size), left, np.uint8)
    mask[:, size // 2:] = right
    return mask


def _binary(root: Path, count: int = 4, size: int = 40) -> Path:
    """Two classes, foreground stored as 255: the common binary-mask convention."""
    masks = []
    for index in range(count):
        mask = np.zeros((size, size), np.uint8)
        mask[4 + index:20 + index, 8:30] = 255
        masks.append(mask)
    _write(root, "background\nforeground\n", masks, "train")
    return _write(root, "background\nforeground\n", masks[:2], "val")


def test_census_counts_pixels_per_value_and_names_all_ignore_masks(tmp_path):
    root = _write(tmp_path, "a\nb\nc\n", [_halves(0, 1), _halves(1, 255), np.full((8, 8), 255)])
    census = take_census(FolderDataset(root))
    assert census.num_masks == 3 and not census.cached
    assert census.raw_counts == {0: 32, 1: 64, 255: 96}
    assert census.train_id_counts == census.raw_counts
    assert [Path(p).name for p in census.all_ignore] == ["m2.png"]
    assert Path(census.examples[1]).name == "m0.png"


def test_second_census_reads_no_mask_and_a_changed_mask_is_counted_again(tmp_path,
                                                                         monkeypatch):
    root = _write(tmp_path, "a\nb\n", [_halves(0, 1), _halves(0, 1)])
    first = take_census(FolderDataset(root))

    def unread(self, path):
        raise AssertionError("a mask was read although the census was cached")

    with monkeypatch.context() as patch:
        patch.setattr(FolderDataset, "_read_raw_mask", unread)
        again = take_census(FolderDataset(root))
    assert again.cached and again.raw_counts == first.raw_counts

    changed = root / "masks" / "train" / "m1.png"
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(changed)
    stat = changed.stat()
    os.utime(changed, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    recount = take_census(FolderDataset(root))
    assert not recount.cached and recount.raw_counts == {0: 96, 1: 32}


def test_corrupt_cache_file_is_ignored_and_rebuilt(tmp_path):
    root = _write(tmp_path, "a\nb\n", [_halves(0, 1)])
    take_census(FolderDataset(root))
    (cache_file,) = (tmp_path / "cache" / "census").glob("*.json")
    cache_file.write_text("{not json")
    census = take_census(FolderDataset(root))
    assert not census.cached and census.raw_counts == {0: 32, 1: 32}
    assert take_census(FolderDataset(root)).cached


def test_classes_that_never_occur_and_all_ignore_masks_are_warned(tmp_path, capsys):
    root = _write(tmp_path, "sky\nroad\ncar\n", [_halves(0, 1), np.full((8, 8), 255)])
    check_train_labels(FolderDataset(root))
    out, err = capsys.readouterr()
    assert "1 of 3 classes never occur" in err and "car" in err
    assert "1 train mask(s) are entirely ignore" in err and "m1.png" in err
    assert out.strip() == ("labels: 2 train masks, 2/3 classes present, 1 all-ignore masks, "
                           "50.0% of pixels ignored (census took "
                           + out.split("census took ")[1].strip())


def test_zero_255_masks_with_two_classes_are_refused_by_the_cli_in_one_line(
        tmp_path, tiny_flags, capsys):
    root = _binary(tmp_path / "data")
    code = cli.main(["train", "--dataset", "folder", "--data-root", str(root), "--iters", "2",
                     "--work-dir", str(tmp_path / "w"), *tiny_flags])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "255 means ignore" in err and "--label-map 255:1" in err
    assert not (tmp_path / "w" / "last.pt").exists()


def test_zero_255_masks_with_two_classes_make_run_train_raise(tmp_path, tiny_train_config):
    root = _binary(tmp_path / "data")
    with pytest.raises(SegnestError, match="255 means ignore"):
        run_train(tiny_train_config(root, tmp_path / "w", iters=2))


def test_label_map_trains_and_eval_reapplies_it_from_the_checkpoint(
        tmp_path, tiny_train_config, monkeypatch):
    root = _binary(tmp_path / "data")
    cfg = tiny_train_config(root, tmp_path / "w", iters=2, val_interval=2, label_map="255:1")
    assert run_train(cfg)["iteration"] == 2
    checkpoint = tmp_path / "w" / "last.pt"
    assert load_checkpoint(checkpoint)["config"]["label_map"] == "255:1"

    built = []
    original = evaluate_module.build_dataset
    monkeypatch.setattr(evaluate_module, "build_dataset",
                        lambda *args, **kw: built.append(original(*args, **kw)) or built[-1])
    results = evaluate_module.run_eval(EvalConfig(checkpoint=str(checkpoint), device="cpu",
                                                  workers=0, out=str(tmp_path / "eval")))
    assert built[0].label_map == {255: 1}
    assert results["gt_pixels"][1] > 0


def test_label_map_is_validated_and_only_for_folder_datasets(tmp_path):
    root = _write(tmp_path, "a\nb\n", [_halves(0, 255)])
    assert build_dataset("folder", root, label_map="255:1, 7:255").label_map == {255: 1, 7: 255}
    for spec, message in (("255-1", "cannot read"), ("255:2", "maps to no class"),
                          ("70000:1", "0..65535"), ("1:0,1:1", "mapped twice")):
        with pytest.raises(SegnestError, match=message):
            build_dataset("folder", root, label_map=spec)
    with pytest.raises(SegnestError, match="folder datasets only"):
        build_dataset("ade20k", tmp_path / "nowhere", label_map="255:1")


def test_recipe_may_give_the_label_map_as_a_mapping(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("dataset: folder\niters: 10\ncrop_size: 32\nbase_size: 48\n"
                      "label_map: {255: 1, 128: 0}\n")
    assert resolve_config(TrainConfig, {"config": str(recipe)}).label_map == "255:1,128:0"


def test_rgb_colour_masks_map_through_classes_txt_and_unknown_colours_are_ignored(
        tmp_path, capsys):
    mask = np.zeros((4, 4, 3), np.uint8)
    mask[:, :2] = (128, 64, 128)          # road
    mask[:, 2:] = (70, 130, 180)          # sky
    mask[0, 0] = (1, 2, 3)                # in no class
    root = _write(tmp_path, "road 128 64 128\nsky 70 130 180\n", [mask])
    Image.fromarray(mask).convert("RGBA").save(root / "masks" / "train" / "m0.png")
    dataset = FolderDataset(root)
    expected = np.array([[255, 0, 1, 1]] + [[0, 0, 1, 1]] * 3)
    np.testing.assert_array_equal(dataset.load(0)[1], expected)
    check_train_labels(dataset)
    err = capsys.readouterr().err
    assert "1 pixels of colours not in classes.txt" in err and "(1, 2, 3) x1" in err


def test_colour_mask_without_colours_in_classes_txt_is_one_line_saying_so(tmp_path):
    root = _write(tmp_path, "road\nsky\n", [np.zeros((4, 4, 3), np.uint8)])
    with pytest.raises(SegnestError) as error:
        FolderDataset(root).load(0)
    assert "RGB image" in str(error.value) and "classes.txt" in str(error.value)
    assert "\n" not in str(error.value)


def test_values_outside_the_classes_are_refused_naming_value_and_file(tmp_path):
    root = _write(tmp_path, "a\nb\n", [_halves(0, 1), _halves(1, 7)])
    with pytest.raises(SegnestError) as error:
        check_train_labels(FolderDataset(root))
    message = str(error.value)
    assert "outside the 2 classes" in message and ": 7 (e.g. " in message
    assert "m1.png" in message and "--label-map" in message


def test_masks_that_are_all_ignore_are_refused(tmp_path):
    root = _write(tmp_path, "a\nb\n", [np.full((8, 8), 255), np.full((8, 8), 255)])
    with pytest.raises(SegnestError, match="every pixel of the 2 train masks is ignore"):
        check_train_labels(FolderDataset(root))


def test_classes_txt_that_is_not_utf8_is_one_line(tmp_path):
    root = _write(tmp_path, "a\nb\n", [_halves(0, 1)])
    (root / "classes.txt").write_bytes("caf\xe9\nroad\n".encode("latin-1"))
    with pytest.raises(SegnestError) as error:
        FolderDataset(root)
    assert "not UTF-8" in str(error.value) and "classes.txt" in str(error.value)
    assert "\n" not in str(error.value)


def test_a_mask_rewritten_with_the_same_size_and_mtime_is_counted_again(tmp_path):
    """cp -p, rsync -a, tar x and touch -r keep size and mtime; the cache keys on content."""
    root = _write(tmp_path, "a\nb\n", [_halves(0, 1), _halves(0, 1)])
    assert take_census(FolderDataset(root)).raw_counts == {0: 64, 1: 64}
    mask = root / "masks" / "train" / "m1.png"
    stat = mask.stat()
    Image.fromarray(_halves(0, 255)).save(mask)  # re-exported as 0/255
    assert mask.stat().st_size == stat.st_size  # this pattern compresses to the same size
    os.utime(mask, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert mask.stat().st_mtime_ns == stat.st_mtime_ns
    recount = take_census(FolderDataset(root))
    assert not recount.cached and recount.raw_counts.get(255) == 32


@pytest.mark.parametrize("obstruction", ["file", "read-only"])
def test_a_cache_folder_that_cannot_be_written_costs_a_warning_not_the_run(
        tmp_path, monkeypatch, capsys, obstruction):
    root = _write(tmp_path / "data", "a\nb\n", [_halves(0, 1)])
    cache = tmp_path / "cache-here"
    if obstruction == "file":
        cache.write_text("not a folder")
    else:
        from segnest.runtime import files

        def refuse(*args, **kwargs):
            raise OSError(30, "Read-only file system")  # EROFS; root ignores chmod
        monkeypatch.setattr(files.os, "open", refuse)
    monkeypatch.setenv("SEGNEST_CACHE", str(cache))
    census = check_train_labels(FolderDataset(root))
    assert census.raw_counts == {0: 32, 1: 32} and not census.cached
    err = capsys.readouterr().err
    assert "cannot cache the census" in err and "SEGNEST_CACHE" in err
    assert "--work-dir" not in err


@pytest.mark.parametrize("spec", ["²:1", "1:¹", "٣:1"])
def test_a_label_map_with_non_ascii_digits_is_one_line(tmp_path, spec):
    root = _write(tmp_path, "a\nb\n", [_halves(0, 1)])
    with pytest.raises(SegnestError, match="cannot read") as error:
        build_dataset("folder", root, label_map=spec)
    assert "\n" not in str(error.value)


def test_a_class_named_with_superscript_digits_is_a_name_not_a_colour(tmp_path):
    root = _write(tmp_path, "m² ³ ¹ ²\nb\n", [_halves(0, 1)])
    assert FolderDataset(root).classes == ["m² ³ ¹ ²", "b"]
