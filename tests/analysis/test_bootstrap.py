"""Paired bootstrap intervals of BD: exact zero for a curve against itself, equality with an
independent implementation (numpy resampling + the ``bjontegaard`` package), coverage on a
simulated study whose true BD is known in closed form."""

from __future__ import annotations

import math
import warnings

import bjontegaard  # independent BD reference (pinned test dependency)
import numpy as np
import pandas as pd
import pytest

from hpcm.analysis import bd, bootstrap

LAMBDA_RATES = np.array([0.12, 0.25, 0.5, 1.0])  # population bpp of the reference per lambda


def _per_image_study(rng, n_images, rate_factor=0.8, psnr_shift=0.3, slope=6.0, noise=0.15):
    """Reference and test per-image (L, n) bpp/PSNR matrices (see test_coverage for the truth)."""
    lam = LAMBDA_RATES[:, None]
    scale = rng.lognormal(0.0, 0.3, size=n_images)  # image complexity
    offset = rng.normal(0.0, 2.0, size=n_images)  # image PSNR level
    ref_bpp = lam * scale
    ref_psnr = 30.0 + slope * np.log10(lam) + offset
    w = rng.lognormal(-(noise**2) / 2, noise, size=n_images)  # per-image rate noise, mean 1
    v = rng.normal(0.0, noise, size=n_images)  # per-image PSNR noise, mean 0
    test_bpp = ref_bpp * rate_factor * w
    test_psnr = ref_psnr + psnr_shift + v
    return (bootstrap.Curve(ref_bpp, ref_psnr), bootstrap.Curve(test_bpp, test_psnr))


def test_curve_against_itself_is_exactly_zero():
    ref, _ = _per_image_study(np.random.default_rng(1), 6)
    interval = bootstrap.bd_interval(ref, ref, bootstrap.resample_indices(6, 1000, 0))
    assert (interval.rate_low, interval.rate_high) == (0.0, 0.0)
    assert (interval.psnr_low, interval.psnr_high) == (0.0, 0.0)
    assert interval.invalid == 0
    assert bootstrap.excludes_zero(interval.rate_low, interval.rate_high) is False


def _independent_bootstrap(ref, test, resamples, seed):
    """The documented scheme written out: indices, per-resample means, BD by the package."""
    n = ref.bpp.shape[1]
    draws = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    rates, psnrs = [], []
    for idx in draws:
        ra, da = ref.bpp[:, idx].mean(1), ref.dist[:, idx].mean(1)
        rt, dt = test.bpp[:, idx].mean(1), test.dist[:, idx].mean(1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rates.append(
                bjontegaard.bd_rate(
                    ra, da, rt, dt, method="pchip", require_matching_points=False, min_overlap=0.0
                )
            )
            psnrs.append(
                bjontegaard.bd_psnr(
                    ra, da, rt, dt, method="pchip", require_matching_points=False, min_overlap=0.0
                )
            )
    return np.percentile(rates, [2.5, 97.5]), np.percentile(psnrs, [2.5, 97.5])


def test_one_case_equals_an_independent_implementation():
    rng = np.random.default_rng(7)
    ref, test = _per_image_study(rng, 6, noise=0.4)
    # a non-linear reference curve, so the interpolation matters
    ref = bootstrap.Curve(ref.bpp, ref.dist + rng.normal(0, 0.3, size=ref.dist.shape))
    ours = bootstrap.bd_interval(ref, test, bootstrap.resample_indices(6, 1000, 3))
    rate, psnr = _independent_bootstrap(ref, test, 1000, 3)
    assert ours.invalid == 0
    # measured agreement ~1e-13 (same formulas, different operation order)
    np.testing.assert_allclose([ours.rate_low, ours.rate_high], rate, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose([ours.psnr_low, ours.psnr_high], psnr, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("method", bd.METHODS)
def test_bd_batch_matches_bd_metrics_row_by_row(method):
    rng = np.random.default_rng(11)
    rows = 40
    ra = np.sort(rng.uniform(0.1, 2.0, size=(rows, 4)), axis=1)
    da = np.sort(rng.uniform(25, 40, size=(rows, 4)), axis=1)
    rt = ra * rng.uniform(0.7, 1.2, size=(rows, 1))
    dt = da + rng.normal(0, 0.5, size=(rows, 4))
    for kind in ("rate", "psnr"):
        batch = bootstrap.bd_batch(ra, da, rt, dt, kind, method)
        for i in range(rows):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    expected = bd.bd_metrics(ra[i], da[i], rt[i], dt[i], kind, method).value
            except ValueError:
                assert math.isnan(batch[i]), f"row {i}: invalid curve must give NaN"
                continue
            assert batch[i] == pytest.approx(expected, rel=1e-10, abs=1e-10), f"row {i} ({kind})"


def test_coverage_of_a_known_bd_is_95_percent():
    """Curves linear in log-rate: the population BD is closed-form. Test = reference with bpp x c
    and PSNR + delta (per-image noise around both), so the mean test curve is the mean reference
    curve moved by log10(c) right and delta up: BD-PSNR = delta - slope*log10(c), BD-rate =
    (10**(log10(c) - delta/slope) - 1) * 100. Over 200 simulated test sets of 40 images the 95 %
    intervals must cover these truths 95 % +- 4 % of the time."""
    c, delta, slope = 0.8, 0.3, 6.0
    true_psnr = delta - slope * math.log10(c)
    true_rate = (10 ** (math.log10(c) - delta / slope) - 1) * 100
    rng = np.random.default_rng(2024)
    sets, n, resamples = 200, 40, 1000
    refs_r, refs_d, tests_r, tests_d = [], [], [], []
    indices = bootstrap.resample_indices(n, resamples, 5)
    for _ in range(sets):
        ref, test = _per_image_study(rng, n, c, delta, slope, noise=0.2)
        # the test's rate noise w has mean 1, so the population rate ratio stays c
        ra, da = ref.resampled(indices)
        rt, dt = test.resampled(indices)
        refs_r.append(ra), refs_d.append(da), tests_r.append(rt), tests_d.append(dt)
    ra, da, rt, dt = (np.concatenate(x) for x in (refs_r, refs_d, tests_r, tests_d))
    rate = bootstrap.bd_batch(ra, da, rt, dt, "rate").reshape(sets, resamples)
    psnr = bootstrap.bd_batch(ra, da, rt, dt, "psnr").reshape(sets, resamples)
    assert np.isfinite(rate).all() and np.isfinite(psnr).all()
    rate_lo, rate_hi = np.percentile(rate, [2.5, 97.5], axis=1)
    psnr_lo, psnr_hi = np.percentile(psnr, [2.5, 97.5], axis=1)
    cover_rate = np.mean((rate_lo <= true_rate) & (true_rate <= rate_hi))
    cover_psnr = np.mean((psnr_lo <= true_psnr) & (true_psnr <= psnr_hi))
    assert 0.91 <= cover_rate <= 0.99, cover_rate
    assert 0.91 <= cover_psnr <= 0.99, cover_psnr


def test_interval_table_from_per_image_rows():
    rng = np.random.default_rng(3)
    ref, test = _per_image_study(rng, 6)
    rows = []
    for name, curve in (("baseline", ref), ("phase1", test)):
        for li, lmbda in enumerate([0.001, 0.01, 0.1, 0.2]):
            for i in range(6):
                rows.append(
                    {
                        "dataset": "d",
                        "variant": name,
                        "lmbda": lmbda,
                        "image": f"im{i}",
                        "bpp": curve.bpp[li, i],
                        "psnr": curve.dist[li, i],
                        "ms_ssim": 0.9,
                    }
                )
    table = bootstrap.interval_table(pd.DataFrame(rows), "baseline", resamples=200, seed=0)
    by = table.set_index("variant")
    assert by.loc["baseline", ["rate_low", "rate_high", "psnr_low", "psnr_high"]].tolist() == [
        0,
        0,
        0,
        0,
    ]
    direct = bootstrap.bd_interval(ref, test, bootstrap.resample_indices(6, 200, 0))
    assert by.loc["phase1", "rate_low"] == direct.rate_low
    assert by.loc["phase1", "psnr_high"] == direct.psnr_high


def test_unpaired_images_are_an_error():
    rows = [
        {
            "dataset": "d",
            "variant": v,
            "lmbda": lm,
            "image": im,
            "bpp": 0.1 * (lm + 1),
            "psnr": 30 + lm,
            "ms_ssim": 0.9,
        }
        for v in ("baseline", "x")
        for lm in (0, 1)
        for im in ("a", "b")
    ]
    rows = [r for r in rows if not (r["variant"] == "x" and r["image"] == "b" and r["lmbda"] == 1)]
    with pytest.raises(ValueError, match="d/x: not every lambda"):
        bootstrap.interval_table(pd.DataFrame(rows), "baseline", resamples=10)
