"""The BD forest plot: every variant's BD-rate against the reference with its 95 % interval.

One figure per dataset and quality metric (PSNR, MS-SSIM in dB): one row per variant, a point
at its BD-rate, a bar over its interval, a line at 0, the value and interval written at the
right, and rows grouped by study:

- "Phases": the named variants that no study lists, and those ``analysis.gains`` names;
- one group per study of ``analysis.studies`` (Study 1, Study 2, Phase 4, ...), its rows labelled
  as the study's table labels them (a variant shared by several studies appears in each);
- one group per Phase 2 grid table (``hpcm.analysis.phase2``), rows labelled by γ and w_lr.

Every number is read from the tables, never recomputed: named variants from ``summary.csv``
(``hpcm.analysis.summary``: BD-rate vs the reference for both metrics, its bootstrap interval),
grid points from ``<grid>.csv`` (BD-rate and interval for the metric the grid was measured in,
``--grid-metric``; the other metric's figure has no grid group and says so). Where a variant was
trained with more than one seed, each seed's own BD-rate is a small grey mark on its row: seed s
against the reference's seed s, or against the reference's seed-averaged curve where the
reference lacks that seed (the definition of the tables' seed std, ``hpcm.analysis.tables``),
from the per-image table (``--images``).

Beside each figure, ``forest_<dataset>_<metric>.csv`` lists exactly what was drawn (group, label,
variant, BD-rate, interval, per-seed values, source table), so a test can hold it against the
tables.

CLI::

    python -m hpcm.analysis.forest --summary results/tables/summary.csv
        --config results/configs/analysis.yaml --output-dir results/plots/forest
        [--variants baseline phase1 ...] [--grid-table results/tables/phase2grid.csv ...]
        [--grid-metric psnr] [--images results/rd/images.csv]
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")  # no display on cluster nodes and CI
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from hpcm.analysis.bd import bd_row  # noqa: E402
from hpcm.analysis.bootstrap import excludes_zero  # noqa: E402
from hpcm.analysis.plots import METRIC_LABELS, save_figure  # noqa: E402
from hpcm.analysis.points import curve, read_table, seed_points  # noqa: E402
from hpcm.analysis.tables import TableError, read_analysis, read_images  # noqa: E402
from hpcm.util.cli import run_command  # noqa: E402
from hpcm.util.io import atomic_write_text  # noqa: E402

# the summary's column label of each metric (hpcm.analysis.summary.METRICS)
SUMMARY_LABELS = {"psnr": "PSNR", "ms_ssim_db": "MS-SSIM"}
GRID_COLUMNS = (
    "dataset",
    "variant",
    "gamma",
    "w_lr",
    "BD-rate (%)",
    "BD-rate low (%)",
    "BD-rate high (%)",
)
BETTER, WORSE, UNDECIDED = "#1f77b4", "#d62728", "0.35"
SIDECAR_COLUMNS = (
    "group",
    "label",
    "variant",
    "dataset",
    "metric",
    "bd_rate",
    "low",
    "high",
    "excludes_zero",
    "seed_values",
    "source",
)


@dataclass
class Row:
    """One drawn row: a variant's BD-rate, interval and per-seed values in one group."""

    group: str
    label: str
    variant: str
    bd_rate: float
    low: float
    high: float
    source: str  # the table the numbers come from
    seeds: list[float] = field(default_factory=list)

    @property
    def excludes_zero(self) -> bool | float:
        return excludes_zero(self.low, self.high)


# --------------------------------------------------------------------------------------------
# Rows from the tables
# --------------------------------------------------------------------------------------------


def summary_column(metric: str, reference: str) -> str:
    """The summary.csv column of BD-rate vs ``reference`` in ``metric`` (low / high: + suffix)."""
    if metric not in SUMMARY_LABELS:
        raise ValueError(f"unknown metric {metric!r}; choose one of {', '.join(SUMMARY_LABELS)}")
    return f"{SUMMARY_LABELS[metric]} BD-rate vs {reference} (%)"


def read_summary(path: str | Path, reference: str):
    columns = ["dataset", "variant"]
    for metric in SUMMARY_LABELS:
        key = summary_column(metric, reference)
        columns += [key, f"{key} low", f"{key} high"]
    return read_table(
        path,
        columns,
        "summary table",
        f" (vs reference {reference!r}); write it with `python -m hpcm.analysis.summary`",
        error=TableError,
    )


def read_grid(path: str | Path):
    return read_table(
        path,
        GRID_COLUMNS,
        "Phase 2 grid table",
        "; write it with `python -m hpcm.analysis.phase2`",
        error=TableError,
    )


def variant_groups(analysis: dict[str, Any], variants: Sequence[str]) -> list[tuple[str, list]]:
    """[(group title, [(label, variant), ...]), ...]: the phases first, then each study."""
    studies = analysis.get("studies") or {}
    in_study = {v for study in studies.values() for v in (study.get("rows") or {}).values()}
    gains = set((analysis.get("gains") or {}).values())
    reference = analysis.get("reference", "baseline")
    phases = [(v, v) for v in variants if v != reference and (v in gains or v not in in_study)]
    groups = [("Phases", phases)] if phases else []
    for name, study in studies.items():
        # a label that already names its variant ("none (phase1)") is kept as it is
        rows = [
            (label if v in label else f"{label} ({v})", v)
            for label, v in (study.get("rows") or {}).items()
        ]
        groups.append((str(study.get("title") or name), rows))
    return groups


def _summary_row(summary, dataset: str, variant: str, column: str, source: str):
    hit = summary[(summary["dataset"] == dataset) & (summary["variant"] == variant)]
    if hit.empty:
        raise TableError(
            f"{source}: no row for variant {variant!r} on dataset {dataset!r} "
            "(summarise every variant that a study lists: --variants)"
        )
    r = hit.iloc[0]
    return float(r[column]), float(r[f"{column} low"]), float(r[f"{column} high"])


def forest_rows(
    summary,
    dataset: str,
    metric: str,
    analysis: dict[str, Any],
    variants: Sequence[str],
    grids: dict[str, Any] | None = None,
    grid_metric: str | None = None,
    seed_values: dict | None = None,
    summary_name: str = "summary.csv",
) -> list[Row]:
    """The rows of one figure, in drawing order (top to bottom).

    ``grids``: grid name -> its table (drawn only when ``metric == grid_metric``);
    ``seed_values``: (dataset, variant, metric) -> per-seed BD-rates (``per_seed_bd_rates``).
    """
    reference = analysis.get("reference", "baseline")
    column = summary_column(metric, reference)
    seed_values = seed_values or {}
    rows = []
    for title, members in variant_groups(analysis, variants):
        for label, variant in members:
            value, low, high = _summary_row(summary, dataset, variant, column, summary_name)
            rows.append(
                Row(
                    title,
                    label,
                    variant,
                    value,
                    low,
                    high,
                    summary_name,
                    list(seed_values.get((dataset, variant, metric), [])),
                )
            )
    if metric == grid_metric:
        for grid, table in (grids or {}).items():
            sel = table[table["dataset"] == dataset].sort_values(["gamma", "w_lr"])
            for _, r in sel.iterrows():
                variant = str(r["variant"])
                label = f"γ={r['gamma']:g}, w_lr={r['w_lr']:g}"
                if not variant.startswith(f"{grid}-"):
                    label += f" ({variant})"
                rows.append(
                    Row(
                        f"Phase 2 grid {grid}",
                        label,
                        variant,
                        float(r["BD-rate (%)"]),
                        float(r["BD-rate low (%)"]),
                        float(r["BD-rate high (%)"]),
                        f"{grid}.csv",
                        list(seed_values.get((dataset, variant, metric), [])),
                    )
                )
    return rows


def per_seed_bd_rates(
    images, reference: str, method: str, metrics: Sequence[str] = tuple(SUMMARY_LABELS)
) -> dict:
    """(dataset, variant, metric) -> BD-rate (%) of each training seed, for variants trained with
    more than one seed: seed s against the reference's seed s where it has it, else against the
    reference's seed-averaged curve (as ``hpcm.analysis.tables.seed_spread``)."""
    per_seed = seed_points(images)
    means = (
        per_seed.groupby(["dataset", "variant", "lmbda"])[["bpp", "psnr", "ms_ssim_db"]]
        .mean()
        .reset_index()
    )
    counts = per_seed.groupby(["dataset", "variant"])["seed"].nunique()
    out: dict = {}
    for (dataset, variant), n in counts.items():
        if n <= 1:
            continue
        mine = per_seed[(per_seed["dataset"] == dataset) & (per_seed["variant"] == variant)]
        for metric in metrics:
            values = []
            for seed, group in mine.groupby("seed"):
                ref = per_seed[
                    (per_seed["dataset"] == dataset)
                    & (per_seed["variant"] == reference)
                    & (per_seed["seed"] == seed)
                ]
                if ref.empty:
                    ref = means[(means["dataset"] == dataset) & (means["variant"] == reference)]
                row = bd_row(
                    dataset,
                    variant,
                    reference,
                    curve(ref, dataset, reference, metric),
                    curve(group, dataset, variant, metric),
                    metric,
                    method,
                )
                values.append(row.bd_rate)
            out[(dataset, variant, metric)] = values
    return out


# --------------------------------------------------------------------------------------------
# The figure
# --------------------------------------------------------------------------------------------


def _interval_text(row: Row) -> str:
    if not math.isfinite(row.bd_rate):
        return "n/a"
    text = f"{row.bd_rate:+.2f}"
    if math.isfinite(row.low) and math.isfinite(row.high):
        text += f"  [{row.low:+.2f}, {row.high:+.2f}]"
    return text


def _color(row: Row) -> str:
    if row.excludes_zero is True:
        return BETTER if row.bd_rate < 0 else WORSE
    return UNDECIDED


def _layout(rows: Sequence[Row]) -> tuple[list[tuple[float, str, bool]], list[float]]:
    """Tick positions: (y, text, is_group_title) and each row's y, top to bottom."""
    ticks, ys, y, group = [], [], 0.0, None
    for row in rows:
        if row.group != group:
            if group is not None:
                y -= 0.5  # a gap between groups
            ticks.append((y, row.group, True))
            y -= 1.0
            group = row.group
        ticks.append((y, row.label, False))
        ys.append(y)
        y -= 1.0
    return ticks, ys


def forest_figure(rows: Sequence[Row], title: str, xlabel: str, note: str = ""):
    """The figure of ``rows``; every point, bar and seed mark carries a ``gid`` naming its row
    ("point|bar|seeds:<group>:<label>"), so that what was drawn can be read back."""
    ticks, ys = _layout(rows)
    height = 1.9 + 0.27 * len(ticks)
    fig, ax = plt.subplots(figsize=(8.6, height))
    ax.axvline(0.0, color="0.2", linewidth=1.0, zorder=1)
    for row, y in zip(rows, ys):
        key = f"{row.group}:{row.label}"
        color = _color(row)
        if math.isfinite(row.low) and math.isfinite(row.high):
            ax.hlines(y, row.low, row.high, color=color, linewidth=2.0, zorder=2, gid=f"bar:{key}")
        if row.seeds:
            ax.plot(
                row.seeds,
                [y] * len(row.seeds),
                linestyle="none",
                marker="|",
                markersize=9,
                color="0.45",
                zorder=3,
                gid=f"seeds:{key}",
            )
        if math.isfinite(row.bd_rate):
            filled = row.excludes_zero is True
            ax.plot(
                [row.bd_rate],
                [y],
                linestyle="none",
                marker="o",
                markersize=6,
                color=color,
                markerfacecolor=color if filled else "white",
                zorder=4,
                gid=f"point:{key}",
            )
        ax.text(
            1.02,
            y,
            _interval_text(row),
            transform=ax.get_yaxis_transform(),
            va="center",
            ha="left",
            fontsize=8,
            family="monospace",
        )
    ax.set_yticks([t[0] for t in ticks], [t[1] for t in ticks], fontsize=8)
    for label, (_, _, is_title) in zip(ax.get_yticklabels(), ticks):
        if is_title:
            label.set_fontweight("bold")
    for y, _, is_title in ticks:
        if is_title:
            ax.axhline(y, color="0.85", linewidth=6, zorder=0)
    ax.tick_params(axis="y", length=0)
    ax.set_ylim(min(ys, default=0.0) - 0.8, 0.8)
    values = [v for r in rows for v in (r.bd_rate, r.low, r.high, *r.seeds) if math.isfinite(v)]
    span = max([abs(v) for v in values] + [0.1])
    ax.set_xlim(min(values + [0.0]) - 0.08 * span, max(values + [0.0]) + 0.08 * span)
    ax.set_xlabel(xlabel)
    ax.grid(axis="x", alpha=0.3)
    # the value column's header sits on the first group's title row
    ax.text(
        1.02,
        ticks[0][0] if ticks else 0.0,
        "BD-rate [95 % CI]",
        transform=ax.get_yaxis_transform(),
        va="center",
        ha="left",
        fontsize=8,
        fontweight="bold",
    )
    ax.set_title(title, fontsize=10, loc="left")
    legend = [
        plt.Line2D([], [], marker="o", linestyle="-", color=BETTER, label="interval below 0"),
        plt.Line2D([], [], marker="o", linestyle="-", color=WORSE, label="interval above 0"),
        plt.Line2D(
            [],
            [],
            marker="o",
            linestyle="-",
            color=UNDECIDED,
            markerfacecolor="white",
            label="interval contains 0 (or none)",
        ),
    ]
    if any(r.seeds for r in rows):
        legend.append(
            plt.Line2D(
                [],
                [],
                marker="|",
                linestyle="none",
                color="0.45",
                markersize=9,
                label="one training seed",
            )
        )
    # legend and note in a fixed strip under the axes, whatever the number of rows
    fig.legend(
        handles=legend,
        fontsize=7,
        loc="center",
        bbox_to_anchor=(0.5, 0.3 / height),
        ncol=len(legend),
        frameon=False,
    )
    if note:
        fig.text(0.01, 0.04 / height, note, fontsize=7, color="0.3", va="bottom")
    fig.tight_layout(rect=(0.0, 0.5 / height, 1.0, 1.0))
    return fig


def sidecar(rows: Sequence[Row], dataset: str, metric: str):
    """What the figure draws, one line per row (per-seed values joined by ';')."""
    return pd.DataFrame(
        [
            {
                "group": r.group,
                "label": r.label,
                "variant": r.variant,
                "dataset": dataset,
                "metric": metric,
                "bd_rate": r.bd_rate,
                "low": r.low,
                "high": r.high,
                "excludes_zero": r.excludes_zero,
                "seed_values": ";".join(repr(v) for v in r.seeds),
                "source": r.source,
            }
            for r in rows
        ],
        columns=list(SIDECAR_COLUMNS),
    )


def plot_forests(
    summary,
    analysis: dict[str, Any],
    variants: Sequence[str],
    output_dir: str | Path,
    grids: dict[str, Any] | None = None,
    grid_metric: str | None = None,
    seed_values: dict | None = None,
) -> list[Path]:
    """forest_<dataset>_<metric>.{png,pdf,csv} for every dataset of the summary and both
    metrics (a metric the summary has no number for is left out, with a line on stdout)."""
    reference = analysis.get("reference", "baseline")
    method = analysis.get("bd_method", "pchip")
    written = []
    for dataset in sorted(summary["dataset"].unique()):
        for metric in SUMMARY_LABELS:
            if (
                summary.loc[summary["dataset"] == dataset, summary_column(metric, reference)]
                .isna()
                .all()
            ):
                print(
                    f"{dataset}: no {SUMMARY_LABELS[metric]} BD-rate in the summary; "
                    "no forest plot",
                    file=sys.stderr,
                )
                continue
            rows = forest_rows(
                summary, dataset, metric, analysis, variants, grids, grid_metric, seed_values
            )
            notes = [
                "bars: 95 % paired bootstrap interval over the test images (the tables'); "
                "open point: it contains 0; n/a: no BD (the tables' notes say why)"
            ]
            if grids and metric != grid_metric:
                notes.append(
                    f"Phase 2 grid not shown: measured in "
                    f"{METRIC_LABELS[grid_metric].split(' (')[0]} only"
                )
            title = (
                f"BD-rate vs {reference} on {dataset}, {METRIC_LABELS[metric]}, {method}\n"
                "negative = fewer bits at equal quality"
            )
            fig = forest_figure(rows, title, f"BD-rate vs {reference} (%)", "; ".join(notes))
            stem = f"forest_{dataset}_{metric}"
            written += save_figure(fig, output_dir, stem)
            path = Path(output_dir) / f"{stem}.csv"
            atomic_write_text(path, sidecar(rows, dataset, metric).to_csv(index=False))
            written.append(path)
    return written


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m hpcm.analysis.forest",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--summary", required=True, help="summary.csv (hpcm.analysis.summary)")
    parser.add_argument("--config", required=True, help="YAML with the 'analysis' section")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument(
        "--variants",
        nargs="*",
        default=None,
        help="named variants in the config's order (default: the summary's)",
    )
    parser.add_argument(
        "--grid-table",
        nargs="*",
        default=[],
        help="Phase 2 grid tables <grid>.csv (hpcm.analysis.phase2)",
    )
    parser.add_argument(
        "--grid-metric",
        choices=tuple(SUMMARY_LABELS),
        help="the metric the grid tables were measured in (default: "
        "the analysis section's metric, else psnr)",
    )
    parser.add_argument(
        "--images",
        help="per-image table (hpcm rd points --images): the "
        "per-seed marks of variants with several seeds",
    )
    return parser


def _draw(args: argparse.Namespace) -> list[Path]:
    analysis = read_analysis(args.config)
    reference = analysis.get("reference", "baseline")
    summary = read_summary(args.summary, reference)
    variants = args.variants or list(dict.fromkeys(summary["variant"]))
    grids = {Path(p).stem: read_grid(p) for p in args.grid_table}
    grid_metric = args.grid_metric or analysis.get("metric") or "psnr"
    seeds = None
    if args.images:
        seeds = per_seed_bd_rates(
            read_images(args.images), reference, analysis.get("bd_method", "pchip")
        )
    return plot_forests(summary, analysis, variants, args.output_dir, grids, grid_metric, seeds)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(lambda: _draw(args), errors=(ValueError, OSError, KeyError))


if __name__ == "__main__":
    sys.exit(main())
