"""The Phase 2 search: BD-rate vs the reference over gamma x w_lr, a table, a heatmap, the best
point.

The seed's ``HyperparameterAnalyzer`` (phase2/src/utils/hparam_analyzer.py) ranks its grid by the
best validation loss and draws a gamma x w_lr heatmap of it; here every point is ranked by what
the study is about, its BD-rate against the reference variant on each test set, from real
bitstreams. The gamma and w_lr of a point are read from its runs' own ``run.yaml`` (never parsed
from the variant name).

Points: every run of a grid (variants ``<grid>-...``, ``--grid``) plus ``--include`` variants
(the grid's base, e.g. phase1, is a point of the same search). A point the grid already holds
keeps the grid's run and the included one is left out with a note.

Best point, per dataset: the lowest BD-rate. With bootstrap intervals (``--eval-csv``: the
per-image evaluation CSVs, resampled by ``hpcm.analysis.bootstrap``) the table says whether the
best point's 95 % interval overlaps the runner-up's, i.e. whether the search separates them at
all; without them the best point is named without that claim, and the notes say so.

Outputs: ``<output-dir>/<grid>.{csv,md,tex}`` and ``<plots-dir>/<grid>.{png,pdf}``.

CLI::

    python -m hpcm.analysis.phase2 --points results/rd/points.csv --runs results/train
        --grid phase2grid [--include phase1] [--reference baseline] [--method pchip] [--metric psnr]
        [--eval-csv results/eval/*/*/*.csv] --output-dir results/tables --plots-dir results/plots
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

from hpcm.analysis.bd import METHODS, bd_table  # noqa: E402
from hpcm.analysis.bootstrap import interval_table  # noqa: E402
from hpcm.analysis.plots import save_figure  # noqa: E402
from hpcm.analysis.points import eval_rows, image_table, read_points  # noqa: E402
from hpcm.analysis.tables import Table, TableError, not_held_out_notes, read_analysis, write_table  # noqa: E402  # noqa: E402
from hpcm.config.run_config import RUN_YAML, read_run_yaml  # noqa: E402
from hpcm.util.cli import run_command  # noqa: E402

AXES = ("gamma", "w_lr")
INTERVAL_COLUMNS = (
    "rate_low",
    "rate_high",
)  # hpcm.analysis.bootstrap.interval_table's BD-rate interval


def grid_points(
    runs_root: str | Path, grid: str, include: Sequence[str] = ()
) -> tuple[dict[str, tuple], list[str]]:
    """variant -> (gamma, w_lr) of the grid's runs and the included variants, and notes.

    Every run of a variant must agree on both values (they differ only in lambda).
    """
    root = Path(runs_root)
    if not root.is_dir():
        raise TableError(f"runs folder not found: {root}")
    found: dict[str, tuple] = {}
    for path in sorted(root.rglob(RUN_YAML)):
        cfg = read_run_yaml(path.parent)
        variant = str(cfg.get("variant", ""))
        if not (variant.startswith(f"{grid}-") or variant in include):
            continue
        missing = [k for k in AXES if cfg.get(k) is None]
        if missing:
            raise TableError(f"{path}: run.yaml lacks {missing}")
        point = tuple(float(cfg[k]) for k in AXES)
        if found.setdefault(variant, point) != point:
            raise TableError(
                f"{path}: variant {variant!r} has runs at {dict(zip(AXES, found[variant]))} "
                f"and {dict(zip(AXES, point))}"
            )
    if not any(v.startswith(f"{grid}-") for v in found):
        raise TableError(f"no run of grid {grid!r} (variants {grid}-...) under {root}")
    notes = []
    grid_at = {p: v for v, p in found.items() if v.startswith(f"{grid}-")}
    for variant in include:
        if variant not in found:
            notes.append(f"{variant}: no run under {root}, not part of the search")
        elif found[variant] in grid_at:
            notes.append(
                f"{variant} is the grid point {grid_at[found[variant]]} (same gamma, w_lr): "
                "the grid's run is shown"
            )
            del found[variant]
    return found, notes


def _intervals_from_eval(eval_csvs: Sequence[str | Path], reference: str, metric: str, method: str):
    """Bootstrap BD-rate intervals from the per-image evaluation CSVs."""
    images = image_table(
        eval_rows(eval_csvs)
    )  # one row per image and seed, checked as for the points
    return interval_table(images, reference, metric, method)


def phase2_table(
    points,
    variants: dict[str, tuple],
    reference: str,
    method: str,
    metric: str,
    intervals=None,
    grid: str = "phase2grid",
    notes: Sequence[str] = (),
) -> Table:
    """One row per (dataset, point): BD vs ``reference``, interval if given, rank, best mark.

    ``intervals``: a frame with ``dataset, variant, rate_low, rate_high`` (the bootstrap's), or
    None.
    """
    absent = [v for v in variants if not (points["variant"] == v).any()]
    notes = list(notes) + [f"{v}: no R-D points (not evaluated), left out" for v in absent]
    names = [v for v in variants if v not in absent]
    if not names:
        raise TableError(f"grid {grid!r}: none of its variants has R-D points")
    bd = bd_table(points, reference, metric, method, variants=names)
    rows = []
    for r in bd.itertuples():
        gamma, w_lr = variants[r.variant]
        low = high = math.nan
        if intervals is not None:
            hit = intervals[
                (intervals["dataset"] == r.dataset) & (intervals["variant"] == r.variant)
            ]
            if len(hit):
                low, high = (float(hit.iloc[0][c]) for c in INTERVAL_COLUMNS)
        rows.append(
            {
                "dataset": r.dataset,
                "gamma": gamma,
                "w_lr": w_lr,
                "variant": r.variant,
                "BD-rate (%)": r.bd_rate,
                "BD-rate low (%)": low,
                "BD-rate high (%)": high,
                "BD-PSNR (dB)": r.bd_psnr,
                "rank": math.nan,
                "best": "",
                "error": r.error,
            }
        )
    frame = pd.DataFrame(rows).sort_values(["dataset", "gamma", "w_lr"], ignore_index=True)
    for dataset, group in frame.groupby("dataset", sort=True):
        ranked = group.dropna(subset=["BD-rate (%)"]).sort_values("BD-rate (%)")
        frame.loc[ranked.index, "rank"] = np.arange(1, len(ranked) + 1)
        if ranked.empty:
            notes.append(f"{dataset}: no point has a BD-rate; no best point")
            continue
        best = ranked.iloc[0]
        where = f"gamma={best['gamma']:g}, w_lr={best['w_lr']:g}"
        if len(ranked) == 1:
            frame.loc[ranked.index[0], "best"] = "best (only point)"
            notes.append(f"{dataset}: best {where} (the only point with a BD-rate)")
            continue
        second = ranked.iloc[1]
        both = all(np.isfinite([best["BD-rate high (%)"], second["BD-rate low (%)"]]))
        if not both:
            mark, verdict = (
                "best (no interval)",
                "no bootstrap interval, so not tested against the runner-up",
            )
        elif best["BD-rate high (%)"] >= second["BD-rate low (%)"]:
            mark = "best (interval overlaps runner-up)"
            verdict = (
                f"its interval overlaps the runner-up's (gamma={second['gamma']:g}, "
                f"w_lr={second['w_lr']:g}: {second['BD-rate (%)']:+.2f} %): the search does not "
                "separate them"
            )
        else:
            mark = "best (separated from runner-up)"
            verdict = (
                f"its interval lies below the runner-up's (gamma={second['gamma']:g}, "
                f"w_lr={second['w_lr']:g})"
            )
        frame.loc[ranked.index[0], "best"] = mark
        notes.append(
            f"{dataset}: best {where}, BD-rate {best['BD-rate (%)']:+.2f} % vs {reference}; "
            f"{verdict}"
        )
    notes += [f"{r.dataset}/{r.variant}: {r.error}" for r in frame.itertuples() if r.error]
    frame = frame.drop(columns="error")
    quality = "PSNR" if metric == "psnr" else "MS-SSIM (dB)"
    title = f"Phase 2 search {grid}: BD-rate ({quality}, {method}) vs {reference} over gamma x w_lr"
    formats = {
        "BD-rate (%)": "+.2f",
        "BD-rate low (%)": "+.2f",
        "BD-rate high (%)": "+.2f",
        "BD-PSNR (dB)": "+.3f",
        "rank": ".0f",
        "gamma": "g",
        "w_lr": "g",
    }
    return Table(grid, title, frame, formats, notes)


def plot_heatmap(table: Table, output_dir: str | Path) -> list[Path]:
    """gamma (rows) x w_lr (columns) of BD-rate per dataset; the best cell framed."""
    frame = table.frame
    datasets = sorted(frame["dataset"].unique())
    gammas, w_lrs = sorted(frame["gamma"].unique()), sorted(frame["w_lr"].unique())
    fig, axes = plt.subplots(
        1,
        len(datasets),
        figsize=(1.6 + 1.5 * len(w_lrs) * len(datasets), 1.6 + 0.7 * len(gammas)),
        squeeze=False,
    )
    finite = frame["BD-rate (%)"].dropna()
    limit = max(float(finite.abs().max()), 1e-6) if len(finite) else 1.0
    for ax, dataset in zip(axes[0], datasets):
        grid = np.full((len(gammas), len(w_lrs)), np.nan)
        cells = [
            (gammas.index(row["gamma"]), w_lrs.index(row["w_lr"]), row)
            for _, row in frame[frame["dataset"] == dataset].iterrows()
        ]
        for i, j, row in cells:
            grid[i, j] = row["BD-rate (%)"]
        image = ax.imshow(grid, cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto")
        ax.set_facecolor("0.85")  # a grid cell without a run stays grey
        for i, j, row in cells:
            value, low, high = row["BD-rate (%)"], row["BD-rate low (%)"], row["BD-rate high (%)"]
            text = "n/a" if not np.isfinite(value) else f"{value:+.2f}"
            if np.isfinite(low) and np.isfinite(high):
                text += f"\n[{low:+.1f}, {high:+.1f}]"
            dark = np.isfinite(value) and abs(value) > 0.6 * limit
            ax.text(j, i, text, ha="center", va="center", fontsize=8, color="w" if dark else "k")
            if row["best"]:
                ax.add_patch(
                    plt.Rectangle(
                        (j - 0.5, i - 0.5),
                        1,
                        1,
                        fill=False,
                        lw=2.5,
                        ls="--" if "overlaps" in row["best"] else "-",
                        ec="k",
                    )
                )
        ax.set_xticks(range(len(w_lrs)), [f"{w:g}" for w in w_lrs])
        ax.set_yticks(range(len(gammas)), [f"{g:g}" for g in gammas])
        ax.set_xlabel("w_lr (task-weight learning rate)")
        ax.set_ylabel("gamma (FAMO regularisation)")
        ax.set_title(dataset)
    fig.colorbar(image, ax=list(axes[0]), label="BD-rate vs reference (%)")
    fig.suptitle(
        table.title
        + "\nframe: best point (dashed: its interval overlaps the runner-up's); grey: not run",
        fontsize=9,
        y=1.02,
    )
    return save_figure(fig, output_dir, table.name)


def build(
    points_path: str | Path,
    runs_root: str | Path,
    grid: str,
    output_dir: str | Path,
    plots_dir: str | Path,
    include: Sequence[str] = (),
    reference: str = "baseline",
    method: str = "pchip",
    metric: str = "psnr",
    eval_csvs: Sequence[str | Path] = (),
    analysis: dict[str, Any] | None = None,
) -> list[Path]:
    points = read_points(points_path)
    variants, notes = grid_points(runs_root, grid, include)
    notes += not_held_out_notes(analysis or {})
    intervals = _intervals_from_eval(eval_csvs, reference, metric, method) if eval_csvs else None
    if intervals is None:
        notes.append(
            "no bootstrap intervals (no --eval-csv): the best point is named without testing it "
            "against the runner-up"
        )
    table = phase2_table(points, variants, reference, method, metric, intervals, grid, notes)
    return write_table(table, output_dir) + plot_heatmap(table, plots_dir)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m hpcm.analysis.phase2",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--points", required=True, help="R-D points CSV (hpcm rd points)")
    parser.add_argument("--runs", required=True, help="folder holding the training run folders")
    parser.add_argument("--grid", required=True, help="grid name: its variants are <grid>-...")
    parser.add_argument(
        "--include", nargs="*", default=[], help="other variants that are points of the search"
    )
    parser.add_argument("--reference", default="baseline")
    parser.add_argument("--method", default="pchip", choices=METHODS)
    parser.add_argument("--metric", default="psnr", choices=("psnr", "ms_ssim_db"))
    parser.add_argument(
        "--eval-csv", nargs="*", default=[], help="per-image evaluation CSVs (bootstrap intervals)"
    )
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--plots-dir", required=True)
    parser.add_argument(
        "--config", help="analysis YAML (rule analysis_config): its not-held-out notes"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(
        lambda: build(
            args.points,
            args.runs,
            args.grid,
            args.output_dir,
            args.plots_dir,
            args.include,
            args.reference,
            args.method,
            args.metric,
            args.eval_csv,
            read_analysis(args.config) if args.config else None,
        )
    )


if __name__ == "__main__":
    sys.exit(main())
