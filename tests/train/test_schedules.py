"""hpcm.train.schedules: lr milestones, single-gamma schedules, ScaleGammaManager (values from the seed formulas)."""

from __future__ import annotations

import math

import pytest

from hpcm.config.presets import HPCM_LR_MILESTONES, HPCM_LR_VALUES
from hpcm.train.schedules import GammaSchedule, ScaleGammaManager, gamma_at, lr_at

INITIAL = {"s1": 0.008, "s2": 0.006, "s3": 0.004}


def test_hpcm_lr_milestones_at_known_epochs():
    def lr(epoch):
        return lr_at(epoch, 3000, 1e-4, HPCM_LR_MILESTONES, HPCM_LR_VALUES)
    assert [lr(0), lr(2749), lr(2750), lr(2849), lr(2850), lr(2950), lr(3000)] == [
        1e-4, 1e-4, 3e-5, 3e-5, 1e-5, 1e-6, 1e-6]
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
        gamma_at("step", 0.5, 0.006, 0.001)


def test_gamma_schedule_sets_optimizer_gamma():
    class Holder:
        gamma = None
    holder = Holder()
    schedule = GammaSchedule("cosine", 0.006, 0.001, total_steps=200)
    assert schedule.apply(holder, 100) == pytest.approx(0.0035) and holder.gamma == pytest.approx(0.0035)


def seed_hierarchical(epoch):
    """The seed's four-phase formulas, transcribed for the test."""
    i = INITIAL
    if epoch < 300:
        p = epoch / 300
        return {"s1": i["s1"] * (1 + 0.2 * p), "s2": i["s2"] * 0.8, "s3": i["s3"] * 0.6}
    if epoch < 1500:
        p = (epoch - 300) / 1200
        return {"s1": i["s1"] * (1.2 - 0.3 * p), "s2": i["s2"] * (0.8 + 0.3 * p), "s3": i["s3"] * (0.6 + 0.4 * p)}
    if epoch < 2500:
        p = (epoch - 1500) / 1000
        return {"s1": i["s1"] * (0.9 - 0.2 * p), "s2": i["s2"] * (1.1 - 0.3 * p), "s3": i["s3"] * (1.0 + 0.1 * p)}
    p = (epoch - 2500) / 500
    return {"s1": i["s1"] * (0.7 - 0.2 * p), "s2": i["s2"] * (0.8 - 0.3 * p), "s3": i["s3"] * (1.1 + 0.2 * p)}


@pytest.mark.parametrize("epoch", [0, 150, 299, 300, 900, 1499, 1500, 2000, 2500, 2750, 3000])
def test_hierarchical_matches_seed_values(epoch):
    manager = ScaleGammaManager(INITIAL, "hierarchical", total_epochs=3000)
    got = manager.step(epoch)
    expected = seed_hierarchical(epoch)
    assert got == pytest.approx(expected, rel=1e-9)


def test_hierarchical_known_numbers_and_boundaries_as_fractions():
    # epoch 900: middle of phase 2 -> s1 0.008*1.05, s2 0.006*0.95, s3 0.004*0.8
    assert ScaleGammaManager(INITIAL, "hierarchical").step(900) == pytest.approx(
        {"s1": 0.0084, "s2": 0.0057, "s3": 0.0032})
    # the same schedule on a 300-step run: step 90 is epoch 900
    assert ScaleGammaManager(INITIAL, "hierarchical", total_epochs=300).step(90) == pytest.approx(
        {"s1": 0.0084, "s2": 0.0057, "s3": 0.0032})
    custom = ScaleGammaManager(INITIAL, "hierarchical", total_epochs=100, phase_boundaries=(0.2, 0.4, 0.6))
    assert custom.step(20)["s1"] == pytest.approx(0.008 * 1.2)


@pytest.mark.parametrize("interpolation", ["linear", "smooth"])
def test_hierarchical_has_no_jumps(interpolation):
    manager = ScaleGammaManager(INITIAL, "hierarchical", total_epochs=1.0, interpolation=interpolation)
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
