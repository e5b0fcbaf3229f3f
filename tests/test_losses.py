"""Class weights (--class-weights auto|FILE) and OHEM (--loss ohem): the loss values and
gradients against direct definitions, the auto rule, the file format, resume and a run."""

import math
import re

import pytest
import torch
import torch.nn.functional as F
from conftest import write_imbalanced_dataset

from segnest.data import build_dataset
from segnest.data.census import take_census
from segnest.errors import SegnestError
from segnest.models.pixelwise import upsampled_cross_entropy
from segnest.runtime.checkpoint import load_checkpoint
from segnest.tasks.segmentation.class_weights import auto_class_weights, read_class_weights
from segnest.tasks.segmentation.losses import Ohem, ohem_cross_entropy, segmentation_loss
from segnest.tasks.segmentation.task import run_train

IGNORE = 255


def logits_and_target(classes=4, seed=0, low=(6, 7), full=(41, 50)):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, classes, *low, generator=generator) * 2
    target = torch.randint(0, classes, (2, *full), generator=generator)
    target[:, :5] = IGNORE
    return logits, target


def full_size(logits, size):
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=True)


def value_and_grad(fn, logits):
    leaf = logits.detach().clone().requires_grad_()
    loss = fn(leaf)
    loss.backward()
    return loss.detach(), leaf.grad


def test_weighted_upsampled_cross_entropy_matches_pytorch_value_and_gradient():
    logits, target = logits_and_target()
    weight = torch.tensor([0.5, 2.0, 0.0, 1.5])
    ours = value_and_grad(lambda x: upsampled_cross_entropy(x, target, IGNORE, True, weight),
                          logits)
    ref = value_and_grad(lambda x: F.cross_entropy(full_size(x, target.shape[-2:]), target,
                                                   weight=weight, ignore_index=IGNORE), logits)
    torch.testing.assert_close(ours[0], ref[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours[1], ref[1], rtol=1e-5, atol=1e-7)


def reference_ohem(logits, target, thresh, min_kept, weight=None):
    """OHEM written out: per-pixel CE at full size, keep labelled pixels with p(true) <
    thresh plus the min_kept lowest p(true), weighted mean over the kept ones."""
    full = full_size(logits, target.shape[-2:])
    nll = F.cross_entropy(full, target, ignore_index=IGNORE, reduction="none").flatten()
    labelled = (target != IGNORE).flatten()
    prob = torch.exp(-nll.detach())
    order = sorted(torch.nonzero(labelled).flatten().tolist(), key=lambda i: prob[i].item())
    kept = {i for i in order if prob[i] < thresh} | set(order[:min_kept])
    labels = target.flatten().tolist()
    w = {i: 1.0 if weight is None else weight[labels[i]].item() for i in kept}
    return sum(w[i] * nll[i] for i in kept) / sum(w.values())


@pytest.mark.parametrize("thresh, min_kept", [(0.7, 0), (0.05, 300), (0.7, 10**6)])
def test_ohem_keeps_pixels_below_the_threshold_and_at_least_min_kept(thresh, min_kept):
    logits, target = logits_and_target()
    ohem = Ohem(thresh, min_kept)
    ours = value_and_grad(lambda x: ohem_cross_entropy(x, target, ohem), logits)
    ref = value_and_grad(lambda x: reference_ohem(x, target, thresh, min_kept), logits)
    torch.testing.assert_close(ours[0], ref[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours[1], ref[1], rtol=1e-5, atol=1e-7)


def test_ohem_with_class_weights_is_the_weighted_mean_over_kept_pixels():
    logits, target = logits_and_target()
    weight = torch.tensor([0.5, 2.0, 1.0, 1.5])
    ours = ohem_cross_entropy(logits, target, Ohem(0.3, 200), weight)
    torch.testing.assert_close(ours, reference_ohem(logits, target, 0.3, 200, weight))


def test_ohem_with_every_pixel_kept_is_cross_entropy():
    logits, target = logits_and_target()
    ours = ohem_cross_entropy(logits, target, Ohem(1.0, 0))
    ref = F.cross_entropy(full_size(logits, target.shape[-2:]), target, ignore_index=IGNORE)
    torch.testing.assert_close(ours, ref)


def test_ohem_ignores_unlabelled_pixels_whatever_their_logits():
    logits, target = logits_and_target()
    target[:, :8] = IGNORE  # full rows 0-7: the only ones low row 0 reaches (align corners)
    other = logits.clone()
    other[:, :, 0] = 1e4 * torch.randn_like(other[:, :, 0])
    ohem = Ohem(0.7, 50)
    loss, grad = value_and_grad(lambda x: ohem_cross_entropy(x, target, ohem), logits)
    assert ohem_cross_entropy(other, target, ohem) == pytest.approx(loss.item(), rel=1e-6)
    assert not grad[:, :, 0].any()
    assert loss.item() == pytest.approx(reference_ohem(logits, target, 0.7, 50).item(), rel=1e-5)


@pytest.mark.parametrize("loss", ["ce", "ohem"])
def test_a_batch_without_weighted_labels_gives_zero_with_gradients_everywhere(loss):
    logits, target = logits_and_target()
    outputs = {"out": logits.clone().requires_grad_(), "aux": logits.clone().requires_grad_()}
    ohem = Ohem() if loss == "ohem" else None
    total, aux = segmentation_loss(outputs, torch.full_like(target, IGNORE), 0.2, None, ohem)
    assert total.item() == 0 and aux.item() == 0
    # Labelled only with a class of weight 0: nothing to learn either, not 0/0.
    weight = torch.tensor([0.0, 1.0, 1.0, 1.0])
    total, _ = segmentation_loss(outputs, torch.where(target == IGNORE, IGNORE, 0), 0.2,
                                 weight, ohem)
    total.backward()
    assert total.item() == 0
    assert all(out.grad is not None and not out.grad.any() for out in outputs.values())


def test_auto_weights_follow_the_enet_rule_with_mean_one_over_present_classes(tmp_path):
    root = write_imbalanced_dataset(tmp_path / "data", n_train=4, size=32)
    dataset = build_dataset("folder", str(root), "train", None)
    counts = take_census(dataset, cache_dir=tmp_path / "cache").train_id_counts
    weights = auto_class_weights(counts, 3)
    labelled = sum(counts.values())
    raw = [1 / math.log(1.02 + counts[c] / labelled) for c in range(3)]
    assert weights == pytest.approx([w * 3 / sum(raw) for w in raw])
    assert weights[2] > 5 * weights[0]  # the rare class counts for more
    # An absent class gets 0 and does not enter the mean.
    assert auto_class_weights({0: 10, 1: 30}, 3)[2] == 0
    assert sum(auto_class_weights({0: 10, 1: 30}, 3)) == pytest.approx(2)


CLASSES = ["sky", "ground", "traffic light"]


@pytest.mark.parametrize("text, message", [
    ("1\n2\n", "holds 2 weight(s), the dataset has 3 classes"),
    ("1\n2\nx\n", "line 3: 'x' is not a number"),
    ("1\n-1\n2\n", "line 2: weight -1 must be finite and >= 0"),
    ("1\nnan\n2\n", "line 2: weight nan must be finite"),
    ("sky 1\nroad 2\ntraffic light 3\n", "line 2: names class 'road', but class 1 is 'ground'"),
    ("0\n0\n0\n", "every weight is 0"),
])
def test_a_bad_weights_file_is_refused_in_one_line_naming_the_problem(tmp_path, text, message):
    path = tmp_path / "w.txt"
    path.write_text(text)
    with pytest.raises(SegnestError, match=re.escape(message)) as err:
        read_class_weights(path, CLASSES)
    assert "\n" not in str(err.value) and str(path) in str(err.value)


def test_a_weights_file_takes_plain_or_named_lines_and_comments(tmp_path):
    path = tmp_path / "w.txt"
    path.write_text("# weights\nsky 0.5\n\nground 1  # common\ntraffic light 2.5\n")
    assert read_class_weights(path, CLASSES) == [0.5, 1.0, 2.5]
    path.write_text("0.5\n1\n2.5\n")
    assert read_class_weights(path, CLASSES) == [0.5, 1.0, 2.5]


def test_resume_with_auto_weights_is_bit_exact_and_stores_the_weights(
        tmp_path, tiny_train_config):
    root = write_imbalanced_dataset(tmp_path / "data", n_train=4, n_val=2, size=40)
    settings = dict(class_weights="auto", loss="ohem", val_interval=6)
    run_train(tiny_train_config(root, tmp_path / "whole", **settings))
    run_train(tiny_train_config(root, tmp_path / "split", **settings,
                                resume=str(tmp_path / "whole" / "iter_3.pt")))
    whole = load_checkpoint(tmp_path / "whole" / "last.pt")
    split = load_checkpoint(tmp_path / "split" / "last.pt")
    assert split["iteration"] == 6
    for name, tensor in whole["model"].items():
        assert torch.equal(tensor, split["model"][name]), name
    weights = whole["class_weights"]
    assert len(weights) == 3 and weights[2] > weights[0] > 0
    stored = read_class_weights(tmp_path / "whole" / "class_weights.txt", whole["classes"])
    assert stored == weights


def test_resume_with_other_class_weights_is_refused(tmp_path, tiny_train_config):
    root = write_imbalanced_dataset(tmp_path / "data", n_train=4, n_val=2, size=40)
    run_train(tiny_train_config(root, tmp_path / "run", iters=3, class_weights="auto"))
    path = tmp_path / "w.txt"
    path.write_text("1\n1\n1\n")
    with pytest.raises(SegnestError, match="trained with class weights"):
        run_train(tiny_train_config(root, tmp_path / "run", resume="auto", class_weights=str(path)))


def test_train_with_ohem_and_auto_weights_end_to_end_from_the_command_line(
        tmp_path, tiny_flags, capsys):
    from segnest.cli import main

    root = write_imbalanced_dataset(tmp_path / "data", n_train=4, n_val=2, size=40)
    work = tmp_path / "run"
    main(["train", "--dataset", "folder", "--data-root", str(root), "--work-dir", str(work),
          "--iters", "2", "--loss", "ohem", "--ohem-min-kept", "500", "--class-weights", "auto",
          "--no-tensorboard", *tiny_flags])
    out = capsys.readouterr().out
    assert "class weights (ENet rule): sky" in out
    assert (work / "class_weights.txt").is_file()
    assert load_checkpoint(work / "last.pt")["config"]["loss"] == "ohem"


def test_class_weights_flag_must_be_auto_or_a_file(tmp_path, tiny_train_config):
    from segnest.commands.config import validate_config

    cfg = tiny_train_config(tmp_path, tmp_path / "run", class_weights="median")
    with pytest.raises(SegnestError, match="--class-weights 'median' is neither 'auto' nor a file"):
        validate_config(cfg)


@pytest.mark.parametrize("setting", [{"ohem_thresh": 0.5}, {"ohem_min_kept": 100}])
def test_ohem_settings_without_the_ohem_loss_are_refused(tmp_path, tiny_train_config, setting):
    from segnest.commands.config import validate_config

    cfg = tiny_train_config(tmp_path, tmp_path / "run", **setting)
    with pytest.raises(SegnestError, match="applies to the OHEM loss only.*add --loss ohem"):
        validate_config(cfg)
    validate_config(tiny_train_config(tmp_path, tmp_path / "run", loss="ohem", **setting))
