"""ΔPSNR against the reference: the quality difference at equal rate, as a curve over rate.

The R-D plot shows every curve at its absolute quality, where a 0.1 dB difference is a line's
width; this figure subtracts the reference. For each variant, its quality minus the reference's
at the same rate, both curves interpolated in log-rate exactly as BD does
(``hpcm.analysis.bd.quality_delta``), over the overlap of the two rate ranges: the mean of each
line over log-rate is the variant's BD-PSNR (or BD-MS-SSIM) in the tables.

The band: a pointwise 95 % paired bootstrap over the test images, the tables' scheme
(``hpcm.analysis.bootstrap``: the same image indices for both curves, ``--resamples`` draws from
``--bootstrap-seed``, seeds averaged per image). At each rate, the 2.5 / 97.5 percentiles of the
resampled differences; drawn where at least 95 % of the valid resamples cover that rate (a
resample's overlap can be narrower than the means'), resamples whose curves are no valid BD
curves left out. Without ``--images`` there is no band.

One figure per dataset and metric (PSNR, MS-SSIM in dB), one panel per group of the forest plot
(``hpcm.analysis.forest.variant_groups``: phases, each study, each Phase 2 grid), so a panel
holds a handful of lines. Beside each figure, ``delta_<dataset>_<metric>.csv`` holds every drawn
line and band (variant, group, rate, delta, low, high).

CLI::

    python -m hpcm.analysis.delta --points results/rd/points.csv
        --config results/configs/analysis.yaml --output-dir results/plots/delta
        [--variants baseline phase1 ...] [--grids phase2grid] [--images results/rd/images.csv]
        [--resamples 1000] [--bootstrap-seed 0]
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")  # no display on cluster nodes and CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.ticker import FuncFormatter  # noqa: E402

from hpcm.analysis.bd import quality_delta  # noqa: E402
from hpcm.analysis.bootstrap import DEFAULT_RESAMPLES, DEFAULT_SEED, image_curve, resample_indices  # noqa: E402
from hpcm.analysis.forest import variant_groups  # noqa: E402
from hpcm.analysis.plots import save_figure, variant_colors  # noqa: E402
from hpcm.analysis.points import curve, read_points  # noqa: E402
from hpcm.analysis.tables import read_analysis, read_images  # noqa: E402
from hpcm.util.cli import run_command  # noqa: E402
from hpcm.util.io import atomic_write_text  # noqa: E402

METRICS = {"psnr": "ΔPSNR (dB)", "ms_ssim_db": "ΔMS-SSIM (dB)"}
GRID_POINTS = 101  # rates per line, evenly spaced in log-rate over the overlap
MIN_COVERAGE = 0.95  # share of valid resamples that must cover a rate for the band to be drawn
CONFIDENCE_TAILS = (2.5, 97.5)


def delta_line(
    points, dataset: str, variant: str, reference: str, metric: str, method: str
) -> tuple[np.ndarray, np.ndarray, str]:
    """(rates, delta, error): the variant's curve minus the reference's, from the mean points;
    empty arrays and the reason when either is no valid BD curve."""
    try:
        rates, delta = quality_delta(
            *curve(points, dataset, reference, metric),
            *curve(points, dataset, variant, metric),
            method,
            GRID_POINTS,
        )
    except ValueError as err:
        return np.array([]), np.array([]), str(err)
    return rates, delta, ""


def delta_band(
    images,
    dataset: str,
    variant: str,
    reference: str,
    metric: str,
    method: str,
    rates: np.ndarray,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
) -> tuple[np.ndarray, np.ndarray]:
    """(low, high) at ``rates``: the pointwise 95 % paired-bootstrap band over the test images
    (NaN where fewer than ``MIN_COVERAGE`` of the valid resamples reach that rate)."""
    on = images[images["dataset"] == dataset]
    order = sorted(on["image"].unique())
    indices = resample_indices(len(order), resamples, seed)
    ra, da = image_curve(on, dataset, reference, metric, order).resampled(indices)
    rt, dt = image_curve(on, dataset, variant, metric, order).resampled(indices)
    draws = []
    for b in range(indices.shape[0]):
        try:
            draws.append(quality_delta(ra[b], da[b], rt[b], dt[b], method, rates=rates)[1])
        except ValueError:
            continue  # not a valid BD curve pair: left out, as the tables' intervals do
    nan = np.full(len(rates), np.nan)
    if not draws:
        return nan, nan.copy()
    draws = np.asarray(draws)
    covered = np.isfinite(draws).mean(axis=0) >= MIN_COVERAGE
    low, high = nan.copy(), nan.copy()
    for k in np.flatnonzero(covered):
        column = draws[:, k]
        low[k], high[k] = np.percentile(column[np.isfinite(column)], CONFIDENCE_TAILS)
    return low, high


def panels(analysis: dict[str, Any], variants: Sequence[str], grid_variants: dict[str, list]):
    """[(title, [variant, ...]), ...]: the forest plot's groups, each variant once per panel,
    the reference left out (it is the zero line)."""
    reference = analysis.get("reference", "baseline")
    out = []
    groups = [(t, [v for _, v in rows]) for t, rows in variant_groups(analysis, variants)]
    groups += [(f"Phase 2 grid {g}", names) for g, names in grid_variants.items()]
    for title, names in groups:
        names = [v for v in dict.fromkeys(names) if v != reference]
        if names:
            out.append((title, names))
    return out


def delta_lines(
    points,
    images,
    analysis: dict[str, Any],
    dataset: str,
    metric: str,
    groups,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
):
    """One frame row per drawn rate (group, variant, rate, delta, low, high) and the notes."""
    reference = analysis.get("reference", "baseline")
    method = analysis.get("bd_method", "pchip")
    frames, notes, done = [], [], {}
    for title, names in groups:
        for variant in names:
            if variant not in done:
                rates, delta, error = delta_line(
                    points, dataset, variant, reference, metric, method
                )
                low = high = np.full(len(rates), np.nan)
                if error:
                    notes.append(f"{variant}: no line ({error})")
                elif images is not None:
                    low, high = delta_band(
                        images, dataset, variant, reference, metric, method, rates, resamples, seed
                    )
                done[variant] = (rates, delta, low, high)
            rates, delta, low, high = done[variant]
            frames.append(
                pd.DataFrame(
                    {
                        "group": title,
                        "variant": variant,
                        "rate": rates,
                        "delta": delta,
                        "low": low,
                        "high": high,
                    }
                )
            )
    frame = (
        pd.concat(frames, ignore_index=True)
        if frames
        else pd.DataFrame(columns=["group", "variant", "rate", "delta", "low", "high"])
    )
    return frame, notes


def _minor_label(value: float, _position) -> str:
    leading = round(value / 10.0 ** math.floor(math.log10(value))) if value > 0 else 0
    return f"{value:g}" if leading in (2, 3, 5) else ""


def delta_figure(frame, groups, colors: dict[str, str], title: str, ylabel: str, note: str = ""):
    """One panel per group; each variant's line (gid "line:<group>:<variant>") and band."""
    n = len(groups)
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(
        rows, cols, figsize=(4.6 * cols, 3.4 * rows + 0.6), sharex=True, sharey=True, squeeze=False
    )
    for ax, (group, names) in zip(axes.flat, groups):
        ax.axhline(0.0, color="black", linewidth=2.5, alpha=0.45, label="reference")
        for variant in names:
            sel = frame[(frame["group"] == group) & (frame["variant"] == variant)]
            if sel.empty:
                continue
            color = colors[variant]
            ax.plot(
                sel["rate"],
                sel["delta"],
                color=color,
                linewidth=1.5,
                label=variant,
                gid=f"line:{group}:{variant}",
            )
            band = sel["low"].notna() & sel["high"].notna()
            if band.any():
                ax.fill_between(
                    sel["rate"],
                    sel["low"],
                    sel["high"],
                    where=band.to_numpy(),
                    color=color,
                    alpha=0.15,
                    linewidth=0,
                )
        ax.set_xscale("log")
        # plain numbers (0.2, not 2x10^-1); minor labels at 2, 3 and 5 only
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(FuncFormatter(_minor_label))
        ax.set_title(group, fontsize=9)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7, loc="best")
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    for k, ax in enumerate(axes.flat[:n]):
        if k + cols >= n:  # the lowest panel of its column: its rate axis is labelled
            ax.xaxis.set_tick_params(which="both", labelbottom=True)
            ax.set_xlabel("Rate (bpp, log scale)")
    for ax in axes[:, 0]:
        ax.set_ylabel(ylabel)
    fig.suptitle(title, fontsize=10)
    if note:
        fig.text(0.01, 0.0, note, fontsize=7, color="0.3", va="top")
    fig.tight_layout()
    return fig


def plot_deltas(
    points,
    analysis: dict[str, Any],
    variants: Sequence[str],
    output_dir: str | Path,
    grid_names: Sequence[str] = (),
    images=None,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
) -> list[Path]:
    """delta_<dataset>_<metric>.{png,pdf,csv} for every dataset and both metrics."""
    reference = analysis.get("reference", "baseline")
    method = analysis.get("bd_method", "pchip")
    present = list(dict.fromkeys(points["variant"]))
    grid_variants = {g: [v for v in present if v.startswith(f"{g}-")] for g in grid_names}
    groups = panels(analysis, variants, grid_variants)
    colors = variant_colors(list(variants) + [v for g in grid_variants.values() for v in g])
    written = []
    for dataset in sorted(points["dataset"].unique()):
        for metric, ylabel in METRICS.items():
            if metric not in points.columns or points[metric].isna().all():
                print(f"{metric}: not measured in the R-D points; no figure", file=sys.stderr)
                continue
            frame, notes = delta_lines(
                points, images, analysis, dataset, metric, groups, resamples, seed
            )
            band = (
                f"band: pointwise 95 % paired bootstrap over the test images ({resamples} "
                "resamples)"
                if images is not None
                else "no band (no per-image table)"
            )
            quality = ylabel.split(" (")[0][1:]
            title = (
                f"{quality} difference to {reference} at equal rate on {dataset} "
                f"({method} in log-rate, as BD; the mean of a line is its BD-{quality})"
            )
            fig = delta_figure(frame, groups, colors, title, ylabel, "; ".join([band, *notes]))
            stem = f"delta_{dataset}_{metric}"
            written += save_figure(fig, output_dir, stem)
            path = Path(output_dir) / f"{stem}.csv"
            atomic_write_text(path, frame.to_csv(index=False))
            written.append(path)
    return written


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m hpcm.analysis.delta",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--points", required=True, help="R-D points CSV (hpcm rd points)")
    parser.add_argument("--config", required=True, help="YAML with the 'analysis' section")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument(
        "--variants",
        nargs="*",
        default=None,
        help="named variants in the config's order (default: the points')",
    )
    parser.add_argument(
        "--grids",
        nargs="*",
        default=[],
        help="Phase 2 grid names: their variants <grid>-... get a panel",
    )
    parser.add_argument("--images", help="per-image table (hpcm rd points --images): the band")
    parser.add_argument("--resamples", type=int, default=DEFAULT_RESAMPLES)
    parser.add_argument("--bootstrap-seed", type=int, default=DEFAULT_SEED)
    return parser


def _draw(args: argparse.Namespace) -> list[Path]:
    analysis = read_analysis(args.config)
    points = read_points(args.points)
    grids = tuple(args.grids)
    variants = args.variants or [
        v for v in dict.fromkeys(points["variant"]) if not any(v.startswith(f"{g}-") for g in grids)
    ]
    images = read_images(args.images) if args.images else None
    return plot_deltas(
        points,
        analysis,
        variants,
        args.output_dir,
        grids,
        images,
        args.resamples,
        args.bootstrap_seed,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(lambda: _draw(args), errors=(ValueError, OSError, KeyError))


if __name__ == "__main__":
    sys.exit(main())
