"""Bjøntegaard deltas: BD-rate and BD-PSNR of one R-D curve against another.

Our own implementation with three interpolations, numerically equal to the ``bjontegaard``
package (FAU-LMS, v1.3.0), which the tests use as the reference:

- ``pchip`` (default): piecewise cubic Hermite with Fritsch-Carlson/Moler slopes, as in the
  JCT-VC/JVET CTC spreadsheets;
- ``akima``: Akima (1970) slopes, linear for two points;
- ``cubic``: least-squares third-order polynomial (VCEG-M33); needs at least 4 points.

Rates are log10-transformed. BD-rate integrates log-rate over the overlap of the two distortion
ranges and returns ``(10**mean_diff - 1) * 100`` percent (negative = the test saves rate);
BD-PSNR integrates distortion over the overlap of the log-rate ranges (dB, positive = better);
``quality_delta`` gives the difference it averages, as a curve over rate (the ΔPSNR figure).
Curves are sorted by rate; a curve whose distortion does not strictly increase with rate, a
curve with too few points and curves that do not overlap raise ``ValueError`` naming the curve.
A relative overlap below ``min_overlap`` (default 75 %, as the package) is reported in
``BDResult.overlap`` / ``low_overlap`` and as a warning.

``bd_row`` / ``bd_table`` apply it to the curves of an R-D points table (``hpcm.analysis.points``).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np

from hpcm.analysis.points import curve

METHODS = ("pchip", "akima", "cubic")
DEFAULT_MIN_OVERLAP = 0.75


# --------------------------------------------------------------------------------------------
# Interpolants. Each returns an object with ``integrate(a, b)`` over x in [a, b] (inside data)
# and values at given x (``__call__``).
# --------------------------------------------------------------------------------------------


class _HermiteSpline:
    """Piecewise cubic Hermite interpolant given knots, values and slopes at the knots."""

    def __init__(self, x: np.ndarray, y: np.ndarray, slopes: np.ndarray) -> None:
        self.x, self.y, self.d = x, y, slopes
        h = np.diff(x)
        m = np.diff(y) / h
        # Power-basis coefficients per segment in s = x - x_k: y_k + d_k s + c2 s^2 + c3 s^3.
        self.c2 = (3.0 * m - 2.0 * slopes[:-1] - slopes[1:]) / h
        self.c3 = (slopes[:-1] + slopes[1:] - 2.0 * m) / h**2

    def _primitive(self, k: int, s: float) -> float:
        return (
            self.y[k] * s
            + self.d[k] * s**2 / 2.0
            + self.c2[k] * s**3 / 3.0
            + self.c3[k] * s**4 / 4.0
        )

    def __call__(self, q: np.ndarray) -> np.ndarray:
        """Values at ``q`` (inside [x_0, x_K]), the same cubic pieces that ``integrate`` sums."""
        q = np.asarray(q, dtype=float)
        k = np.clip(np.searchsorted(self.x, q, side="right") - 1, 0, len(self.x) - 2)
        s = q - self.x[k]
        return self.y[k] + self.d[k] * s + self.c2[k] * s**2 + self.c3[k] * s**3

    def integrate(self, a: float, b: float) -> float:
        total = 0.0
        for k in range(len(self.x) - 1):
            lo, hi = max(a, self.x[k]), min(b, self.x[k + 1])
            if hi > lo:
                total += self._primitive(k, hi - self.x[k]) - self._primitive(k, lo - self.x[k])
        return total


def _pchip_slopes(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Shape-preserving slopes (Fritsch & Carlson 1980; end points as in Moler's pchiptx)."""
    h = np.diff(x)
    m = np.diff(y) / h
    if len(x) == 2:
        return np.array([m[0], m[0]])
    d = np.zeros_like(y)
    for k in range(1, len(x) - 1):
        if m[k - 1] == 0 or m[k] == 0 or np.sign(m[k - 1]) != np.sign(m[k]):
            continue  # local extremum or flat segment: zero slope keeps the curve monotone
        w1, w2 = 2 * h[k] + h[k - 1], h[k] + 2 * h[k - 1]
        d[k] = (w1 + w2) / (w1 / m[k - 1] + w2 / m[k])  # weighted harmonic mean

    def end_slope(h0: float, h1: float, m0: float, m1: float) -> float:
        s = ((2 * h0 + h1) * m0 - h0 * m1) / (h0 + h1)  # one-sided three-point estimate
        if np.sign(s) != np.sign(m0):
            return 0.0
        if np.sign(m0) != np.sign(m1) and abs(s) > abs(3 * m0):
            return 3 * m0
        return s

    d[0] = end_slope(h[0], h[1], m[0], m[1])
    d[-1] = end_slope(h[-1], h[-2], m[-1], m[-2])
    return d


def _akima_slopes(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Akima (1970) slopes with two linearly extrapolated secants on each side."""
    m = np.diff(y) / np.diff(x)
    if len(x) == 2:
        return np.array([m[0], m[0]])
    left2 = 2 * m[0] - m[1]
    left1 = 2 * left2 - m[0]
    right1 = 2 * m[-1] - m[-2]
    right2 = 2 * right1 - m[-1]
    ext = np.concatenate([[left1, left2], m, [right1, right2]])  # ext[k+2] = m[k]
    weights = np.abs(np.diff(ext))  # |m_{k+1} - m_k| over the extended secants
    w_right = weights[2:]  # |m_{k+1} - m_k| for knot k
    w_left = weights[:-2]  # |m_{k-1} - m_{k-2}|
    total = w_left + w_right
    d = 0.5 * (ext[3:] + ext[:-3])  # equal-weights fallback: mean of the neighbouring secants
    # Same cut-off as the reference: weights below 1e-9 of the largest count as zero.
    defined = total > 1e-9 * total.max()
    d[defined] = (
        w_right[defined] * ext[1:-2][defined] + w_left[defined] * ext[2:-1][defined]
    ) / total[defined]
    return d


class _Polynomial:
    def __init__(self, x: np.ndarray, y: np.ndarray) -> None:
        # Least-squares fit in the power basis (VCEG-M33 uses a 3rd-order polynomial).
        vander = np.vander(x, 4)
        self.coef = np.linalg.lstsq(vander, y, rcond=None)[0]
        self.primitive = np.polyint(self.coef)

    def __call__(self, q: np.ndarray) -> np.ndarray:
        return np.polyval(self.coef, np.asarray(q, dtype=float))

    def integrate(self, a: float, b: float) -> float:
        return float(np.polyval(self.primitive, b) - np.polyval(self.primitive, a))


def _interpolant(x: np.ndarray, y: np.ndarray, method: str):
    if method == "pchip":
        return _HermiteSpline(x, y, _pchip_slopes(x, y))
    if method == "akima":
        return _HermiteSpline(x, y, _akima_slopes(x, y))
    if method == "cubic":
        return _Polynomial(x, y)
    raise ValueError(f"unknown BD method {method!r}; choose one of {', '.join(METHODS)}")


# --------------------------------------------------------------------------------------------
# Curve checks and the delta itself
# --------------------------------------------------------------------------------------------


def _prepare_curve(
    rate: Sequence[float], dist: Sequence[float], name: str, method: str
) -> tuple[np.ndarray, np.ndarray]:
    rate_arr = np.asarray(rate, dtype=float).ravel()
    dist_arr = np.asarray(dist, dtype=float).ravel()
    if rate_arr.shape != dist_arr.shape:
        raise ValueError(f"{name} curve: {rate_arr.size} rates but {dist_arr.size} distortions")
    if not (np.all(np.isfinite(rate_arr)) and np.all(np.isfinite(dist_arr))):
        raise ValueError(
            f"{name} curve has non-finite values: rate={rate_arr.tolist()}, "
            f"dist={dist_arr.tolist()}"
        )
    if np.any(rate_arr <= 0):
        raise ValueError(f"{name} curve has non-positive rates {rate_arr.tolist()}")
    min_points = 4 if method == "cubic" else 2
    if rate_arr.size < min_points:
        raise ValueError(
            f"{name} curve has {rate_arr.size} point(s); method {method!r} needs "
            f"at least {min_points}"
        )
    order = np.argsort(rate_arr, kind="stable")
    rate_arr, dist_arr = rate_arr[order], dist_arr[order]
    rising = np.diff(rate_arr) > 0
    improving = np.diff(dist_arr) > 0
    if not (np.all(rising) and np.all(improving)):
        k = int(np.flatnonzero(~(rising & improving))[0])
        raise ValueError(
            f"{name} curve is not monotonic: sorted by rate, point {k} (rate {rate_arr[k]:.6g}, "
            f"dist {dist_arr[k]:.6g}) is followed by (rate {rate_arr[k + 1]:.6g}, dist "
            f"{dist_arr[k + 1]:.6g}); distortion must strictly increase with rate"
        )
    return rate_arr, dist_arr


@dataclass(frozen=True)
class BDResult:
    """One Bjøntegaard delta with what is needed to judge it."""

    value: float  # percent for BD-rate, dB (or the metric's unit) for BD-PSNR
    kind: str  # "rate" or "psnr"
    method: str
    overlap: float  # relative overlap of the integration variable, 0..1
    low_overlap: bool  # overlap below min_overlap
    n_anchor: int
    n_test: int


def _delta(
    x_anchor: np.ndarray, y_anchor: np.ndarray, x_test: np.ndarray, y_test: np.ndarray, method: str
) -> tuple[float, float]:
    lo, hi = max(x_anchor.min(), x_test.min()), min(x_anchor.max(), x_test.max())
    span = max(x_anchor.max(), x_test.max()) - min(x_anchor.min(), x_test.min())
    overlap = max(hi - lo, 0.0) / span
    if overlap <= 0:
        raise ValueError(
            f"curves do not overlap: anchor covers [{x_anchor.min():.6g}, {x_anchor.max():.6g}], "
            f"test covers [{x_test.min():.6g}, {x_test.max():.6g}]; BD cannot be computed"
        )
    area_anchor = _interpolant(x_anchor, y_anchor, method).integrate(lo, hi)
    area_test = _interpolant(x_test, y_test, method).integrate(lo, hi)
    return (area_test - area_anchor) / (hi - lo), overlap


def bd_metrics(
    rate_anchor: Sequence[float],
    dist_anchor: Sequence[float],
    rate_test: Sequence[float],
    dist_test: Sequence[float],
    kind: str = "rate",
    method: str = "pchip",
    min_overlap: float = DEFAULT_MIN_OVERLAP,
    names: tuple[str, str] = ("anchor", "test"),
) -> BDResult:
    """BD-rate (``kind="rate"``) or BD-PSNR (``kind="psnr"``) with overlap and point counts."""
    if method not in METHODS:
        raise ValueError(f"unknown BD method {method!r}; choose one of {', '.join(METHODS)}")
    if kind not in ("rate", "psnr"):
        raise ValueError(f"kind must be 'rate' or 'psnr', got {kind!r}")
    ra, da = _prepare_curve(rate_anchor, dist_anchor, names[0], method)
    rt, dt = _prepare_curve(rate_test, dist_test, names[1], method)
    log_ra, log_rt = np.log10(ra), np.log10(rt)
    if kind == "rate":
        mean_log_diff, overlap = _delta(da, log_ra, dt, log_rt, method)
        value = (10.0**mean_log_diff - 1.0) * 100.0
    else:
        value, overlap = _delta(log_ra, da, log_rt, dt, method)
    low = overlap < min_overlap
    if low:
        warnings.warn(
            f"BD-{kind} of {names[1]} vs {names[0]}: curves overlap only "
            f"{overlap * 100:.1f} % (< {min_overlap * 100:.0f} %)",
            stacklevel=2,
        )
    return BDResult(float(value), kind, method, float(overlap), bool(low), ra.size, rt.size)


def bd_rate(
    rate_anchor: Sequence[float],
    dist_anchor: Sequence[float],
    rate_test: Sequence[float],
    dist_test: Sequence[float],
    method: str = "pchip",
    min_overlap: float = DEFAULT_MIN_OVERLAP,
) -> float:
    """Average rate difference in percent at equal distortion (negative = test is better)."""
    return bd_metrics(
        rate_anchor, dist_anchor, rate_test, dist_test, "rate", method, min_overlap
    ).value


def bd_psnr(
    rate_anchor: Sequence[float],
    dist_anchor: Sequence[float],
    rate_test: Sequence[float],
    dist_test: Sequence[float],
    method: str = "pchip",
    min_overlap: float = DEFAULT_MIN_OVERLAP,
) -> float:
    """Average distortion difference (dB for PSNR) at equal rate (positive = test is better)."""
    return bd_metrics(
        rate_anchor, dist_anchor, rate_test, dist_test, "psnr", method, min_overlap
    ).value


def quality_delta(
    rate_anchor: Sequence[float],
    dist_anchor: Sequence[float],
    rate_test: Sequence[float],
    dist_test: Sequence[float],
    method: str = "pchip",
    num: int = 101,
    rates: Sequence[float] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The curve that BD-PSNR averages: (rates, test minus anchor quality at each rate).

    ``num`` rates evenly spaced in log-rate over the overlap of the two curves' rate ranges, each
    curve interpolated in log-rate by ``method`` exactly as ``bd_metrics`` does; the mean of the
    difference over log-rate (its integral over the overlap divided by the overlap's width) is
    BD-PSNR. Given ``rates``, the difference at those rates instead (NaN outside the overlap).
    The curves are checked as for BD (sorted, monotonic, enough points); curves whose rates do
    not overlap raise ``ValueError``.
    """
    if method not in METHODS:
        raise ValueError(f"unknown BD method {method!r}; choose one of {', '.join(METHODS)}")
    if num < 2:
        raise ValueError(f"num must be at least 2 (the two ends of the overlap), got {num}")
    ra, da = _prepare_curve(rate_anchor, dist_anchor, "anchor", method)
    rt, dt = _prepare_curve(rate_test, dist_test, "test", method)
    log_ra, log_rt = np.log10(ra), np.log10(rt)
    lo, hi = max(log_ra[0], log_rt[0]), min(log_ra[-1], log_rt[-1])
    if hi <= lo:
        raise ValueError(
            f"curves do not overlap in rate: anchor covers [{ra[0]:.6g}, "
            f"{ra[-1]:.6g}] bpp, test [{rt[0]:.6g}, {rt[-1]:.6g}] bpp"
        )
    if rates is None:
        grid = np.linspace(lo, hi, num)
    else:
        grid = np.log10(np.asarray(rates, dtype=float))
    delta = _interpolant(log_rt, dt, method)(grid) - _interpolant(log_ra, da, method)(grid)
    # outside the overlap one curve would be extrapolated: BD never integrates there
    inside = (grid >= lo) & (grid <= hi)
    return 10.0**grid, np.where(inside, delta, np.nan)


@dataclass
class BDRow:
    dataset: str
    variant: str
    reference: str
    metric: str
    method: str
    bd_rate: float
    bd_psnr: float
    overlap_rate: float
    overlap_psnr: float
    low_overlap: bool
    n_reference: int
    n_test: int
    error: str


def bd_row(
    dataset: str,
    variant: str,
    reference: str,
    ref_curve,
    test_curve,
    metric: str,
    method: str,
    min_overlap: float = DEFAULT_MIN_OVERLAP,
) -> BDRow:
    """BD-rate and BD-metric of one curve against a reference; failures become an ``error`` text.

    A table must show every variant, so an invalid curve (too few points, non-monotonic, no
    overlap) yields NaN numbers plus the reason instead of aborting the whole table.
    """
    names = (f"{dataset}/{reference}", f"{dataset}/{variant}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # low overlap is recorded in the row instead
            rate = bd_metrics(*ref_curve, *test_curve, "rate", method, min_overlap, names)
            dist = bd_metrics(*ref_curve, *test_curve, "psnr", method, min_overlap, names)
    except ValueError as err:
        return BDRow(
            dataset,
            variant,
            reference,
            metric,
            method,
            math.nan,
            math.nan,
            math.nan,
            math.nan,
            False,
            len(ref_curve[0]),
            len(test_curve[0]),
            str(err),
        )
    return BDRow(
        dataset,
        variant,
        reference,
        metric,
        method,
        rate.value,
        dist.value,
        rate.overlap,
        dist.overlap,
        rate.low_overlap or dist.low_overlap,
        rate.n_anchor,
        rate.n_test,
        "",
    )


def bd_table(
    points,
    reference: str,
    metric: str = "psnr",
    method: str = "pchip",
    anchor_curves: dict[str, tuple[np.ndarray, np.ndarray] | str] | None = None,
    variants: Sequence[str] | None = None,
):
    """BD of every variant (except the reference) per dataset.

    ``reference`` is a variant name in ``points`` unless ``anchor_curves`` maps dataset -> curve
    (a published anchor), in which case every variant is compared with that curve; a dataset
    mapped to a string instead of a curve (or absent from the mapping) has no such anchor: its
    variants get n/a rows with that string (or a generic reason) as the error.
    """
    import pandas as pd  # why: slow to import (~0.5 s); the commands that need it load it

    rows = []
    for dataset in sorted(points["dataset"].unique()):
        if anchor_curves is not None:
            ref = anchor_curves.get(dataset, f"no {reference!r} curve for dataset {dataset!r}")
            if isinstance(ref, str):  # no anchor here: n/a rows that say why, not silence
                names = variants or sorted(
                    points.loc[points["dataset"] == dataset, "variant"].unique()
                )
                for variant in names:
                    n_test = curve(points, dataset, variant, metric)[0].size
                    rows.append(
                        asdict(
                            BDRow(
                                dataset,
                                variant,
                                reference,
                                metric,
                                method,
                                math.nan,
                                math.nan,
                                math.nan,
                                math.nan,
                                False,
                                0,
                                n_test,
                                ref,
                            )
                        )
                    )
                continue
        else:
            ref = curve(points, dataset, reference, metric)
            if ref[0].size == 0:
                raise ValueError(f"reference variant {reference!r} has no points on {dataset!r}")
        names = variants or sorted(points.loc[points["dataset"] == dataset, "variant"].unique())
        for variant in names:
            if anchor_curves is None and variant == reference:
                continue
            test = curve(points, dataset, variant, metric)
            rows.append(asdict(bd_row(dataset, variant, reference, ref, test, metric, method)))
    return pd.DataFrame(rows, columns=list(BDRow.__dataclass_fields__))
