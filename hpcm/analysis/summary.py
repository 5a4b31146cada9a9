"""The one table a paper prints: BD-rates per dataset and metric, training cost and complexity.

One row per (variant, dataset). Columns, for PSNR and MS-SSIM (dB) each:
- BD-rate (%) vs the reference variant, with its 95 % bootstrap interval where the per-image
  evaluation CSVs are given (``--eval-csv``, resampled by ``hpcm.analysis.bootstrap``);
- BD-rate (%) vs every configured published anchor (``hpcm.analysis.anchors``; n/a where the anchor
  has no curve on that dataset or metric, with the reason in the notes).
Then, per variant (over all its lambdas):
- training cost: hours of training = sum over metrics.csv rows of step_time x the steps of that
  row's window (``loss_steps``, else the step difference to the previous logged row), summed over
  the variant's runs, as GPU-hours or CPU-hours from the device its ``run.yaml`` meta recorded
  (validation time is excluded: the trainer restarts its clock after each validation);
- complexity: kMACs per pixel of the variant's model at 256x256, encoder / decoder / total
  (``hpcm.analysis.complexity``; the same for every variant of one model: an optimizer changes
  training, not the codec).

Written as ``summary.csv`` (numbers, intervals in their own columns), ``summary.md`` and
``summary.tex`` (each BD-rate cell with its interval, "-3.21 [-4.02, -2.40]").

CLI::

    python -m hpcm.analysis.summary --points results/rd/points.csv --runs results/train
        --config results/configs/analysis.yaml --output-dir results/tables
        [--variants baseline phase1 ...] [--eval-csv results/eval/*/*/*.csv] [--size 256]
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import yaml

from hpcm.analysis.anchors import anchor_curves_by_dataset
from hpcm.analysis.bd import bd_row, bd_table
from hpcm.analysis.bootstrap import interval_table
from hpcm.analysis.complexity import count_macs, per_pixel_kmacs
from hpcm.analysis.points import curve, eval_rows, image_table, read_points
from hpcm.analysis.tables import (
    Table,
    TableError,
    has_several_seeds,
    not_held_out_notes,
    paired_seed_intervals,
    read_analysis,
    read_metrics,
    to_latex,
    to_markdown,
)
from hpcm.config.run_config import RUN_YAML
from hpcm.models import build_model
from hpcm.util.cli import run_command
from hpcm.util.io import atomic_write_text

METRICS = {"psnr": "PSNR", "ms_ssim_db": "MS-SSIM"}
COMPLEXITY_SIZE = 256  # the official figure's input size (LIC-HPCM issue #12)


def training_hours(metrics) -> float:
    """Seconds of training in one run's metrics.csv, in hours (NaN when it logged no step_time)."""
    rows = (
        metrics.dropna(subset=["step_time"])
        if "step_time" in metrics.columns
        else metrics.iloc[0:0]
    )
    if rows.empty:
        return math.nan
    rows = rows.sort_values("step")
    if "loss_steps" in rows.columns and rows["loss_steps"].notna().all():
        steps = rows["loss_steps"].to_numpy(float)
    else:
        steps = np.diff(np.concatenate([[0.0], rows["step"].to_numpy(float)]))
    return float((rows["step_time"].to_numpy(float) * steps).sum() / 3600.0)


def run_costs(runs_root: str | Path):
    """One row per run: variant, lmbda, model, device kind (GPU/CPU), training hours."""
    root = Path(runs_root)
    if not root.is_dir():
        raise TableError(f"runs folder not found: {root}")
    rows = []
    for path in sorted(root.rglob(RUN_YAML)):
        doc = yaml.safe_load(path.read_text()) or {}
        if "variant" not in doc or "lmbda" not in doc:
            raise TableError(f"{path}: lacks 'variant' or 'lmbda'")
        device = str((doc.get("meta") or {}).get("device", doc.get("device", "")))
        if device in ("", "auto"):
            raise TableError(
                f"{path}: no meta.device (written by hpcm.train); cannot say GPU- or CPU-hours"
            )
        metrics_path = path.parent / "metrics.csv"
        hours = training_hours(read_metrics(metrics_path)) if metrics_path.is_file() else math.nan
        rows.append(
            {
                "variant": str(doc["variant"]),
                "lmbda": float(doc["lmbda"]),
                "model": str(doc.get("model", "HPCM_Base")),
                "device": "GPU" if device.startswith("cuda") else "CPU",
                "hours": hours,
            }
        )
    if not rows:
        raise TableError(f"no {RUN_YAML} under {root}")
    return pd.DataFrame(rows)


def _intervals(eval_csvs: Sequence[str | Path], reference: str, metric: str, method: str):
    """BD-rate intervals per (dataset, variant): over seeds and images where the reference was
    trained with several seeds and the variant with the same ones (``hpcm.analysis.tables.
    paired_seed_intervals``), else over the images alone; ``kind`` says which."""
    images = image_table(
        eval_rows(eval_csvs)
    )  # one row per image and seed, checked as for the points
    intervals = interval_table(images, reference, metric, method).assign(kind="images")
    if not has_several_seeds(images, reference):
        return intervals
    seeds, _ = paired_seed_intervals(images, reference, method, metric)
    for r in seeds.itertuples():
        at = (intervals["dataset"] == r.dataset) & (intervals["variant"] == r.variant)
        intervals.loc[at, ["rate_low", "rate_high", "kind"]] = [r.low, r.high, "seeds and images"]
    return intervals


def _interval_text(value: float, low: float, high: float) -> str:
    if not np.isfinite(value):
        return "n/a"
    text = f"{value:+.2f}"
    return text + (f" [{low:+.2f}, {high:+.2f}]" if np.isfinite(low) and np.isfinite(high) else "")


def summary_tables(
    points,
    costs,
    analysis: dict[str, Any],
    variants: Sequence[str] | None = None,
    eval_csvs: Sequence[str | Path] = (),
    size: int = COMPLEXITY_SIZE,
    complexity: dict[str, dict[str, float]] | None = None,
) -> tuple[Any, Table]:
    """(numeric frame for the CSV, display Table for Markdown / LaTeX).

    ``complexity``: model name -> kMACs/px dict (computed with ``count_macs`` when not given).
    """
    reference = analysis.get("reference", "baseline")
    method = analysis.get("bd_method", "pchip")
    anchors = list(analysis.get("anchors") or [])
    present = list(dict.fromkeys(points["variant"]))
    if variants:
        unknown = [v for v in variants if v not in present]
        if unknown:
            raise TableError(f"variant(s) {unknown} have no R-D points; present: {sorted(present)}")
        order = list(variants)
    else:
        gains = list((analysis.get("gains") or {}).values())
        order = [reference] + [v for v in gains if v in present and v != reference]
        order += sorted(v for v in present if v not in order)
    if reference not in present:
        raise TableError(f"reference variant {reference!r} has no R-D points")
    datasets = sorted(points["dataset"].unique())
    notes: list[str] = []
    lookup: dict[tuple, tuple[float, float, float]] = {}
    seed_kind = False  # some interval covers training seeds too
    for metric in METRICS:
        if metric not in points.columns or points[metric].isna().all():
            notes.append(f"{METRICS[metric]}: not measured in the R-D points")
            continue
        intervals = _intervals(eval_csvs, reference, metric, method) if eval_csvs else None
        if intervals is not None and (intervals["kind"] == "seeds and images").any():
            seed_kind = True
        bd = bd_table(
            points, reference, metric, method, variants=[v for v in order if v != reference]
        )
        # the reference against itself is measured like any row (0, or n/a with the reason when its
        # own curve is no valid BD curve), as hpcm.analysis.tables does
        rows = [(r.dataset, r.variant, r.bd_rate, r.error) for r in bd.itertuples()]
        for dataset in datasets:
            own = curve(points, dataset, reference, metric)
            self_row = bd_row(dataset, reference, reference, own, own, metric, method)
            rows.append((dataset, reference, self_row.bd_rate, self_row.error))
        for dataset, variant, value, error in rows:
            low = high = math.nan
            if intervals is not None:
                hit = intervals[
                    (intervals["dataset"] == dataset) & (intervals["variant"] == variant)
                ]
                if len(hit):
                    low, high = float(hit.iloc[0]["rate_low"]), float(hit.iloc[0]["rate_high"])
            lookup[(dataset, variant, metric, reference)] = (value, low, high)
            if error:
                notes.append(f"{dataset}/{variant} {METRICS[metric]} vs {reference}: {error}")
        for anchor in anchors:
            curves = anchor_curves_by_dataset(anchor, metric, datasets=datasets)
            bd = bd_table(points, anchor, metric, method, curves, variants=order)
            for r in bd.itertuples():
                lookup[(r.dataset, r.variant, metric, anchor)] = (r.bd_rate, math.nan, math.nan)
            reasons = {r.error for r in bd.itertuples() if r.error}
            notes += [f"{METRICS[metric]} vs anchor {anchor}: {why}" for why in sorted(reasons)]
    if not eval_csvs:
        notes.append("no bootstrap intervals (no --eval-csv)")

    models = sorted(costs.loc[costs["variant"].isin(order), "model"].unique())
    if complexity is None:
        complexity = {
            m: per_pixel_kmacs(count_macs(build_model(m), size, size), size, size) for m in models
        }
    numeric, display = [], []
    for variant in order:
        mine = costs[costs["variant"] == variant]
        model = mine["model"].iloc[0] if len(mine) else ""
        if len(mine["model"].unique()) > 1:
            raise TableError(
                f"variant {variant!r} has runs of several models: {sorted(mine['model'].unique())}"
            )
        kinds = sorted(mine["device"].unique())
        hours = float(mine["hours"].sum(min_count=1)) if len(mine) else math.nan
        cost_label = f"{hours:.3g} {'/'.join(kinds)}-h" if np.isfinite(hours) else "n/a"
        kmacs = complexity.get(model, {})
        for dataset in datasets:
            row = {"variant": variant, "dataset": dataset}
            shown = {"variant": variant, "dataset": dataset}
            for metric, label in METRICS.items():
                for ref in [reference, *anchors]:
                    value, low, high = lookup.get(
                        (dataset, variant, metric, ref), (math.nan, math.nan, math.nan)
                    )
                    key = f"{label} BD-rate vs {ref} (%)"
                    row[key] = value
                    if ref == reference:
                        row[f"{key} low"], row[f"{key} high"] = low, high
                    shown[f"{label} vs {ref}"] = _interval_text(value, low, high)
            row.update(
                {
                    "train hours": hours,
                    "train device": "/".join(kinds),
                    "runs": len(mine),
                    "model": model,
                    "kMACs/px encoder": kmacs.get("encoder", math.nan),
                    "kMACs/px decoder": kmacs.get("decoder", math.nan),
                    "kMACs/px total": kmacs.get("total", math.nan),
                }
            )
            shown.update(
                {
                    "training": cost_label,
                    "model": model,
                    "kMACs/px enc/dec/total": "/".join(
                        f"{kmacs[k]:.1f}" for k in ("encoder", "decoder", "total")
                    )
                    if kmacs
                    else "n/a",
                }
            )
            numeric.append(row)
            display.append(shown)
    over = (
        "over training seeds and test images (hpcm.analysis.bootstrap.seed_image_interval; "
        "image-only bootstrap for variants without the reference's seeds)"
        if seed_kind
        else "paired bootstrap over test images"
    )
    notes.append(
        f"BD-rate in % ({method}), negative = fewer bits at equal quality; intervals: "
        f"95 % {over} (vs the reference variant only: anchors have no per-image data)"
    )
    notes.append(
        "training: hours of optimizer steps from metrics.csv step_time, summed over each variant's "
        "lambdas (a fine-tuned variant counts its own steps, not those of its starting point)"
    )
    notes.append(
        f"complexity: one forward at {size}x{size}, torch.utils.flop_counter MACs (convolutions "
        "and matrix products), encoder = all but g_s, decoder = all but g_a/h_a"
    )
    title = f"Summary: BD-rate vs {reference} and anchors, training cost, complexity"
    return pd.DataFrame(numeric), Table("summary", title, pd.DataFrame(display), {}, notes)


def build(
    points_path: str | Path,
    runs_root: str | Path,
    analysis: dict[str, Any],
    output_dir: str | Path,
    variants: Sequence[str] | None = None,
    eval_csvs: Sequence[str | Path] = (),
    size: int = COMPLEXITY_SIZE,
) -> list[Path]:
    numeric, table = summary_tables(
        read_points(points_path), run_costs(runs_root), analysis, variants, eval_csvs, size
    )
    table.notes += not_held_out_notes(analysis)
    out = Path(output_dir)
    paths = [out / f"summary.{ext}" for ext in ("csv", "md", "tex")]
    atomic_write_text(paths[0], numeric.to_csv(index=False))
    atomic_write_text(paths[1], to_markdown(table))
    atomic_write_text(paths[2], to_latex(table))
    return paths


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m hpcm.analysis.summary",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--points", required=True, help="R-D points CSV (hpcm rd points)")
    parser.add_argument("--runs", required=True, help="folder holding the training run folders")
    parser.add_argument("--config", required=True, help="YAML with the 'analysis' section")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument(
        "--variants", nargs="*", help="rows, in order (default: reference, gains, the rest)"
    )
    parser.add_argument(
        "--eval-csv", nargs="*", default=[], help="per-image evaluation CSVs (bootstrap intervals)"
    )
    parser.add_argument(
        "--size", type=int, default=COMPLEXITY_SIZE, help="complexity input side (pixels)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(
        lambda: build(
            args.points,
            args.runs,
            read_analysis(args.config),
            args.output_dir,
            args.variants,
            args.eval_csv,
            args.size,
        )
    )


if __name__ == "__main__":
    sys.exit(main())
