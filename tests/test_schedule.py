import math

import pytest
import torch

from segnest.engine.schedule import PolyLR, WarmupCosineLR, WarmupStepLR
from segnest.runtime.checkpoint import load_checkpoint, save_checkpoint


def make_optimizer(backbone_lr: float = 0.01, head_multiplier: float = 10.0):
    """SGD with a backbone group and a head group at ``head_multiplier`` times the lr."""
    backbone = torch.nn.Parameter(torch.zeros(2))
    head = torch.nn.Parameter(torch.zeros(2))
    return torch.optim.SGD(
        [
            {"params": [backbone], "lr": backbone_lr},
            {"params": [head], "lr": backbone_lr * head_multiplier},
        ],
        lr=backbone_lr,
        momentum=0.9,
    )


def lrs_at(scheduler, optimizer, iteration: int) -> list[float]:
    while scheduler.last_epoch < iteration:
        optimizer.step()
        scheduler.step()
    return [group["lr"] for group in optimizer.param_groups]


def test_poly_matches_hand_computed_values_at_start_middle_and_end():
    optimizer = make_optimizer()
    scheduler = PolyLR(optimizer, total_iters=100, power=0.9)
    assert lrs_at(scheduler, optimizer, 0) == pytest.approx([0.01, 0.1])
    assert lrs_at(scheduler, optimizer, 50) == pytest.approx([0.01 * 0.5**0.9, 0.1 * 0.5**0.9])
    assert lrs_at(scheduler, optimizer, 100) == pytest.approx([0.0, 0.0], abs=1e-12)


def test_poly_keeps_the_head_multiplier_throughout():
    optimizer = make_optimizer()
    scheduler = PolyLR(optimizer, total_iters=40)
    for iteration in range(1, 40):
        backbone_lr, head_lr = lrs_at(scheduler, optimizer, iteration)
        assert head_lr == pytest.approx(10 * backbone_lr, rel=1e-12)


def test_poly_floor_is_added_to_the_decayed_part_and_held_after_the_end():
    optimizer = make_optimizer()
    scheduler = PolyLR(optimizer, total_iters=10, power=1.0, min_lr=1e-4)
    # Linear decay (power 1) halfway: halfway between base and floor.
    assert lrs_at(scheduler, optimizer, 5) == pytest.approx(
        [(0.01 - 1e-4) * 0.5 + 1e-4, (0.1 - 1e-4) * 0.5 + 1e-4]
    )
    assert lrs_at(scheduler, optimizer, 10) == pytest.approx([1e-4, 1e-4])
    assert lrs_at(scheduler, optimizer, 15) == pytest.approx([1e-4, 1e-4])


def test_poly_accepts_one_floor_per_group():
    optimizer = make_optimizer()
    scheduler = PolyLR(optimizer, total_iters=10, min_lr=[1e-4, 1e-3])
    assert lrs_at(scheduler, optimizer, 10) == pytest.approx([1e-4, 1e-3])


def test_poly_warmup_scales_linearly_from_the_ratio_then_hands_over():
    optimizer = make_optimizer()
    scheduler = PolyLR(optimizer, total_iters=100, power=0.9, warmup_iters=10, warmup_ratio=0.1)
    assert lrs_at(scheduler, optimizer, 0) == pytest.approx([0.01 * 0.1, 0.1 * 0.1])
    poly_at_4 = (1 - 4 / 100) ** 0.9
    factor_at_4 = 0.1 + 0.9 * 4 / 10
    assert lrs_at(scheduler, optimizer, 4) == pytest.approx(
        [0.01 * poly_at_4 * factor_at_4, 0.1 * poly_at_4 * factor_at_4]
    )
    poly_at_10 = (1 - 10 / 100) ** 0.9
    assert lrs_at(scheduler, optimizer, 10) == pytest.approx([0.01 * poly_at_10, 0.1 * poly_at_10])


def test_get_last_lr_reports_the_optimizer_learning_rates():
    optimizer = make_optimizer()
    scheduler = PolyLR(optimizer, total_iters=20)
    lrs_at(scheduler, optimizer, 7)
    assert scheduler.get_last_lr() == [group["lr"] for group in optimizer.param_groups]


@pytest.mark.parametrize(
    "build",
    [
        lambda opt: PolyLR(opt, total_iters=30, power=0.9, min_lr=1e-4, warmup_iters=5),
        lambda opt: WarmupCosineLR(opt, total_iters=30, warmup_iters=5, min_lr=1e-5),
        lambda opt: WarmupStepLR(opt, total_iters=30, steps=[10, 20], warmup_iters=5),
    ],
    ids=["poly", "cosine", "step"],
)
def test_resuming_from_a_checkpoint_continues_the_schedule_identically(build, tmp_path):
    optimizer = make_optimizer()
    scheduler = build(optimizer)
    lrs_at(scheduler, optimizer, 12)
    save_checkpoint(
        {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
        tmp_path / "last.pt",
    )
    uninterrupted = [lrs_at(scheduler, optimizer, t) for t in range(13, 35)]

    resumed_optimizer = make_optimizer()
    resumed_scheduler = build(resumed_optimizer)
    state = load_checkpoint(tmp_path / "last.pt")
    resumed_optimizer.load_state_dict(state["optimizer"])
    resumed_scheduler.load_state_dict(state["scheduler"])
    resumed = [lrs_at(resumed_scheduler, resumed_optimizer, t) for t in range(13, 35)]
    assert resumed == uninterrupted


def test_cosine_warms_up_linearly_then_follows_half_a_cosine_to_the_floor():
    optimizer = make_optimizer()
    scheduler = WarmupCosineLR(
        optimizer, total_iters=110, warmup_iters=10, warmup_ratio=0.01, min_lr=1e-4
    )
    assert lrs_at(scheduler, optimizer, 0) == pytest.approx([0.01 * 0.01, 0.1 * 0.01])
    factor_at_5 = 0.01 + 0.99 * 0.5
    assert lrs_at(scheduler, optimizer, 5) == pytest.approx([0.01 * factor_at_5, 0.1 * factor_at_5])
    assert lrs_at(scheduler, optimizer, 10) == pytest.approx([0.01, 0.1])
    quarter = 0.5 * (1 + math.cos(math.pi * 0.25))
    assert lrs_at(scheduler, optimizer, 35) == pytest.approx(
        [1e-4 + (0.01 - 1e-4) * quarter, 1e-4 + (0.1 - 1e-4) * quarter]
    )
    assert lrs_at(scheduler, optimizer, 60) == pytest.approx(
        [1e-4 + (0.01 - 1e-4) / 2, 1e-4 + (0.1 - 1e-4) / 2]
    )
    assert lrs_at(scheduler, optimizer, 110) == pytest.approx([1e-4, 1e-4])
    assert lrs_at(scheduler, optimizer, 120) == pytest.approx([1e-4, 1e-4])


def test_cosine_without_warmup_starts_at_the_base_learning_rate():
    optimizer = make_optimizer()
    scheduler = WarmupCosineLR(optimizer, total_iters=10)
    assert lrs_at(scheduler, optimizer, 0) == pytest.approx([0.01, 0.1])


@pytest.mark.parametrize(
    "kwargs",
    [
        {"total_iters": 0},
        {"total_iters": 10, "warmup_iters": 11},
        {"total_iters": 10, "warmup_ratio": 2.0},
    ],
)
def test_schedules_reject_impossible_lengths(kwargs):
    with pytest.raises(ValueError):
        PolyLR(make_optimizer(), **kwargs)
    with pytest.raises(ValueError):
        WarmupCosineLR(make_optimizer(), **kwargs)


def test_warmup_step_is_the_authors_1x_schedule():
    """detectron2's WarmupMultiStepLR (linear warmup from 0.001) at the 1x schedule's
    iterations: 90k, steps at 60k and 80k, 1000 warmup iterations; groups keep their ratio."""
    optimizer = make_optimizer(backbone_lr=0.02, head_multiplier=2.0)
    scheduler = WarmupStepLR(optimizer, total_iters=90_000, steps=[60_000, 80_000],
                             gamma=0.1, warmup_iters=1000, warmup_ratio=0.001)
    expected = {0: 0.02 * 0.001, 500: 0.02 * (0.001 + 0.999 * 0.5), 1000: 0.02,
                59_999: 0.02, 60_000: 0.002, 79_999: 0.002, 80_000: 0.0002, 90_000: 0.0002,
                95_000: 0.0002}
    for iteration, lr in expected.items():
        backbone, head = scheduler.lrs_at(iteration)
        assert backbone == pytest.approx(lr) and head == pytest.approx(2 * lr), iteration


@pytest.mark.parametrize("steps", [[20, 10], [0, 10], [10, 31]])
def test_warmup_step_refuses_steps_outside_the_run_or_out_of_order(steps):
    with pytest.raises(ValueError, match="steps"):
        WarmupStepLR(make_optimizer(), total_iters=30, steps=steps)
