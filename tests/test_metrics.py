"""Specs for the dataset-level confusion matrix and the metric reports."""

import json
import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from segnest.inference.metrics import ConfusionMatrix, format_table, save_results, to_markdown


def _results(num_classes, pairs, ignore_index=255):
    """Metrics of a matrix fed with (pred, target) lists."""
    cm = ConfusionMatrix(num_classes, ignore_index=ignore_index)
    for pred, target in pairs:
        cm.update(torch.as_tensor(pred), torch.as_tensor(target))
    return cm.compute()


# gt    = 0 0 0 0 1 1
# pred  = 0 0 0 1 1 0
# class 0: TP 3, FN 1, FP 1 -> IoU 3/5, Acc 3/4; class 1: TP 1, FN 1, FP 1 -> IoU 1/3, Acc 1/2
HAND_PRED = [0, 0, 0, 1, 1, 0]
HAND_GT = [0, 0, 0, 0, 1, 1]


def test_perfect_prediction_scores_one():
    torch.manual_seed(0)
    target = torch.randint(0, 4, (2, 16, 16))
    cm = ConfusionMatrix(4)
    cm.update(target.clone(), target)
    res = cm.compute()
    assert res["pixAcc"] == res["mIoU"] == res["mAcc"] == 100.0
    assert res["IoU"] == [100.0] * 4


def test_all_wrong_prediction_scores_zero():
    target = torch.tensor([[0, 0, 1, 1]])
    res = _results(2, [(1 - target, target)])
    assert res["pixAcc"] == res["mIoU"] == res["mAcc"] == 0.0


def test_hand_computed_two_class_example():
    res = _results(2, [(HAND_PRED, HAND_GT)])
    assert res["IoU"] == pytest.approx([100 * 3 / 5, 100 / 3])
    assert res["Acc"] == pytest.approx([75.0, 50.0])
    assert res["mIoU"] == pytest.approx(100 * (3 / 5 + 1 / 3) / 2)
    assert res["mAcc"] == pytest.approx(62.5)
    assert res["pixAcc"] == pytest.approx(100 * 4 / 6)
    assert res["labelled_pixels"] == 6 and res["correct_pixels"] == 4


def test_ignored_pixels_are_not_counted():
    # Two extra pixels, both wrong, but their target is the ignore index.
    pred = HAND_PRED + [1, 0]
    gt = HAND_GT + [255, 255]
    assert _results(2, [(pred, gt)]) == _results(2, [(HAND_PRED, HAND_GT)])


def test_class_absent_from_gt_and_prediction_is_left_out_of_miou():
    res = _results(3, [(HAND_PRED, HAND_GT)])
    assert math.isnan(res["IoU"][2]) and math.isnan(res["Acc"][2])
    assert res["mIoU"] == pytest.approx(100 * (3 / 5 + 1 / 3) / 2)
    assert res["mAcc"] == pytest.approx(62.5)


def test_class_predicted_but_absent_from_gt_counts_as_zero():
    # class 0: TP 1, FN 1 -> IoU 1/2; class 1: IoU 1; class 2: one false positive -> IoU 0
    res = _results(3, [([0, 2, 1, 1], [0, 0, 1, 1])])
    assert res["IoU"] == pytest.approx([50.0, 100.0, 0.0])
    assert res["mIoU"] == pytest.approx(50.0)
    assert math.isnan(res["Acc"][2])
    assert res["mAcc"] == pytest.approx(75.0)


def test_accumulation_is_dataset_level_not_mean_of_images():
    # Image A: 4 pixels of class 0, one predicted as 1 -> per-image mIoU (3/4 + 0) / 2.
    # Image B: 100 pixels of class 1, all right -> per-image mIoU 1 (class 0 left out).
    image_a = ([0, 0, 0, 1], [0, 0, 0, 0])
    image_b = ([1] * 100, [1] * 100)
    per_image = [_results(2, [image])["mIoU"] for image in (image_a, image_b)]
    dataset = _results(2, [image_a, image_b])["mIoU"]
    # Dataset matrix [[3, 1], [0, 100]]: IoU0 = 3/4, IoU1 = 100/101.
    assert dataset == pytest.approx(100 * (3 / 4 + 100 / 101) / 2)
    assert dataset != pytest.approx(sum(per_image) / 2)


def test_uint8_labels_do_not_overflow():
    cm = ConfusionMatrix(150)
    labels = torch.tensor([149, 149, 3], dtype=torch.uint8)
    cm.update(labels, labels)
    assert cm.mat[149, 149] == 2 and cm.mat[3, 3] == 1 and cm.mat.sum() == 3
    assert cm.mat.dtype == torch.int64


def test_target_outside_class_range_raises():
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError, match="class id 7"):
        cm.update(torch.tensor([0, 1]), torch.tensor([0, 7]))


def test_reset_clears_counts():
    cm = ConfusionMatrix(2)
    cm.update(torch.tensor(HAND_PRED), torch.tensor(HAND_GT))
    cm.reset()
    assert cm.mat.sum() == 0


def test_no_labelled_pixel_gives_nan():
    res = _results(2, [([0, 1], [255, 255])])
    assert all(math.isnan(res[key]) for key in ("pixAcc", "mIoU", "mAcc"))


def test_all_reduce_without_distributed_is_a_no_op():
    cm = ConfusionMatrix(2)
    cm.update(torch.tensor(HAND_PRED), torch.tensor(HAND_GT))
    before = cm.mat.clone()
    cm.all_reduce()
    assert torch.equal(cm.mat, before)


def test_reports_name_classes_and_write_null_for_nan(tmp_path):
    res = _results(3, [(HAND_PRED, HAND_GT)])
    names = ["road", "sidewalk", "never_seen"]
    table = format_table(res, names)
    markdown = to_markdown(res, names)
    for name in names:
        assert name in table and name in markdown
    assert "60.00" in table and "33.33" in table  # IoU in % with two decimals
    assert "46.67" in table.splitlines()[-1]  # summary line carries mIoU

    json_path, md_path = save_results(res, names, tmp_path / "eval", extra={"scales": [1.0]})
    data = json.loads(json_path.read_text())
    assert data["class_names"] == names
    assert data["IoU"][2] is None and data["Acc"][2] is None
    assert data["mIoU"] == pytest.approx(res["mIoU"])
    assert data["scales"] == [1.0]
    assert md_path.read_text() == markdown
    assert sorted(p.name for p in (tmp_path / "eval").iterdir()) == ["metrics.json", "metrics.md"]


def _all_reduce_worker(rank, store_dir):
    dist.init_process_group(
        "gloo", init_method=f"file://{store_dir}/store", rank=rank, world_size=2
    )
    try:
        cm = ConfusionMatrix(2)
        # rank 0 sees one correct class-0 pixel, rank 1 one class-1 pixel predicted as 0
        cm.update(torch.tensor([0]), torch.tensor([rank]))
        cm.all_reduce()
        torch.save(cm.mat, f"{store_dir}/mat{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_all_reduce_sums_matrices_across_processes(tmp_path):
    mp.spawn(_all_reduce_worker, args=(str(tmp_path),), nprocs=2, join=True)
    expected = torch.tensor([[1, 0], [1, 0]])
    for rank in range(2):
        assert torch.equal(torch.load(tmp_path / f"mat{rank}.pt"), expected)


def test_metrics_json_holds_the_confusion_matrix_one_ground_truth_row_per_line(tmp_path):
    cm = ConfusionMatrix(3)
    cm.update(torch.tensor([0, 1, 1, 2]), torch.tensor([0, 0, 1, 2]))
    res = cm.compute()
    assert res["confusion"] == [[1, 1, 0], [0, 1, 0], [0, 0, 1]]
    json_path, _ = save_results(res, ["a", "b", "c"], tmp_path)
    text = json_path.read_text()
    assert json.loads(text)["confusion"] == res["confusion"]
    assert "    [1, 1, 0],\n    [0, 1, 0],\n    [0, 0, 1]\n" in text
