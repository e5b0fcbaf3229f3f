"""COCO-format data (the adapter, the checker, the mini detection set) and the COCO
evaluation, whose numbers must equal pycocotools run directly on the saved results."""

import contextlib
import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("pycocotools")
from pycocotools import mask as mask_utils  # noqa: E402
from pycocotools.coco import COCO  # noqa: E402
from pycocotools.cocoeval import COCOeval  # noqa: E402
from torchvision.models.detection.roi_heads import paste_masks_in_image  # noqa: E402

from segnest.data.coco import CocoDetection, check_coco, coco_source  # noqa: E402
from segnest.data.mini import DETECTION_CLASSES, ensure_mini_detection  # noqa: E402
from segnest.errors import SegnestError  # noqa: E402
from segnest.inference import coco as coco_eval  # noqa: E402
from segnest.inference.coco import (  # noqa: E402
    STAT_NAMES,
    CocoResults,
    encode_masks,
    evaluate_coco,
    write_coco_results,
)


@pytest.fixture(scope="module")
def mini_root(tmp_path_factory) -> Path:
    return ensure_mini_detection(tmp_path_factory.mktemp("cache"))


def file_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            digest.update(path.relative_to(folder).as_posix().encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


# ---- the mini detection set ----

def test_mini_detection_set_is_the_same_bytes_every_time(mini_root, tmp_path):
    again = ensure_mini_detection(tmp_path)
    assert file_digest(again) == file_digest(mini_root)


def test_mini_detection_set_is_a_clean_coco_set_whose_boxes_bound_their_masks(mini_root):
    for split in ("train", "val"):
        source = coco_source(mini_root, split)
        check = check_coco(source, masks=True)
        assert check.errors == []
        data = json.loads(source.annotations.read_text())
        assert [c["name"] for c in data["categories"]] == list(DETECTION_CLASSES)
        for annotation in data["annotations"]:
            rle = annotation["segmentation"]
            assert list(mask_utils.toBbox(rle)) == annotation["bbox"]
            assert mask_utils.area(rle) >= 40
    dataset = CocoDetection(coco_source(mini_root, "val"), masks=True)
    image, target = dataset[0]
    for box, mask in zip(target["boxes"], target["masks"], strict=True):
        ys, xs = torch.where(mask > 0)
        assert box.tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
    assert image.shape[1:] == target["masks"].shape[1:]


# ---- own data: the checker and the adapter ----

def polygon_square(x: float, y: float, side: float) -> list[list[float]]:
    return [[x, y, x + side, y, x + side, y + side, x, y + side]]


def write_problem_set(root: Path) -> Path:
    """Categories from 0; a crowd region, an image without annotations, a box outside its
    image, a zero-size box, polygon, RLE and compressed RLE masks, one image file missing."""
    (root / "images").mkdir(parents=True)
    images = []
    for number in range(4):
        name = f"img{number}.png"
        images.append({"id": number + 10, "file_name": name, "height": 40, "width": 50})
        if number != 3:
            Image.fromarray(np.full((40, 50, 3), 60 * number, np.uint8)).save(
                root / "images" / name)
    mask = np.zeros((40, 50), np.uint8)
    mask[5:15, 20:35] = 1
    compressed = mask_utils.encode(np.asfortranarray(mask))
    compressed["counts"] = compressed["counts"].decode()
    flat = mask.flatten(order="F")
    changes = np.flatnonzero(np.diff(np.concatenate([[0], flat, [2]])) != 0)
    uncompressed = {"size": [40, 50], "counts": np.diff(np.concatenate([[0], changes])).tolist()}
    annotations = [
        {"id": 1, "image_id": 10, "category_id": 0, "bbox": [2, 3, 10, 10], "iscrowd": 0,
         "area": 100, "segmentation": polygon_square(2, 3, 10)},
        {"id": 2, "image_id": 10, "category_id": 1, "bbox": [20, 5, 15, 10], "iscrowd": 0,
         "area": 150, "segmentation": compressed},
        {"id": 3, "image_id": 11, "category_id": 1, "bbox": [20, 5, 15, 10], "iscrowd": 0,
         "area": 150, "segmentation": uncompressed},
        {"id": 4, "image_id": 11, "category_id": 0, "bbox": [40, 30, 20, 20], "iscrowd": 0,
         "area": 100, "segmentation": polygon_square(40, 30, 10)},
        {"id": 5, "image_id": 11, "category_id": 0, "bbox": [5, 5, 0, 8], "iscrowd": 0,
         "area": 0, "segmentation": polygon_square(5, 5, 8)},
        {"id": 6, "image_id": 11, "category_id": 1, "bbox": [0, 0, 10, 10], "iscrowd": 1,
         "area": 100, "segmentation": compressed},
    ]
    data = {"images": images, "annotations": annotations,
            "categories": [{"id": 0, "name": "zero"}, {"id": 1, "name": "one"}]}
    (root / "ann.json").write_text(json.dumps(data))
    return root


def test_checker_names_each_problem_once_with_what_segnest_does_or_how_to_fix_it(tmp_path):
    root = write_problem_set(tmp_path)
    check = check_coco(coco_source(annotations=root / "ann.json", images=root / "images"),
                       masks=True)
    assert len(check.errors) == 1 and "1 image files not found" in check.errors[0]
    assert "img3.png" in check.errors[0]
    expected_notes = ["category ids start at 0", "1 boxes extend outside",
                      "1 boxes have zero width or height", "1 crowd regions",
                      "2 of 4 images have no usable annotations",
                      "masks given as 1 compressed rle, 2 polygon, 1 rle"]
    for phrase in expected_notes:
        assert sum(phrase in note for note in check.notes) == 1, phrase
    with pytest.raises(SegnestError, match="image files not found"):
        check.raise_errors()


def test_checker_refuses_unknown_categories_and_mask_models_without_masks(tmp_path):
    root = write_problem_set(tmp_path)
    data = json.loads((root / "ann.json").read_text())
    data["images"] = data["images"][:3]
    data["annotations"][0]["category_id"] = 7
    del data["annotations"][1]["segmentation"]
    (root / "ann.json").write_text(json.dumps(data))
    source = coco_source(annotations=root / "ann.json", images=root / "images")
    errors = check_coco(source, masks=True).errors
    assert len(errors) == 2
    assert "category_id not in 'categories'" in errors[0]
    assert "no valid segmentation" in errors[1] and "faster_rcnn" in errors[1]
    assert len(check_coco(source, masks=False).errors) == 1


def test_adapter_maps_ids_to_labels_clips_boxes_drops_crowd_and_decodes_every_mask_kind(
        tmp_path):
    root = write_problem_set(tmp_path)
    data = json.loads((root / "ann.json").read_text())
    data["images"] = data["images"][:3]
    (root / "ann.json").write_text(json.dumps(data))
    source = coco_source(annotations=root / "ann.json", images=root / "images")
    evaluation = CocoDetection(source, masks=True)
    training = CocoDetection(source, masks=True, train=True, flip=0.0)
    assert len(evaluation) == 3 and len(training) == 2  # the empty image only in evaluation
    assert evaluation.category_ids == [0, 1] and evaluation.classes == ["zero", "one"]
    _, first = evaluation[0]
    assert first["labels"].tolist() == [1, 2]
    expected = np.zeros((40, 50), np.uint8)
    expected[3:13, 2:12] = 1
    assert (first["masks"][0].numpy() == expected).all()
    _, second = evaluation[1]
    assert second["labels"].tolist() == [2, 1]  # crowd and zero-size boxes left out
    assert second["boxes"][1].tolist() == [40, 30, 50, 40]  # clipped to the image
    assert (second["masks"][0] == first["masks"][1]).all()  # RLE and compressed RLE agree
    _, empty = evaluation[2]
    assert empty["boxes"].shape == (0, 4) and empty["masks"].shape == (0, 40, 50)


def test_horizontal_flip_moves_boxes_with_the_pixels(tmp_path):
    root = write_problem_set(tmp_path)
    source = coco_source(annotations=root / "ann.json", images=root / "images")
    data = json.loads((root / "ann.json").read_text())
    data["images"] = data["images"][:3]
    (root / "ann.json").write_text(json.dumps(data))
    plain = CocoDetection(source, masks=True)[0]
    flipped = CocoDetection(source, masks=True, train=True, flip=1.0)[0]
    assert torch.equal(flipped[0], plain[0].flip(-1))
    assert flipped[1]["boxes"][0].tolist() == [38, 3, 48, 13]
    assert torch.equal(flipped[1]["masks"], plain[1]["masks"].flip(-1))


def test_sources_official_layout_and_own_data(tmp_path):
    with pytest.raises(SegnestError, match="instances_val2017.json"):
        coco_source(tmp_path, "val")
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "instances_val2017.json").write_text("{}")
    assert coco_source(tmp_path, "val").images == tmp_path / "val2017"
    with pytest.raises(SegnestError, match="needs both"):
        coco_source(annotations=tmp_path / "a.json")


def test_a_file_that_is_not_coco_is_one_error(tmp_path):
    (tmp_path / "a.json").write_text("{\"images\": []}")
    with pytest.raises(SegnestError, match="no annotations, categories list"):
        check_coco(coco_source(annotations=tmp_path / "a.json", images=tmp_path))


# ---- evaluation ----

def reference_metrics(annotation_file: Path, results_file: Path, iou_type: str) -> dict:
    """pycocotools on the saved results JSON, the way detectron2 evaluates (the box
    dropped from segm results so that mask areas decide small/medium/large)."""
    results = json.loads(results_file.read_text())
    if iou_type == "segm":
        for entry in results:
            entry.pop("bbox")
    with contextlib.redirect_stdout(io.StringIO()):
        ground_truth = COCO(str(annotation_file))
        evaluator = COCOeval(ground_truth, ground_truth.loadRes(results), iou_type)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    stats = {name: None if value < 0 else value * 100
             for name, value in zip(STAT_NAMES, evaluator.stats, strict=True)}
    precision = evaluator.eval["precision"]
    per_class = {}
    for index, category in enumerate(evaluator.params.catIds):
        values = precision[:, :, index, 0, -1]
        name = ground_truth.cats[category]["name"]
        per_class[name] = values[values > -1].mean() * 100 if (values > -1).any() else None
    return {**stats, "per_class": per_class}


def assert_metrics_equal(ours: dict, reference: dict) -> None:
    assert ours.keys() == reference.keys()
    for name, value in reference.items():
        if name == "per_class":
            assert ours[name].keys() == value.keys()
            for category, ap in value.items():
                assert (ours[name][category] is None) == (ap is None)
                if ap is not None:
                    assert ours[name][category] == pytest.approx(ap, abs=1e-3)
        else:
            assert (ours[name] is None) == (value is None), name
            if value is not None:
                assert ours[name] == pytest.approx(value, abs=1e-3), name


def noisy_predictions(annotation_file: Path, seed: int) -> dict[int, dict[str, torch.Tensor]]:
    """Per image: every ground-truth instance found with jittered box and mask, random
    scores, and some false positives; masks as full-size probabilities."""
    rng = np.random.default_rng(seed)
    data = json.loads(annotation_file.read_text())
    category_ids = sorted(c["id"] for c in data["categories"])
    predictions = {}
    for image in data["images"]:
        height, width = image["height"], image["width"]
        boxes, labels, masks = [], [], []
        for annotation in data["annotations"]:
            if annotation["image_id"] != image["id"] or annotation.get("iscrowd"):
                continue
            x, y, w, h = annotation["bbox"]
            jitter = rng.normal(0, 0.08, 4) * [w, h, w, h]
            box = np.clip([x + jitter[0], y + jitter[1], x + w + jitter[2], y + h + jitter[3]],
                          0, [width, height, width, height])
            if box[2] <= box[0] + 1 or box[3] <= box[1] + 1:
                continue
            boxes.append(box)
            labels.append(category_ids.index(annotation["category_id"]) + 1
                          if rng.random() > 0.1 else int(rng.integers(1, len(category_ids) + 1)))
            mask = np.zeros((height, width), np.float32)
            x1, y1, x2, y2 = (int(round(v)) for v in box)
            mask[y1:y2, x1:x2] = rng.uniform(0.3, 1.0)
            masks.append(mask)
        for _ in range(int(rng.integers(0, 4))):
            x1, y1 = rng.uniform(0, width - 8), rng.uniform(0, height - 8)
            box = [x1, y1, min(width, x1 + rng.uniform(4, 30)),
                   min(height, y1 + rng.uniform(4, 30))]
            boxes.append(box)
            labels.append(int(rng.integers(1, len(category_ids) + 1)))
            mask = np.zeros((height, width), np.float32)
            mask[int(box[1]):int(box[3]), int(box[0]):int(box[2])] = 0.9
            masks.append(mask)
        count = len(boxes)
        predictions[image["id"]] = {
            "boxes": torch.tensor(np.array(boxes, np.float32).reshape(-1, 4)),
            "labels": torch.tensor(labels, dtype=torch.int64),
            "scores": torch.tensor(rng.uniform(0.05, 1.0, count), dtype=torch.float32),
            "masks": torch.from_numpy(
                np.array(masks, np.float32).reshape(count, 1, height, width)),
        }
    return predictions


def write_independent_set(root: Path) -> Path:
    """A COCO set unlike the mini one: category ids 3, 7, 12, polygon masks of all sizes
    (small, medium and large by COCO's areas), a crowd region, an image without objects."""
    rng = np.random.default_rng(7)
    images, annotations = [], []
    for number in range(6):
        height, width = int(rng.integers(200, 330)), int(rng.integers(200, 330))
        images.append({"id": 100 + number, "file_name": f"{number}.jpg", "height": height,
                       "width": width})
        for _ in range(0 if number == 5 else int(rng.integers(1, 6))):
            side = float(rng.choice([20, 60, 140]))
            x, y = float(rng.uniform(0, width - side)), float(rng.uniform(0, height - side))
            annotations.append({
                "id": len(annotations) + 1, "image_id": 100 + number,
                "category_id": int(rng.choice([3, 7, 12])), "bbox": [x, y, side, side],
                "area": side * side, "iscrowd": 0, "segmentation": polygon_square(x, y, side)})
    annotations.append({"id": len(annotations) + 1, "image_id": 100, "category_id": 3,
                        "bbox": [0, 0, 30, 30], "area": 900, "iscrowd": 1,
                        "segmentation": polygon_square(0, 0, 30)})
    data = {"images": images, "annotations": annotations,
            "categories": [{"id": 3, "name": "a"}, {"id": 7, "name": "b"},
                           {"id": 12, "name": "c"}]}
    path = root / "independent.json"
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize("which", ["mini", "independent"])
def test_metrics_equal_pycocotools_on_the_saved_results_json(which, mini_root, tmp_path):
    annotation_file = (coco_source(mini_root, "val").annotations if which == "mini"
                       else write_independent_set(tmp_path))
    data = json.loads(annotation_file.read_text())
    category_ids = sorted(c["id"] for c in data["categories"])
    sizes = {image["id"]: (image["height"], image["width"]) for image in data["images"]}
    results = CocoResults(category_ids)
    for image_id, prediction in noisy_predictions(annotation_file, seed=1).items():
        results.add(image_id, prediction, *sizes[image_id])
    saved = tmp_path / "results.json"
    write_coco_results(saved, results.entries)
    ours = evaluate_coco(annotation_file, results.entries, ("bbox", "segm"))
    for iou_type in ("bbox", "segm"):
        reference = reference_metrics(annotation_file, saved, iou_type)
        assert 5 < reference["AP"] < 95  # neither trivial nor perfect
        assert_metrics_equal(ours[iou_type], reference)
    assert coco_eval.headline(ours) == {"bbox_AP": ours["bbox"]["AP"],
                                        "segm_AP": ours["segm"]["AP"]}


def test_no_detections_give_zero_where_ground_truth_exists_and_none_where_not(mini_root):
    metrics = evaluate_coco(coco_source(mini_root, "val").annotations, [], ("bbox",))
    assert metrics["bbox"]["AP"] == 0.0
    assert metrics["bbox"]["APl"] is None  # no large objects in 128 px images
    assert set(metrics["bbox"]["per_class"].values()) == {0.0}


def test_masks_are_pasted_and_encoded_one_at_a_time_exactly_like_the_full_paste():
    generator = torch.Generator().manual_seed(0)
    probabilities = torch.rand(5, 1, 28, 28, generator=generator)
    boxes = torch.tensor([[3.0, 4.0, 40.0, 30.0], [0.0, 0.0, 63.0, 47.0],
                          [10.5, 8.2, 12.0, 9.9], [50.0, 30.0, 64.0, 48.0],
                          [20.0, 20.0, 45.0, 41.0]])
    full = paste_masks_in_image(probabilities, boxes, (48, 64))
    expected = [mask_utils.encode(np.asfortranarray((m[0] >= 0.5).numpy().astype(np.uint8)))
                for m in full]
    encoded = encode_masks(probabilities, boxes, 48, 64)
    assert [e["counts"] for e in encoded] == [e["counts"].decode() for e in expected]


def test_results_gathered_from_every_rank_in_rank_order(monkeypatch):
    results = CocoResults([1, 2])
    results.add(1, {"boxes": torch.tensor([[0.0, 0.0, 2.0, 3.0]]), "labels": torch.tensor([2]),
                    "scores": torch.tensor([0.5])}, 10, 10)
    other = ([2], [{"image_id": 2, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 0.1}])
    monkeypatch.setattr(coco_eval, "all_gather_objects",
                        lambda obj: [obj, other])
    results.gather()
    assert results.image_ids == [1, 2]
    assert [e["image_id"] for e in results.entries] == [1, 2]
    assert results.entries[0]["bbox"] == [0.0, 0.0, 2.0, 3.0]
    assert results.entries[0]["category_id"] == 2
