"""Paired bootstrap confidence intervals of BD-rate and BD-PSNR over the test images.

One resample draws ``n`` image indices with replacement (``n`` = number of test images), the
same indices for every lambda of both curves (paired: the reference and the tested variant are
measured on the same images). Each curve's mean points are recomputed from the resampled images
(PSNR averaged in dB, bpp and linear MS-SSIM averaged, as ``hpcm.analysis.points``), then BD is
recomputed. The interval is the 2.5 / 97.5 percentile of the resampled BDs; the point estimate
stays the BD of the plain means (``hpcm.analysis.bd``).

Resampling scheme (fixed, so a test can rebuild it independently):
``np.random.default_rng(seed).integers(0, n, size=(resamples, n))``, one draw per dataset,
shared by all variants of that dataset.

The BD of the resamples is vectorised over resamples (``bd_batch``); for ``pchip`` it follows
``hpcm.analysis.bd`` step by step in array form (the tests compare both), the other methods call
``hpcm.analysis.bd.bd_metrics`` once per resample (slower, same numbers).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from hpcm.analysis.bd import bd_metrics

DEFAULT_RESAMPLES = 1000
DEFAULT_SEED = 0
CONFIDENCE = 0.95


# --------------------------------------------------------------------------------------------
# BD of many curve pairs at once (pchip)
# --------------------------------------------------------------------------------------------


def _pchip_slopes_batch(h: np.ndarray, m: np.ndarray) -> np.ndarray:
    """hpcm.analysis.bd._pchip_slopes for every row of (B, K-1) step widths and secants."""
    rows, segments = m.shape
    if segments == 1:
        return np.concatenate([m, m], axis=1)
    d = np.zeros((rows, segments + 1))
    for k in range(1, segments):
        m0, m1, h0, h1 = m[:, k - 1], m[:, k], h[:, k - 1], h[:, k]
        same = (m0 != 0) & (m1 != 0) & (np.sign(m0) == np.sign(m1))
        w1, w2 = 2 * h1 + h0, h1 + 2 * h0
        with np.errstate(divide="ignore", invalid="ignore"):
            d[:, k] = np.where(same, (w1 + w2) / (w1 / m0 + w2 / m1), 0.0)

    def end_slope(h0, h1, m0, m1):
        s = ((2 * h0 + h1) * m0 - h0 * m1) / (h0 + h1)
        clipped = np.where((np.sign(m0) != np.sign(m1)) & (np.abs(s) > np.abs(3 * m0)), 3 * m0, s)
        return np.where(np.sign(s) != np.sign(m0), 0.0, clipped)

    d[:, 0] = end_slope(h[:, 0], h[:, 1], m[:, 0], m[:, 1])
    d[:, -1] = end_slope(h[:, -1], h[:, -2], m[:, -1], m[:, -2])
    return d


def _hermite_integral(x: np.ndarray, y: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Integral over [a, b] of the pchip interpolant of each row (x, y: (B, K); a, b: (B,))."""
    h = np.diff(x, axis=1)
    m = np.diff(y, axis=1) / h
    d = _pchip_slopes_batch(h, m)
    c2 = (3.0 * m - 2.0 * d[:, :-1] - d[:, 1:]) / h
    c3 = (d[:, :-1] + d[:, 1:] - 2.0 * m) / h**2
    total = np.zeros(x.shape[0])
    for k in range(x.shape[1] - 1):
        lo, hi = np.maximum(a, x[:, k]), np.minimum(b, x[:, k + 1])

        def primitive(s, k=k):  # k bound now: called in this iteration only
            return (
                y[:, k] * s + d[:, k] * s**2 / 2.0 + c2[:, k] * s**3 / 3.0 + c3[:, k] * s**4 / 4.0
            )

        part = primitive(hi - x[:, k]) - primitive(lo - x[:, k])
        total += np.where(hi > lo, part, 0.0)
    return total


def _sorted_valid(rate: np.ndarray, dist: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows sorted by rate, and which rows are valid BD curves (finite, rate > 0, both rising)."""
    order = np.argsort(rate, axis=1, kind="stable")
    rate = np.take_along_axis(rate, order, axis=1)
    dist = np.take_along_axis(dist, order, axis=1)
    valid = (
        np.isfinite(rate).all(1)
        & np.isfinite(dist).all(1)
        & (rate > 0).all(1)
        & (np.diff(rate, axis=1) > 0).all(1)
        & (np.diff(dist, axis=1) > 0).all(1)
    )
    return rate, dist, valid


def bd_batch(
    rate_anchor: np.ndarray,
    dist_anchor: np.ndarray,
    rate_test: np.ndarray,
    dist_test: np.ndarray,
    kind: str,
    method: str = "pchip",
) -> np.ndarray:
    """BD-rate (%) or BD-PSNR of each row pair of (B, K) curves; NaN where a row is no valid
    curve pair (not monotonic, no overlap), as ``bd_metrics`` would raise there."""
    if kind not in ("rate", "psnr"):
        raise ValueError(f"kind must be 'rate' or 'psnr', got {kind!r}")
    arrays = [np.asarray(a, dtype=float) for a in (rate_anchor, dist_anchor, rate_test, dist_test)]
    if (
        any(a.ndim != 2 for a in arrays)
        or arrays[0].shape != arrays[1].shape
        or arrays[2].shape != arrays[3].shape
        or arrays[0].shape[0] != arrays[2].shape[0]
    ):
        raise ValueError(
            "bd_batch needs (B, K) rate and distortion arrays with the same B; got "
            + ", ".join(str(a.shape) for a in arrays)
        )
    if method != "pchip":
        return _bd_loop(*arrays, kind, method)
    if min(arrays[0].shape[1], arrays[2].shape[1]) < 2:  # bd_metrics: too few points
        return np.full(arrays[0].shape[0], np.nan)
    ra, da, ok_a = _sorted_valid(arrays[0], arrays[1])
    rt, dt, ok_t = _sorted_valid(arrays[2], arrays[3])
    valid = ok_a & ok_t
    # invalid rows get a harmless dummy curve so the arithmetic below stays finite
    dummy = np.arange(1.0, ra.shape[1] + 1.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        la, lt = (
            np.log10(np.where(valid[:, None], ra, dummy)),
            np.log10(np.where(valid[:, None], rt, dummy[: rt.shape[1]])),
        )
    da = np.where(valid[:, None], da, dummy)
    dt = np.where(valid[:, None], dt, dummy[: dt.shape[1]])
    if kind == "rate":
        xa, ya, xt, yt = da, la, dt, lt
    else:
        xa, ya, xt, yt = la, da, lt, dt
    lo = np.maximum(xa[:, 0], xt[:, 0])
    hi = np.minimum(xa[:, -1], xt[:, -1])
    valid &= hi > lo
    width = np.where(valid, hi - lo, 1.0)
    delta = (_hermite_integral(xt, yt, lo, hi) - _hermite_integral(xa, ya, lo, hi)) / width
    value = (10.0**delta - 1.0) * 100.0 if kind == "rate" else delta
    return np.where(valid, value, np.nan)


def _bd_loop(ra, da, rt, dt, kind, method):
    out = np.full(ra.shape[0], np.nan)
    for i in range(ra.shape[0]):
        try:
            out[i] = bd_metrics(ra[i], da[i], rt[i], dt[i], kind, method, min_overlap=0.0).value
        except ValueError:
            pass  # counted as an invalid resample by the caller
    return out


# --------------------------------------------------------------------------------------------
# Resampled mean curves and the intervals
# --------------------------------------------------------------------------------------------


def resample_indices(
    n_images: int, resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED
) -> np.ndarray:
    """(resamples, n_images) image indices drawn with replacement (the documented scheme)."""
    if n_images < 2:
        raise ValueError(f"a bootstrap over images needs at least 2 images, got {n_images}")
    return np.random.default_rng(seed).integers(0, n_images, size=(resamples, n_images))


def resampled_means(per_image: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """(L, n) per-image values -> (B, L) means over each resample's images."""
    return per_image[:, indices].mean(axis=2).T


@dataclass(frozen=True)
class Curve:
    """One curve's per-image values: (L lambdas, n images), images in a fixed order."""

    bpp: np.ndarray
    dist: np.ndarray  # PSNR in dB, or linear MS-SSIM when ``linear_ms_ssim``
    linear_ms_ssim: bool = False

    def resampled(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        rate = resampled_means(self.bpp, indices)
        dist = resampled_means(self.dist, indices)
        if self.linear_ms_ssim:
            with np.errstate(divide="ignore"):
                dist = -10.0 * np.log10(
                    1.0 - dist
                )  # hpcm.evaluate.metrics.ms_ssim_to_db, element-wise
        return rate, dist


@dataclass(frozen=True)
class Interval:
    rate_low: float
    rate_high: float
    psnr_low: float
    psnr_high: float
    resamples: int
    invalid: int  # resamples whose curves were not valid BD curves (left out of the interval)


def _percentiles(values: np.ndarray) -> tuple[float, float]:
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return math.nan, math.nan
    tail = (1.0 - CONFIDENCE) / 2.0 * 100.0
    low, high = np.percentile(finite, [tail, 100.0 - tail])
    return float(low), float(high)


def bd_interval(
    reference: Curve, test: Curve, indices: np.ndarray, method: str = "pchip"
) -> Interval:
    """95 % percentile interval of BD-rate and BD-PSNR of ``test`` vs ``reference``."""
    if reference.bpp.shape[1] != test.bpp.shape[1]:
        raise ValueError(
            f"paired bootstrap needs the same images for both curves: reference has "
            f"{reference.bpp.shape[1]}, test {test.bpp.shape[1]}"
        )
    ra, da = reference.resampled(indices)
    rt, dt = test.resampled(indices)
    rate = bd_batch(ra, da, rt, dt, "rate", method)
    psnr = bd_batch(ra, da, rt, dt, "psnr", method)
    invalid = int(np.count_nonzero(~(np.isfinite(rate) & np.isfinite(psnr))))
    return Interval(
        *_percentiles(rate), *_percentiles(psnr), resamples=indices.shape[0], invalid=invalid
    )


def excludes_zero(low: float, high: float) -> bool | float:
    """True when the interval lies strictly on one side of 0 (NaN when there is no interval)."""
    if math.isnan(low) or math.isnan(high):
        return math.nan
    return bool(low > 0 or high < 0)


# --------------------------------------------------------------------------------------------
# From the per-image table of hpcm.analysis.points
# --------------------------------------------------------------------------------------------


def image_curve(images, dataset: str, variant: str, metric: str, image_order: list[str]) -> Curve:
    """The (L, n) per-image matrices of one (dataset, variant), seeds already averaged."""
    sel = images[(images["dataset"] == dataset) & (images["variant"] == variant)]
    if metric == "psnr":
        column, linear = "psnr", False
    elif metric == "ms_ssim_db":
        column, linear = "ms_ssim", True
    else:
        raise ValueError(f"unknown metric {metric!r} (psnr or ms_ssim_db)")
    bpp = sel.pivot_table(index="lmbda", columns="image", values="bpp", aggfunc="mean")
    dist = sel.pivot_table(index="lmbda", columns="image", values=column, aggfunc="mean")
    missing = [name for name in image_order if name not in bpp.columns]
    if missing or bpp.isna().any().any():
        raise ValueError(
            f"{dataset}/{variant}: not every lambda was evaluated on the same images "
            f"(missing {missing or 'some (image, lambda) pairs'}); a paired bootstrap "
            "needs them all"
        )
    return Curve(bpp[image_order].to_numpy(float), dist[image_order].to_numpy(float), linear)


def interval_table(
    images,
    reference: str,
    metric: str = "psnr",
    method: str = "pchip",
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
):
    """One row per (dataset, variant): the 95 % interval of BD-rate and BD-PSNR vs ``reference``
    (the reference's own row too: its curve against itself, [0, 0])."""
    import pandas as pd  # why: slow to import (~0.5 s); the commands that need it load it

    rows = []
    for dataset in sorted(images["dataset"].unique()):
        on = images[images["dataset"] == dataset]
        order = sorted(on["image"].unique())
        indices = resample_indices(len(order), resamples, seed)
        ref = image_curve(on, dataset, reference, metric, order)
        for variant in sorted(on["variant"].unique()):
            test = image_curve(on, dataset, variant, metric, order)
            interval = bd_interval(ref, test, indices, method)
            rows.append(
                {
                    "dataset": dataset,
                    "variant": variant,
                    "n_images": len(order),
                    **interval.__dict__,
                }
            )
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------------------
# Seeds and images: the interval of a study trained with several seeds (docs/results.md)
# --------------------------------------------------------------------------------------------
#
# BD of the seed-averaged curves, with a 95 % interval BD +- t(nu) * sqrt(v_seed + v_image):
# - v_seed = var(b_1..b_S, ddof=1) / S, b_s = BD of the test's seed s against the reference's
#   seed s on all images (seed s of both variants shares its initialisation and batch order);
# - v_image = the paired image bootstrap's variance of the seed-averaged BD (the resampling of
#   ``resample_indices``), times n / (n - 1) (a bootstrap variance of a mean is (n - 1) / n of
#   the unbiased one);
# - nu: Welch-Satterthwaite degrees of freedom of the two components (S - 1 and n - 1).
# Three seeds are too few for a bootstrap over seeds (10 distinct resamples; its percentile
# interval covers ~75 % when seed noise dominates); the t quantile with S - 1 degrees of freedom
# is what keeps the nominal level there (tests/analysis/test_seed_interval.py measures it).


@dataclass(frozen=True)
class SeedImageInterval:
    bd_rate: float  # BD-rate (%) of the seed-averaged curves
    low: float
    high: float
    seed_bd: tuple[float, ...]  # b_s per seed, in seed order
    seed_sd: float  # SD (ddof=1) of seed_bd
    v_seed: float
    v_image: float
    dof: float  # Welch-Satterthwaite degrees of freedom of the interval's t quantile
    resamples: int
    invalid: int  # image resamples without a valid BD curve pair (left out of v_image)

    @property
    def excludes_zero(self) -> bool | float:
        return excludes_zero(self.low, self.high)


def satterthwaite_dof(v_seed: float, dof_seed: int, v_image: float, dof_image: int) -> float:
    """Degrees of freedom of a sum of two independent variance estimates (Welch-Satterthwaite)."""
    denominator = v_seed**2 / dof_seed + v_image**2 / dof_image
    return math.inf if denominator == 0 else (v_seed + v_image) ** 2 / denominator


def _seed_mean_curve(curves: list[Curve]) -> Curve:
    return Curve(
        np.mean([c.bpp for c in curves], axis=0),
        np.mean([c.dist for c in curves], axis=0),
        curves[0].linear_ms_ssim,
    )


def mean_curve_bd(curve_a: Curve, curve_b: Curve, method: str) -> float:
    """BD-rate of the mean curves over all images (the identity resample)."""
    every = np.arange(curve_a.bpp.shape[1])[None, :]
    ra, da = curve_a.resampled(every)
    rt, dt = curve_b.resampled(every)
    return float(bd_batch(ra, da, rt, dt, "rate", method)[0])


def seed_image_interval(
    reference: list[Curve], test: list[Curve], indices: np.ndarray, method: str = "pchip"
) -> SeedImageInterval:
    """95 % interval of the BD-rate of ``test`` vs ``reference`` over seeds and images.

    ``reference[s]`` and ``test[s]`` are seed s of each variant (the same seeds, in the same
    order), every curve on the same images in the same order; ``indices``: image resamples.
    """
    from scipy import stats  # why: slow to import; only this interval needs it

    if len(reference) != len(test) or len(test) < 2:
        raise ValueError(
            f"a seed-and-image interval needs the same >= 2 seeds in both variants; "
            f"got {len(reference)} reference and {len(test)} test seed(s)"
        )
    n_images = test[0].bpp.shape[1]
    if any(c.bpp.shape[1] != n_images for c in (*reference, *test)):
        raise ValueError("every seed of both variants must be evaluated on the same images")
    ref_mean, test_mean = _seed_mean_curve(reference), _seed_mean_curve(test)
    value = mean_curve_bd(ref_mean, test_mean, method)
    seed_bd = tuple(mean_curve_bd(r, t, method) for r, t in zip(reference, test))
    ra, da = ref_mean.resampled(indices)
    rt, dt = test_mean.resampled(indices)
    boot = bd_batch(ra, da, rt, dt, "rate", method)
    finite = boot[np.isfinite(boot)]
    n_seeds = len(test)
    if not (math.isfinite(value) and all(map(math.isfinite, seed_bd)) and finite.size > 1):
        return SeedImageInterval(
            value,
            math.nan,
            math.nan,
            seed_bd,
            math.nan,
            math.nan,
            math.nan,
            math.nan,
            indices.shape[0],
            int(boot.size - finite.size),
        )
    seed_sd = float(np.std(seed_bd, ddof=1))
    v_seed = seed_sd**2 / n_seeds
    v_image = float(np.var(finite, ddof=1)) * n_images / (n_images - 1)
    dof = satterthwaite_dof(v_seed, n_seeds - 1, v_image, n_images - 1)
    half = float(stats.t.ppf(0.5 + CONFIDENCE / 2.0, dof)) * math.sqrt(v_seed + v_image)
    return SeedImageInterval(
        value,
        value - half,
        value + half,
        seed_bd,
        seed_sd,
        v_seed,
        v_image,
        dof,
        indices.shape[0],
        int(boot.size - finite.size),
    )


def seed_curves(
    images, dataset: str, variant: str, metric: str, image_order: list[str]
) -> dict[int, Curve]:
    """{seed: (L, n) per-image curve} of one (dataset, variant) from the per-image table."""
    sel = images[(images["dataset"] == dataset) & (images["variant"] == variant)]
    return {
        int(seed): image_curve(group, dataset, variant, metric, image_order)
        for seed, group in sel.groupby("seed", sort=True)
    }


def seed_interval_table(
    images,
    reference: str,
    metric: str = "psnr",
    method: str = "pchip",
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
):
    """One row per (dataset, variant other than the reference): :func:`seed_image_interval`.

    Every variant must have the reference's seeds (an error naming the variant otherwise).
    """
    import pandas as pd  # why: slow to import (~0.5 s); the commands that need it load it

    rows = []
    for dataset in sorted(images["dataset"].unique()):
        on = images[images["dataset"] == dataset]
        order = sorted(on["image"].unique())
        indices = resample_indices(len(order), resamples, seed)
        ref = seed_curves(on, dataset, reference, metric, order)
        for variant in sorted(set(on["variant"].unique()) - {reference}):
            test = seed_curves(on, dataset, variant, metric, order)
            if sorted(test) != sorted(ref):
                raise ValueError(
                    f"{dataset}/{variant}: seeds {sorted(test)} but the reference "
                    f"{reference!r} has {sorted(ref)}; a seed-paired interval needs "
                    "the same seeds (train the missing runs or drop them)"
                )
            seeds = sorted(ref)
            result = seed_image_interval(
                [ref[s] for s in seeds], [test[s] for s in seeds], indices, method
            )
            rows.append(
                {
                    "dataset": dataset,
                    "variant": variant,
                    "n_seeds": len(seeds),
                    "n_images": len(order),
                    "seeds": seeds,
                    **result.__dict__,
                    "excludes_zero": result.excludes_zero,
                }
            )
    return pd.DataFrame(rows)
