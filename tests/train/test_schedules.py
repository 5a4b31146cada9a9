"""hpcm.train.schedules: lr milestones, single-gamma schedules, ScaleGammaManager (values from the
seed formulas)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from hpcm.config.presets import HPCM_LR_MILESTONES, HPCM_LR_VALUES
from hpcm.train.schedules import (
    SEED_GAMMA_STEP_MILESTONES,
    GammaSchedule,
    ScaleGammaManager,
    adaptive_factor,
    gamma_at,
    lr_at,
)

INITIAL = {"s1": 0.008, "s2": 0.006, "s3": 0.004}


def test_hpcm_lr_milestones_at_known_epochs():
    def lr(epoch):
        return lr_at(epoch, 3000, 1e-4, HPCM_LR_MILESTONES, HPCM_LR_VALUES)

    assert [lr(0), lr(2749), lr(2750), lr(2849), lr(2850), lr(2950), lr(3000)] == [
        1e-4,
        1e-4,
        3e-5,
        3e-5,
        1e-5,
        1e-6,
        1e-6,
    ]
    with pytest.raises(ValueError, match="differ in length"):
        lr_at(0, 10, 1e-4, [0.5], [])
    with pytest.raises(ValueError, match="increasing"):
        lr_at(0, 10, 1e-4, [0.9, 0.5], [1, 2])


def test_single_gamma_schedules_at_known_points():
    assert gamma_at("fixed", 0.7, 0.003) == 0.003
    assert gamma_at("linear", 0.25, 0.006, 0.001) == pytest.approx(0.00475)
    assert gamma_at("cosine", 0.5, 0.006, 0.001) == pytest.approx(0.0035)
    assert gamma_at("cosine", 0.0, 0.006, 0.001) == pytest.approx(0.006)
    assert gamma_at("cosine", 1.0, 0.006, 0.001) == pytest.approx(0.001)
    assert gamma_at("linear", 2.0, 0.006, 0.001) == pytest.approx(0.001)  # clamped
    with pytest.raises(ValueError, match="gamma_final"):
        gamma_at("cosine", 0.5, 0.006)
    with pytest.raises(ValueError, match="gamma_schedule"):
        gamma_at("exponential", 0.5, 0.006, 0.001)


SEED_TOTAL, SEED_WARMUP = 3000, 100  # the seed's epochs; its train.py sets final = 0.2 * initial


def seed_scheduler(strategy, epoch, initial=0.006, final=0.001, test_losses=()):
    """The seed's AdaptiveGammaScheduler.step (phase2/src/utils/adaptive_gamma.py), transcribed for
    the test with numpy, in epochs (warm-up 100, total 3000, steps at 1000/2000/2500, factor 0.5,
    window 50)."""
    if epoch < SEED_WARMUP:
        return initial
    p = min((epoch - SEED_WARMUP) / (SEED_TOTAL - SEED_WARMUP), 1.0)
    cosine = final + (initial - final) * 0.5 * (1 + np.cos(np.pi * p))
    if strategy == "linear":
        return initial - (initial - final) * p
    if strategy == "cosine":
        return cosine
    if strategy == "step":
        gamma = initial
        for e in (1000, 2000, 2500):
            if epoch >= e:
                gamma *= 0.5
        return max(gamma, final)
    losses = list(test_losses)
    if len(losses) < 50:
        return cosine
    recent = np.array(losses[-50:])
    cv = recent.std() / (recent.mean() + 1e-8)
    adjustment = 0.8 if cv < 0.01 else 1.2 if cv > 0.05 else 1.0
    return float(np.clip(cosine * adjustment, final, initial * 1.5))


def ours(strategy, epoch, initial=0.006, final=0.001, test_losses=()):
    schedule = GammaSchedule(strategy, initial, final, SEED_TOTAL, warmup=SEED_WARMUP_FRACTION)
    for loss in test_losses:
        schedule.observe(loss)
    return schedule(epoch)


SEED_WARMUP_FRACTION = SEED_WARMUP / SEED_TOTAL


@pytest.mark.parametrize("strategy", ["linear", "cosine", "step"])
@pytest.mark.parametrize(
    "epoch", [0, 50, 99, 100, 101, 999, 1000, 1550, 1999, 2000, 2499, 2500, 2999, 3000]
)
def test_seed_schedules_with_warmup_at_known_epochs(strategy, epoch):
    assert ours(strategy, epoch) == pytest.approx(seed_scheduler(strategy, epoch), rel=1e-12)


def test_step_and_warmup_known_numbers():
    assert SEED_GAMMA_STEP_MILESTONES == pytest.approx((1 / 3, 2 / 3, 5 / 6))
    step = GammaSchedule("step", 0.006, 0.0012, 3000, warmup=SEED_WARMUP_FRACTION)
    # 0.006 -> 0.003 at epoch 1000 -> 0.0015 at 2000 -> 0.00075 floored at gamma_final 0.0012 at
    # 2500
    assert [step(e) for e in (0, 999, 1000, 2000, 2500)] == pytest.approx(
        [0.006, 0.006, 0.003, 0.0015, 0.0012]
    )
    cosine = GammaSchedule("cosine", 0.006, 0.001, 3000, warmup=SEED_WARMUP_FRACTION)
    # held at 0.006 until epoch 100, half-way (0.0035) at epoch 100 + 2900 / 2 = 1550
    assert [cosine(0), cosine(99), cosine(100), cosine(1550), cosine(3000)] == pytest.approx(
        [0.006, 0.006, 0.006, 0.0035, 0.001]
    )
    assert GammaSchedule("step", 0.01, 0.0, 100, milestones=[0.5], factor=0.1)(50) == pytest.approx(
        0.001
    )
    with pytest.raises(ValueError, match="gamma_step_milestones"):
        GammaSchedule("step", 0.01, 0.0, 100, milestones=[0.7, 0.5])
    with pytest.raises(ValueError, match="gamma_warmup"):
        gamma_at("cosine", 0.5, 0.006, 0.001, warmup=1.0)


@pytest.mark.parametrize(
    "losses, factor",
    [
        ([1.0 + 0.001 * (k % 2) for k in range(50)], 0.8),  # cv 0.0005: converged
        ([1.0 + 0.05 * (k % 2) for k in range(50)], 1.0),  # cv 0.024: normal
        ([1.0 + 0.3 * (k % 2) for k in range(50)], 1.2),  # cv 0.13: unstable
        ([1.0 + 0.3 * (k % 2) for k in range(49)], 1.0),  # window not full: no adjustment
    ],
)
def test_adaptive_factor_and_values_match_the_seed(losses, factor):
    assert adaptive_factor(losses) == factor
    for epoch in (50, 100, 700, 1550, 2900):
        assert ours("adaptive", epoch, test_losses=losses) == pytest.approx(
            seed_scheduler("adaptive", epoch, test_losses=losses), rel=1e-12
        )


def test_adaptive_known_numbers_window_and_state():
    unstable = [1.0 + 0.3 * (k % 2) for k in range(60)]
    schedule = GammaSchedule("adaptive", 0.006, 0.001, 3000, warmup=SEED_WARMUP_FRACTION)
    for loss in unstable:
        schedule.observe(loss)
    assert schedule(1550) == pytest.approx(0.0035 * 1.2)
    assert schedule(50) == 0.006  # warm-up wins over the loss factor
    assert schedule(100) == pytest.approx(0.006 * 1.2)  # cosine start 0.006 * 1.2 < 1.5 * 0.006
    assert len(schedule.state_dict()["loss_history"]) == 50  # only the window is kept
    converged = GammaSchedule("adaptive", 0.006, 0.001, 3000)
    converged.load_state_dict({"loss_history": [2.0] * 50})
    assert converged(3000) == pytest.approx(0.001)  # 0.001 * 0.8 clipped up to gamma_final


def test_gamma_schedule_sets_optimizer_gamma():
    class Holder:
        gamma = None

    holder = Holder()
    schedule = GammaSchedule("cosine", 0.006, 0.001, total_steps=200)
    assert schedule.apply(holder, 100) == pytest.approx(0.0035) and holder.gamma == pytest.approx(
        0.0035
    )


def seed_hierarchical(epoch):
    """The seed's four-phase formulas, transcribed for the test."""
    i = INITIAL
    if epoch < 300:
        p = epoch / 300
        return {"s1": i["s1"] * (1 + 0.2 * p), "s2": i["s2"] * 0.8, "s3": i["s3"] * 0.6}
    if epoch < 1500:
        p = (epoch - 300) / 1200
        return {
            "s1": i["s1"] * (1.2 - 0.3 * p),
            "s2": i["s2"] * (0.8 + 0.3 * p),
            "s3": i["s3"] * (0.6 + 0.4 * p),
        }
    if epoch < 2500:
        p = (epoch - 1500) / 1000
        return {
            "s1": i["s1"] * (0.9 - 0.2 * p),
            "s2": i["s2"] * (1.1 - 0.3 * p),
            "s3": i["s3"] * (1.0 + 0.1 * p),
        }
    p = (epoch - 2500) / 500
    return {
        "s1": i["s1"] * (0.7 - 0.2 * p),
        "s2": i["s2"] * (0.8 - 0.3 * p),
        "s3": i["s3"] * (1.1 + 0.2 * p),
    }


@pytest.mark.parametrize("epoch", [0, 150, 299, 300, 900, 1499, 1500, 2000, 2500, 2750, 3000])
def test_hierarchical_matches_seed_values(epoch):
    manager = ScaleGammaManager(INITIAL, "hierarchical", total_epochs=3000)
    got = manager.step(epoch)
    expected = seed_hierarchical(epoch)
    assert got == pytest.approx(expected, rel=1e-9)


def test_hierarchical_known_numbers_and_boundaries_as_fractions():
    # epoch 900: middle of phase 2 -> s1 0.008*1.05, s2 0.006*0.95, s3 0.004*0.8
    assert ScaleGammaManager(INITIAL, "hierarchical").step(900) == pytest.approx(
        {"s1": 0.0084, "s2": 0.0057, "s3": 0.0032}
    )
    # the same schedule on a 300-step run: step 90 is epoch 900
    assert ScaleGammaManager(INITIAL, "hierarchical", total_epochs=300).step(90) == pytest.approx(
        {"s1": 0.0084, "s2": 0.0057, "s3": 0.0032}
    )
    custom = ScaleGammaManager(
        INITIAL, "hierarchical", total_epochs=100, phase_boundaries=(0.2, 0.4, 0.6)
    )
    assert custom.step(20)["s1"] == pytest.approx(0.008 * 1.2)


@pytest.mark.parametrize("interpolation", ["linear", "smooth"])
def test_hierarchical_has_no_jumps(interpolation):
    manager = ScaleGammaManager(
        INITIAL, "hierarchical", total_epochs=1.0, interpolation=interpolation
    )
    h = 1e-5
    grid = [k / 2000 for k in range(2001)]
    for t in grid + [0.1, 0.5, 2500 / 3000]:
        left, right = manager.step(max(t - h, 0)), manager.step(min(t + h, 1))
        for s in ("s1", "s2", "s3"):
            # Lipschitz: the steepest segment (s1 warm-up, 0.2 * 0.008 over 0.1 of the run, x1.5
            # for smoothstep) has slope 0.024; a jump would be of order 1e-3.
            assert abs(left[s] - right[s]) <= 2 * h * 0.03 + 1e-15
    if interpolation == "smooth":  # first derivative continuous across a boundary as well
        b, d = 0.5, 1e-4
        slope_left = (manager.step(b)["s2"] - manager.step(b - d)["s2"]) / d
        slope_right = (manager.step(b + d)["s2"] - manager.step(b)["s2"]) / d
        assert abs(slope_left - slope_right) < 1e-4


def test_linear_and_cosine_strategies_default_final_is_half():
    lin = ScaleGammaManager(INITIAL, "linear", total_epochs=3000)
    assert lin.step(1500) == pytest.approx({"s1": 0.006, "s2": 0.0045, "s3": 0.003})
    cos = ScaleGammaManager(INITIAL, "cosine", total_epochs=3000)
    assert cos.step(3000) == pytest.approx({"s1": 0.004, "s2": 0.003, "s3": 0.002})
    assert cos.step(750)["s1"] == pytest.approx(0.004 + 0.004 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert ScaleGammaManager(INITIAL, "fixed").step(1234) == INITIAL


def test_adaptive_strategy_rules_and_state_round_trip():
    manager = ScaleGammaManager(INITIAL, "adaptive", window_size=5)
    flat = {"s1": 1.0, "s2": 1.0, "s3": 1.0}
    for epoch in range(4):
        assert manager.step(epoch, flat) == INITIAL  # window not yet full
    g = manager.step(4, flat)  # cv = 0 < 0.01 -> x0.95
    assert g == pytest.approx({s: v * 0.95 for s, v in INITIAL.items()})
    saved = manager.state_dict()
    noisy = {"s1": 2.0, "s2": 1.0, "s3": 1.0}
    after = manager.step(5, noisy)  # s1 history now varies (cv > 0.05) -> x1.02
    assert after["s1"] == pytest.approx(0.008 * 0.95 * 1.02)
    assert after["s2"] == pytest.approx(0.006 * 0.95**2)
    resumed = ScaleGammaManager(INITIAL, "adaptive", window_size=5)
    resumed.load_state_dict(saved)
    assert resumed.step(5, noisy) == after
    for _ in range(200):  # clamp at the final gammas (half the initial ones)
        low = manager.step(6, flat)
    assert low["s2"] == pytest.approx(0.003)
    with pytest.raises(ValueError, match="scale_losses"):
        manager.step(7)


def test_manager_validation():
    with pytest.raises(ValueError, match="gamma_strategy"):
        ScaleGammaManager(INITIAL, "random")
    with pytest.raises(ValueError, match="phase_boundaries"):
        ScaleGammaManager(INITIAL, "hierarchical", phase_boundaries=(0.5, 0.2, 0.9))
    with pytest.raises(ValueError, match="s3"):
        ScaleGammaManager({"s1": 1.0, "s2": 1.0}, "fixed")


def test_the_trainer_feeds_validation_losses_to_the_adaptive_schedule_and_logs_step_gammas(
    tmp_path,
):
    """Wiring in hpcm.train.loop: observe(val_loss) after every validation, history in the
    checkpoint."""
    import csv

    import torch

    from hpcm.train import checkpoints as checkpointing
    from hpcm.train import loop as train

    common = [
        "--set",
        "model=HPCM_Tiny",
        "--set",
        "patch_size=64",
        "--set",
        "batch_size=1",
        "--set",
        "num_workers=0",
        "--set",
        "wandb_mode=disabled",
        "--set",
        "quiet=true",
        "--set",
        "log_every=1",
        "--set",
        "steps=4",
        "--set",
        "variant=phase1",
        "--set",
        "gamma=0.004",
        "--set",
        "gamma_final=0.001",
    ]
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert (
            train.main(
                [
                    "--output-dir",
                    str(tmp_path / "a"),
                    *common,
                    "--set",
                    "gamma_schedule=adaptive",
                    "--set",
                    "val_every=1",
                ]
            )
            == train.EXIT_OK
        )
        assert (
            train.main(
                [
                    "--output-dir",
                    str(tmp_path / "s"),
                    *common,
                    "--set",
                    "gamma_schedule=step",
                    "--set",
                    "gamma_step_milestones=[0.5]",
                    "--set",
                    "gamma_warmup=0.25",
                ]
            )
            == train.EXIT_OK
        )
    finally:
        torch.set_num_threads(previous)
    state = torch.load(
        tmp_path / "a" / checkpointing.CHECKPOINT_LAST, map_location="cpu", weights_only=False
    )
    with open(tmp_path / "a" / "metrics.csv") as handle:
        val_losses = [float(r["val_loss"]) for r in csv.DictReader(handle) if r["val_loss"]]
    assert len(val_losses) == 4 and state["gamma_schedule"]["loss_history"] == pytest.approx(
        val_losses
    )
    with open(tmp_path / "s" / "metrics.csv") as handle:
        gammas = [float(r["gamma"]) for r in csv.DictReader(handle) if r["gamma"]]
    # step s uses progress (s - 1) / 4: 0, 0.25 (warm-up ends), 0.5 (halved), 0.75
    assert gammas == pytest.approx([0.004, 0.004, 0.002, 0.002])
