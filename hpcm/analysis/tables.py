"""Ablation tables from measured results only (CSV + Markdown + LaTeX).

Inputs: the R-D points (``hpcm rd points``), the training run folders (each with
``metrics.csv`` and ``run.yaml``), optionally Snakemake benchmark TSVs of the training jobs, and
the ``analysis`` section of the workflow config (reference variant, anchors, gains, studies).
Nothing here is a constant: every number comes from those files, and a number that cannot be
computed (missing lambda, non-monotonic curve, no overlap) is shown as n/a with the reason.

Tables written to ``--output-dir`` as ``NAME.csv``, ``NAME.md`` and ``NAME.tex``, one registered
kind after the other (:data:`TABLES`, filled by ``@register_table``; :func:`table_names` lists the
names a study's ``analysis`` section yields, and the workflow takes its targets from it):

- ``bd_vs_<reference>``: BD-rate (%) and BD-PSNR (dB) of every variant vs the reference variant,
  per dataset, with point counts and the smaller of the two overlaps (``overlap of``: the rate
  range that BD-PSNR integrates over, or the distortion range of BD-rate);
- ``bd_vs_anchor-<anchor>``: the same against each published anchor (``hpcm anchors``) and each
  measured codec anchor (``analysis.measured_anchors`` + ``--measured`` CSVs, and the shipped ones
  of ``hpcm/analysis/measured/``); with ``--images`` a measured anchor, which has per-image points,
  gets the same 95 % paired-bootstrap intervals, pairing its images with the variants' by name;
- ``expected_gains``: the seed's "Expected Gains" table as measured: BD-PSNR, BD-rate and the
  convergence epoch (first epoch whose validation loss is within 1 % of the run's best, mean over
  lambdas) of Phase 1, 2, 3, 4 (as ``analysis.gains`` lists them; and the reference for comparison);
- ``<study>`` for each study (Study 1 scale weights, Study 2 gammas, Phase 4 context-aware
  fine-tuning, whose table names each run's Phase 4 keys instead): BD-PSNR, BD-rate, the
  stability figure (coefficient of variation, std/mean with ddof=1, of the training loss over
  the last 10 % of steps, mean over lambdas: pooled from per-step statistics when metrics.csv
  has ``loss_std``, else of the logged window means, and then labelled so) and skipped steps
  (sum over lambdas);
- ``overhead``: time per step (mean ``step_time`` of the runs) and peak memory (``max_rss`` of
  the Snakemake benchmark, MB) per optimizer and decomposition, with the ratio to plain Adam;
- ``overhead_benchmark`` (with ``--overhead-json``): the same from the controlled training-step
  benchmark ``benchmarks/optimizer_overhead.py --json FILE`` (median step time, peak memory).

With ``--images`` (the per-image rows of ``hpcm rd points --images``) every BD-rate and
BD-PSNR of the BD, gains and study tables gets its 95 % paired-bootstrap interval over the test
images (``hpcm.analysis.bootstrap``; ``--resamples``, ``--bootstrap-seed``), a column saying
whether it excludes 0, and, where a variant was trained with more than one seed, the seed-to-seed
standard deviation of its BD (each seed's curve against the reference's curve of the same seed,
or the reference's seed mean where it lacks that seed).
When the reference was trained with several seeds, ``bd_seeds_vs_<reference>`` gives each
variant's BD-rate with a 95 % interval over training seeds and test images, each seed's BD-rate,
their SD and whether the interval excludes 0 (``seed_bd_table``).

CLI::

    hpcm tables --points results/rd/points.csv --runs results/train
        --config config.yaml --output-dir results/tables
        [--benchmarks results/benchmarks/train] [--method pchip] [--metric psnr]
        [--overhead-json benchmarks/out/optimizer_overhead.json]
        [--images results/rd/images.csv] [--resamples 1000] [--bootstrap-seed 0]

``--config`` is a YAML file whose ``analysis`` key (or top level) holds ``reference``,
``bd_method``, ``anchors`` (list of anchor names), ``gains`` (label -> variant) and ``studies``
(name -> {title, rows: label -> variant}). Run folders are found recursively under ``--runs``
(every folder with a ``metrics.csv``); variant and lambda come from its ``run.yaml``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import yaml

from hpcm.analysis.anchors import anchor_curves_by_dataset, load_anchors
from hpcm.analysis.bd import METHODS, bd_row, bd_table
from hpcm.analysis.bootstrap import (
    DEFAULT_RESAMPLES,
    DEFAULT_SEED,
    excludes_zero,
    interval_table,
    seed_interval_table,
)
from hpcm.analysis.measured import anchor_intervals, measured_image_rows, shipped_csvs
from hpcm.analysis.points import IMAGE_COLUMNS, curve, read_points, read_table, seed_points
from hpcm.analysis.runs import RunDiscoveryError, find_runs
from hpcm.config.optimizers import BASELINE_OPTIMIZER, OPTIMIZER_SPECS
from hpcm.evaluate.metrics import ms_ssim_to_db
from hpcm.util.cli import run_command
from hpcm.util.io import atomic_write_text

REQUIRED_METRIC_COLUMNS = ("step", "epoch", "loss", "val_loss")
CONVERGENCE_TOLERANCE = 0.01
STABILITY_TAIL = 0.10


class TableError(ValueError):
    """Bad table input; the message names the file, column or value at fault."""


# --------------------------------------------------------------------------------------------
# Per-run figures from metrics.csv
# --------------------------------------------------------------------------------------------


def read_metrics(path: str | Path):
    """metrics.csv as a DataFrame; missing required columns are an error naming them."""
    import pandas as pd  # why: slow to import (~0.5 s); the commands that need it load it

    path = Path(path)
    if not path.is_file():
        raise TableError(f"metrics file not found: {path}")
    frame = pd.read_csv(path)
    missing = [c for c in REQUIRED_METRIC_COLUMNS if c not in frame.columns]
    if missing:
        raise TableError(f"{path}: missing required column(s) {missing}")
    return frame


def convergence_epoch(metrics, tolerance: float = CONVERGENCE_TOLERANCE) -> float:
    """First epoch whose validation loss is within ``tolerance`` of the run's best (NaN if none)."""
    val = metrics.dropna(subset=["val_loss"]).sort_values("step")
    if val.empty:
        return math.nan
    best = val["val_loss"].min()
    # Within 1 % of the best: loss <= best + 1 % of |best| (losses are positive here).
    hit = val[val["val_loss"] <= best + tolerance * abs(best)]
    return float(hit["epoch"].iloc[0])


LOGGED_CV = "CoV of logged loss (means over log_every steps), last 10 %"
PER_STEP_CV = "CoV of per-step loss, last 10 % (pooled from loss/loss_std)"
MIN_TAIL_ROWS = 3


@dataclass
class Stability:
    value: float
    per_step: bool  # True: pooled per-step statistics; False: the logged window means
    note: str  # why ``value`` is NaN ("" when it is not)


def _tail(train, tail: float):
    """Training rows whose logging window ends in the last ``tail`` of the run's steps."""
    first, last = train["step"].iloc[0], train["step"].iloc[-1]
    return train[train["step"] >= last - tail * (last - first)]


def loss_cv(metrics, tail: float = STABILITY_TAIL, use_per_step: bool = True) -> Stability:
    """Coefficient of variation (std with ddof=1 over |mean|) of the training loss, last ``tail``.

    With a ``loss_std`` column (std, ddof=0, of the per-step losses of each logging window; the
    window's step count in ``loss_steps``, else the step gap to the previous row), the per-step
    CoV is pooled exactly from the windows' means and stds. Without it, only the logged rows
    exist, and those are means over ``log_every`` steps (their spread understates the per-step
    one): their CoV is returned with ``per_step=False`` so the table labels it as such. Fewer than
    ``MIN_TAIL_ROWS`` rows in the tail give NaN with the reason, never a wider window.
    ``use_per_step=False`` ignores ``loss_std`` (to compare runs that lack it on the same basis).
    """
    train = metrics.dropna(subset=["loss"]).sort_values("step")
    if train.empty:
        return Stability(math.nan, False, "no training-loss rows")
    per_step = use_per_step and "loss_std" in train.columns and train["loss_std"].notna().all()
    if per_step:
        gaps = train["step"].diff().fillna(train["step"].iloc[0])
        counts = train["loss_steps"] if "loss_steps" in train.columns else gaps
        train = train.assign(_n=counts.to_numpy(float))
    rows = _tail(train, tail)
    if len(rows) < MIN_TAIL_ROWS:
        return Stability(
            math.nan,
            per_step,
            f"only {len(rows)} logged row(s) in the last "
            f"{tail:.0%} of steps (need {MIN_TAIL_ROWS}); log more often",
        )
    means = rows["loss"].to_numpy(float)
    if not per_step:
        mean, std = float(np.mean(means)), float(np.std(means, ddof=1))
    else:
        n = rows["_n"].to_numpy(float)
        stds = rows["loss_std"].to_numpy(float)
        total = n.sum()
        mean = float((n * means).sum() / total)
        # Pooled: sum of squared deviations = within-window + between-window parts.
        squares = float((n * stds**2).sum() + (n * (means - mean) ** 2).sum())
        std = math.sqrt(squares / (total - 1)) if total > 1 else math.nan
    if mean == 0 or not math.isfinite(std):
        return Stability(math.nan, per_step, "mean training loss is zero or the std undefined")
    return Stability(std / abs(mean), per_step, "")


def _last(metrics, column: str) -> float:
    if column not in metrics.columns:
        return math.nan
    values = metrics[column].dropna()
    return float(values.iloc[-1]) if len(values) else math.nan


def _mean(metrics, column: str, how: str = "mean") -> float:
    if column not in metrics.columns:
        return math.nan
    values = metrics[column].dropna()
    if values.empty:
        return math.nan
    return float(values.median() if how == "median" else values.mean())


def _has_scale_tasks(config: dict) -> bool:
    """The run's optimizer balances the five scale tasks (its decomposition matters); an optimizer
    name this package no longer registers has none."""
    spec = OPTIMIZER_SPECS.get(config.get("optimizer"))
    return spec is not None and spec.scale_tasks


def _read_benchmark(path: Path) -> dict[str, float]:
    import pandas as pd  # why: slow to import (~0.5 s); the commands that need it load it

    if not path.is_file():
        return {}
    frame = pd.read_csv(path, sep="\t")
    if "max_rss" not in frame.columns:
        raise TableError(f"{path}: not a Snakemake benchmark file (no max_rss column)")
    return {"peak_rss_mb": float(pd.to_numeric(frame["max_rss"], errors="coerce").max())}


def phase4_summary(config: dict[str, Any]) -> str:
    """The Phase 4 keys of a run (hpcm.train.phase4) in words; "" when it uses none."""
    parts = []
    ratios = {g: float(r) for g, r in (config.get("group_lr") or {}).items() if float(r) != 1.0}
    if ratios:
        parts.append("lr x " + ", ".join(f"{g} {r:g}" for g, r in ratios.items()))
    if config.get("freeze"):
        parts.append("frozen: " + ", ".join(config["freeze"]))
    if config.get("unfreeze_schedule"):
        parts.append(
            "unfrozen at: "
            + ", ".join(f"{g} {float(f):g}" for g, f in config["unfreeze_schedule"].items())
        )
    if config.get("scale_early_stop_patience"):
        parts.append(f"scale early stop after {config['scale_early_stop_patience']} validations")
    return "; ".join(parts)


def load_runs(root: str | Path, benchmarks: str | Path | None = None):
    """One row per training run under ``root``: config facts and the per-run figures."""
    import pandas as pd  # why: slow to import (~0.5 s); the commands that need it load it

    root = Path(root)
    try:
        found = find_runs(root)
    except RunDiscoveryError as error:
        raise TableError(str(error)) from None
    rows = []
    for run in found:
        run_dir, config = run.path, run.config
        metrics = read_metrics(run.metrics_csv)
        stability, logged = loss_cv(metrics), loss_cv(metrics, use_per_step=False)
        rel = run_dir.relative_to(root)
        bench = _read_benchmark(Path(benchmarks) / f"{rel}.tsv") if benchmarks else {}
        rows.append(
            {
                "variant": str(config["variant"]),
                "lmbda": float(config["lmbda"]),
                "optimizer": str(config.get("optimizer", "")),
                "decomposition": str(config.get("decomposition", ""))
                if _has_scale_tasks(config)
                else "",
                "scale_weights": config.get("scale_weights"),
                "gammas": config.get("gammas"),
                "phase4": phase4_summary(config),
                "convergence_epoch": convergence_epoch(metrics),
                "loss_cv": stability.value,
                "loss_cv_per_step": stability.per_step,
                "loss_cv_note": stability.note,
                "loss_cv_logged": logged.value,
                "loss_cv_logged_note": logged.note,
                "skipped_steps": _last(metrics, "skipped_steps"),
                # median: the first logged steps include warm-up (allocations, autotuning)
                "step_time": _mean(metrics, "step_time", "median"),
                "peak_memory_mb": bench.get("peak_rss_mb", math.nan),
                "best_val_loss": float(metrics["val_loss"].min()),
                "run_dir": str(run_dir),
            }
        )
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------


@dataclass
class Table:
    name: str
    title: str
    frame: Any  # pandas DataFrame with the numbers (written as CSV)
    formats: dict[str, str]  # column -> format for Markdown/LaTeX
    notes: list[str]


def _cell(value: Any, fmt: str | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if fmt and isinstance(value, (int, float, np.floating, np.integer)):
        return format(value, fmt)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(f"{v:g}" for v in value) + "]"
    return str(value)


def to_markdown(table: Table) -> str:
    cols = list(table.frame.columns)
    lines = [
        f"### {table.title}",
        "",
        "| " + " | ".join(cols) + " |",
        "|" + "|".join("---" for _ in cols) + "|",
    ]
    for _, row in table.frame.iterrows():
        lines.append("| " + " | ".join(_cell(row[c], table.formats.get(c)) for c in cols) + " |")
    lines += [""] + [f"- {note}" for note in table.notes]
    return "\n".join(lines) + "\n"


_LATEX_SPECIAL = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "_": r"\_",
    "#": r"\#",
    "$": r"\$",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\^{}",
}


def _latex_escape(text: str) -> str:
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in text)


def to_latex(table: Table) -> str:
    cols = list(table.frame.columns)
    lines = [
        r"\begin{table}[t]",
        r"\centering",
        rf"\caption{{{_latex_escape(table.title)}}}",
        rf"\begin{{tabular}}{{{'l' * len(cols)}}}",
        r"\toprule",
        " & ".join(_latex_escape(c) for c in cols) + r" \\",
        r"\midrule",
    ]
    for _, row in table.frame.iterrows():
        lines.append(
            " & ".join(_latex_escape(_cell(row[c], table.formats.get(c))) for c in cols) + r" \\"
        )
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    lines += [f"% {note}" for note in table.notes]
    return "\n".join(lines) + "\n"


def write_table(table: Table, output_dir: str | Path) -> list[Path]:
    output_dir = Path(output_dir)
    paths = [output_dir / f"{table.name}.{ext}" for ext in ("csv", "md", "tex")]
    atomic_write_text(paths[0], table.frame.to_csv(index=False))
    atomic_write_text(paths[1], to_markdown(table))
    atomic_write_text(paths[2], to_latex(table))
    return paths


# --------------------------------------------------------------------------------------------
# The tables
# --------------------------------------------------------------------------------------------

CI_COLUMNS = (
    "BD-rate CI low (%)",
    "BD-rate CI high (%)",
    "BD-rate CI excludes 0",
    "BD-PSNR CI low (dB)",
    "BD-PSNR CI high (dB)",
    "BD-PSNR CI excludes 0",
)
SEED_COLUMNS = ("n_seeds", "BD-rate seed std (%)", "BD-PSNR seed std (dB)")


@dataclass
class Uncertainty:
    """Bootstrap intervals and seed spreads per (dataset, variant); ``None`` fields: not
    computed."""

    intervals: Any  # DataFrame of hpcm.analysis.bootstrap.interval_table, or None
    seeds: Any  # DataFrame dataset, variant, n_seeds, bd_rate_std, bd_psnr_std, or None
    resamples: int = DEFAULT_RESAMPLES

    def columns(self, dataset: str, variant: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.intervals is not None:
            sel = self.intervals[
                (self.intervals["dataset"] == dataset) & (self.intervals["variant"] == variant)
            ]
            r = sel.iloc[0] if len(sel) else None
            lows = (
                (r["rate_low"], r["rate_high"], r["psnr_low"], r["psnr_high"])
                if r is not None
                else (math.nan,) * 4
            )
            out.update(
                zip(
                    CI_COLUMNS,
                    (
                        lows[0],
                        lows[1],
                        excludes_zero(lows[0], lows[1]),
                        lows[2],
                        lows[3],
                        excludes_zero(lows[2], lows[3]),
                    ),
                )
            )
        if self.seeds is not None:
            sel = self.seeds[
                (self.seeds["dataset"] == dataset) & (self.seeds["variant"] == variant)
            ]
            r = sel.iloc[0] if len(sel) else None
            out.update(
                zip(
                    SEED_COLUMNS,
                    (int(r["n_seeds"]), r["bd_rate_std"], r["bd_psnr_std"])
                    if r is not None
                    else (math.nan,) * 3,
                )
            )
        return out

    def notes(self) -> list[str]:
        notes = []
        if self.intervals is not None:
            notes.append(
                f"CI: 95 % paired bootstrap over the test images ({self.resamples} "
                "resamples of image indices with replacement, the same for both curves; "
                "percentile interval); the BD itself is that of the plain means"
            )
            notes += [
                f"{r.dataset}/{r.variant}: {r.invalid} of {r.resamples} resamples gave no "
                "valid BD curve and are left out of the interval"
                for r in self.intervals.itertuples()
                if r.invalid
            ]
        if self.seeds is not None:
            notes.append(
                "seed std: standard deviation (ddof=1) over training seeds of each "
                "seed's BD against the reference"
            )
        return notes


def _excludes_text(value: Any) -> Any:
    return value if isinstance(value, float) and math.isnan(value) else ("yes" if value else "no")


def seed_spread(images, reference: str, metric: str, method: str):
    """Per (dataset, variant) trained with more than one seed: the std of BD over its seeds.

    Seed s of a variant is compared with the reference's seed s where the reference has it,
    else with the reference's seed-averaged curve. None when no variant has several seeds.
    """
    import pandas as pd  # why: slow to import (~0.5 s); the commands that need it load it

    per_seed = seed_points(images)
    counts = per_seed.groupby(["dataset", "variant"])["seed"].nunique()
    if counts.max() <= 1:
        return None
    means = (
        per_seed.groupby(["dataset", "variant", "lmbda"])[["bpp", "psnr", "ms_ssim_db"]]
        .mean()
        .reset_index()
    )
    rows = []
    for (dataset, variant), n in counts.items():
        if n <= 1:
            rows.append(
                {
                    "dataset": dataset,
                    "variant": variant,
                    "n_seeds": int(n),
                    "bd_rate_std": math.nan,
                    "bd_psnr_std": math.nan,
                }
            )
            continue
        rates, psnrs = [], []
        for seed, group in per_seed[
            (per_seed["dataset"] == dataset) & (per_seed["variant"] == variant)
        ].groupby("seed"):
            ref = per_seed[
                (per_seed["dataset"] == dataset)
                & (per_seed["variant"] == reference)
                & (per_seed["seed"] == seed)
            ]
            if ref.empty:
                ref = means[(means["dataset"] == dataset) & (means["variant"] == reference)]
            ref_curve = curve(ref, dataset, reference, metric)
            row = bd_row(
                dataset,
                variant,
                reference,
                ref_curve,
                curve(group, dataset, variant, metric),
                metric,
                method,
            )
            rates.append(row.bd_rate)
            psnrs.append(row.bd_psnr)
        rows.append(
            {
                "dataset": dataset,
                "variant": variant,
                "n_seeds": int(n),
                "bd_rate_std": float(np.std(rates, ddof=1)),
                "bd_psnr_std": float(np.std(psnrs, ddof=1)),
            }
        )
    return pd.DataFrame(rows)


def read_images(path: str | Path):
    """The per-image table of ``hpcm rd points --images``, checking its columns."""
    return read_table(
        path,
        IMAGE_COLUMNS,
        "per-image file",
        "; write it with `hpcm rd points --images`",
        error=TableError,
    )


def uncertainty(
    images,
    reference: str,
    metric: str,
    method: str,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
) -> Uncertainty:
    try:
        intervals = interval_table(images, reference, metric, method, resamples, seed)
    except ValueError as err:
        raise TableError(f"bootstrap intervals: {err}") from None
    return Uncertainty(intervals, seed_spread(images, reference, metric, method), resamples)


def anchor_uncertainty(
    images,
    measured_rows,
    anchor: str,
    metric: str,
    method: str,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
):
    """Intervals of every variant against a measured ``anchor`` (paired on image names), or
    None when the anchor has no per-image data (a published curve of means)."""
    if not len(measured_rows) or not (measured_rows["anchor"] == anchor).any():
        return None
    intervals = anchor_intervals(images, measured_rows, anchor, metric, method, resamples, seed)
    return AnchorUncertainty(intervals, None, resamples)


class AnchorUncertainty(Uncertainty):
    """Intervals against a measured anchor: the anchor's per-image points pair with the
    variants' on image names; a dataset where that fails says why."""

    def notes(self) -> list[str]:
        why = sorted({f"{r.dataset}: {r.note}" for r in self.intervals.itertuples() if r.note})
        return super().notes() + [f"no interval on {text}" for text in why]


BD_FORMATS = {
    "BD-rate (%)": "+.2f",
    "BD-PSNR (dB)": "+.3f",
    "overlap (%)": ".0f",
    "BD-rate CI low (%)": "+.2f",
    "BD-rate CI high (%)": "+.2f",
    "BD-PSNR CI low (dB)": "+.3f",
    "BD-PSNR CI high (dB)": "+.3f",
    "BD-rate seed std (%)": ".2f",
    "BD-PSNR seed std (dB)": ".3f",
}


def _with_uncertainty(frame, unc: Uncertainty | None):
    """``frame`` (dataset and variant columns) with the interval / seed columns appended."""
    if unc is None:
        return frame
    extra = [unc.columns(r.dataset, r.variant) for r in frame[["dataset", "variant"]].itertuples()]
    # no interval where the plain means give no BD (the note says why)
    has_bd = frame["BD-rate (%)"].notna().to_numpy() & frame["BD-PSNR (dB)"].notna().to_numpy()
    for column in extra[0] if extra else {}:
        values = [
            e[column] if ok or column in SEED_COLUMNS else math.nan for e, ok in zip(extra, has_bd)
        ]
        if column.endswith("excludes 0"):
            values = [_excludes_text(v) for v in values]
        frame[column] = values
    return frame


def smaller_overlap(row) -> tuple[float, str]:
    """(the smaller of a BD row's two overlaps, the range it is of): BD-rate integrates over the
    distortion range (``overlap_rate``), BD-PSNR over the rate range (``overlap_psnr``)."""
    if row.overlap_psnr < row.overlap_rate:
        return row.overlap_psnr, "rate"
    return row.overlap_rate, "distortion"


def _bd_notes(bd) -> list[str]:
    notes = [f"{r.dataset}/{r.variant}: {r.error}" for r in bd.itertuples() if r.error]
    for r in bd.itertuples():
        if r.low_overlap and not r.error:
            overlap, of_range = smaller_overlap(r)
            notes.append(
                f"{r.dataset}/{r.variant}: low overlap ({overlap * 100:.0f} % of the "
                f"{of_range} range); BD covers the overlap only"
            )
    return notes


def bd_table_name(reference: str, anchor: str | None = None) -> str:
    """``bd_vs_<reference>``, or ``bd_vs_anchor-<anchor>`` against a published anchor."""
    return f"bd_vs_anchor-{anchor}" if anchor else f"bd_vs_{reference}"


def bd_vs(
    points,
    reference: str,
    method: str,
    metric: str,
    anchor: str | None = None,
    bd=None,
    unc: Uncertainty | None = None,
    anchor_table=None,
) -> Table:
    """BD table of every variant vs ``reference`` (or an ``anchor`` of ``anchor_table``,
    default the published + shipped anchors); ``bd`` if computed. With an anchor, ``unc`` holds
    the intervals against the anchor (``anchor_uncertainty``: measured anchors only)."""
    curves = None
    if anchor:
        curves = anchor_curves_by_dataset(
            anchor, metric, anchor_table, datasets=points["dataset"].unique()
        )
        reference = anchor
    if bd is None:
        bd = bd_table(points, reference, metric, method, curves)
    frame = bd.rename(columns={"bd_rate": "BD-rate (%)", "bd_psnr": "BD-PSNR (dB)"})
    # the smaller overlap of the two BD integrals, and the range it is of
    smaller = [smaller_overlap(r) if not r.error else (math.nan, "") for r in bd.itertuples()]
    frame["overlap (%)"] = [overlap * 100 for overlap, _ in smaller]
    frame["overlap of"] = [of_range for _, of_range in smaller]
    frame = frame[
        [
            "dataset",
            "variant",
            "BD-rate (%)",
            "BD-PSNR (dB)",
            "overlap (%)",
            "overlap of",
            "n_reference",
            "n_test",
        ]
    ].copy()
    frame = _with_uncertainty(frame, unc)
    quality = "PSNR" if metric == "psnr" else "MS-SSIM (dB)"
    title = f"BD-rate and BD-{quality} vs {'anchor ' if anchor else ''}{reference} ({method})"
    name = bd_table_name(reference, anchor)
    notes = _bd_notes(bd) + (unc.notes() if unc is not None else [])
    return Table(name, title, frame, BD_FORMATS, notes)


def _bd_lookup(points, reference: str, method: str, metric: str, bd=None):
    """(dataset, variant) -> BD row; computes the BD table unless the caller already did.

    The reference's own rows are measured too (its curve against itself), not a written-in 0,
    so a table row that names the reference shows a number like every other row.
    """
    if bd is None:
        bd = bd_table(points, reference, metric, method)
    lookup: dict[tuple[str, str], Any] = {(r.dataset, r.variant): r for r in bd.itertuples()}
    for dataset in sorted(points["dataset"].unique()):
        ref_curve = curve(points, dataset, reference, metric)
        lookup[(dataset, reference)] = bd_row(
            dataset, reference, reference, ref_curve, ref_curve, metric, method
        )
    return lookup, bd


def _run_stat(runs, variant: str, column: str, how: str = "mean") -> float:
    values = runs.loc[runs["variant"] == variant, column].dropna()
    if values.empty:
        return math.nan
    return float(values.sum() if how == "sum" else values.mean())


def _absent(points, runs, variants) -> list[str]:
    notes = []
    for variant in dict.fromkeys(variants):
        if not (points["variant"] == variant).any():
            notes.append(f"{variant}: no measured R-D points")
        if not (runs["variant"] == variant).any():
            notes.append(f"{variant}: no training run found")
    return notes


def expected_gains(
    points,
    runs,
    gains: dict[str, str],
    reference: str,
    method: str,
    metric: str,
    bd=None,
    unc: Uncertainty | None = None,
) -> Table:
    import pandas as pd  # why: slow to import (~0.5 s); the commands that need it load it

    lookup, bd = _bd_lookup(points, reference, method, metric, bd)
    rows = []
    for dataset in sorted(points["dataset"].unique()):
        for label, variant in [(reference, reference), *gains.items()]:
            r = lookup.get((dataset, variant))
            rows.append(
                {
                    "dataset": dataset,
                    "phase": label,
                    "variant": variant,
                    "BD-PSNR (dB)": r.bd_psnr if r else math.nan,
                    "BD-rate (%)": r.bd_rate if r else math.nan,
                    "convergence epoch": _run_stat(runs, variant, "convergence_epoch"),
                    "lambdas": int(
                        (
                            points[(points["dataset"] == dataset) & (points["variant"] == variant)]
                        ).shape[0]
                    ),
                }
            )
    notes = _bd_notes(bd[bd["variant"].isin(gains.values())]) + _absent(
        points, runs, gains.values()
    )
    notes.append(
        "convergence epoch: first epoch with validation loss within 1 % of the run's "
        "best, mean over lambdas"
    )
    notes += unc.notes() if unc is not None else []
    frame = _with_uncertainty(pd.DataFrame(rows), unc)
    return Table(
        "expected_gains",
        f"Expected gains as measured (vs {reference}, {method})",
        frame,
        {**BD_FORMATS, "convergence epoch": ".1f"},
        notes,
    )


def study_table(
    name: str,
    title: str,
    rows_spec: dict[str, str],
    points,
    runs,
    reference: str,
    method: str,
    metric: str,
    bd=None,
    unc: Uncertainty | None = None,
) -> Table:
    import pandas as pd  # why: slow to import (~0.5 s); the commands that need it load it

    lookup, bd = _bd_lookup(points, reference, method, metric, bd)
    study_runs = runs[runs["variant"].isin(rows_spec.values())]
    # One label for the whole column: per-step only when every run logged per-step statistics.
    per_step = bool(len(study_runs)) and bool(study_runs["loss_cv_per_step"].all())
    cv_column = PER_STEP_CV if per_step else LOGGED_CV
    # a study of Phase 4 variants shows their keys instead of Phase 3's scale weights and gammas
    phase4_study = "phase4" in study_runs and bool((study_runs["phase4"] != "").any())
    rows = []
    for dataset in sorted(points["dataset"].unique()):
        for label, variant in rows_spec.items():
            r = lookup.get((dataset, variant))
            sel = runs[runs["variant"] == variant]
            described = (
                {"phase 4 keys": sel["phase4"].iloc[0] if len(sel) else None}
                if phase4_study
                else {
                    "scale weights": sel["scale_weights"].iloc[0] if len(sel) else None,
                    "gammas": sel["gammas"].iloc[0] if len(sel) else None,
                }
            )
            rows.append(
                {
                    "dataset": dataset,
                    "config": label,
                    "variant": variant,
                    **described,
                    "BD-PSNR (dB)": r.bd_psnr if r else math.nan,
                    "BD-rate (%)": r.bd_rate if r else math.nan,
                    cv_column: _run_stat(runs, variant, "loss_cv")
                    if per_step
                    else _run_stat(runs, variant, "loss_cv_logged"),
                    "skipped steps": _run_stat(runs, variant, "skipped_steps", "sum"),
                }
            )
    notes = _bd_notes(bd[bd["variant"].isin(rows_spec.values())]) + _absent(
        points, runs, rows_spec.values()
    )
    basis = (
        "the per-step training losses, pooled exactly from each logging window's mean and std"
        if per_step
        else "the logged training-loss rows, each a MEAN over "
        "log_every steps (this understates the per-step spread; the runs logged no "
        "loss_std)"
    )
    notes.append(
        f"CoV: std/mean (ddof=1) of {basis}, over the last 10 % of steps, mean over "
        "lambdas; skipped steps: non-finite gradients, summed over lambdas"
    )
    note_column = "loss_cv_note" if per_step else "loss_cv_logged_note"
    notes += [
        f"{r.variant} (lambda {r.lmbda:g}): CoV n/a: {getattr(r, note_column)}"
        for r in study_runs.itertuples()
        if getattr(r, note_column)
    ]
    notes += unc.notes() if unc is not None else []
    return Table(
        name,
        f"{title} (vs {reference}, {method})",
        _with_uncertainty(pd.DataFrame(rows), unc),
        {**BD_FORMATS, cv_column: ".4f", "skipped steps": ".0f"},
        notes,
    )


def overhead_table(runs) -> Table:
    grouped = (
        runs.groupby(["optimizer", "decomposition"], sort=True)
        .agg(
            runs=("variant", "size"),
            step_time=("step_time", "mean"),
            peak_memory=("peak_memory_mb", "max"),
        )
        .reset_index()
    )
    adam = grouped.loc[grouped["optimizer"] == BASELINE_OPTIMIZER, "step_time"]
    base = float(adam.iloc[0]) if len(adam) else math.nan
    grouped["time vs adam"] = grouped["step_time"] / base
    frame = grouped.rename(
        columns={"step_time": "time per step (s)", "peak_memory": "peak memory (MB)"}
    )
    notes = [
        "time per step: median of each run's metrics.csv step_time, averaged over the runs; "
        "peak memory: max_rss "
        "of the Snakemake benchmark of the training job (process RSS, includes data loading)"
    ]
    return Table(
        "overhead",
        "Computational overhead per optimizer and decomposition",
        frame,
        {"time per step (s)": ".4f", "peak memory (MB)": ".0f", "time vs adam": ".2f"},
        notes,
    )


SEED_FORMATS = {
    "BD-rate (%)": "+.2f",
    "CI low (%)": "+.2f",
    "CI high (%)": "+.2f",
    "seed SD (%)": ".2f",
    "seed share of variance": ".2f",
    "dof": ".1f",
}


def paired_seed_intervals(
    images,
    reference: str,
    method: str,
    metric: str,
    resamples: int = DEFAULT_RESAMPLES,
    bootstrap_seed: int = DEFAULT_SEED,
):
    """(``seed_interval_table`` of the variants trained with the reference's seeds, notes naming
    the others, e.g. the single-seed control rows)."""
    seeds = images.groupby("variant")["seed"].agg(lambda s: sorted(set(s)))
    if reference not in seeds:
        raise TableError(f"reference variant {reference!r} has no per-image rows")
    paired = [v for v in seeds.index if seeds[v] == seeds[reference]]
    notes = [
        f"{v}: seeds {seeds[v]}, the reference has {seeds[reference]}: no seed-paired interval"
        for v in seeds.index
        if v not in paired
    ]
    try:
        result = seed_interval_table(
            images[images["variant"].isin(paired)],
            reference,
            metric,
            method,
            resamples,
            bootstrap_seed,
        )
    except ValueError as err:
        raise TableError(f"seed-and-image intervals: {err}") from None
    return result, notes


def seed_bd_table(
    images,
    reference: str,
    method: str,
    metric: str,
    resamples: int = DEFAULT_RESAMPLES,
    bootstrap_seed: int = DEFAULT_SEED,
) -> Table:
    """``bd_seeds_vs_<reference>``: per (dataset, variant) the BD-rate of the seed-averaged curves,
    its 95 % interval over training seeds and test images
    (``hpcm.analysis.bootstrap.seed_image_interval``), whether it excludes 0, each seed's BD-rate
    and their SD. Variants whose seeds differ from the reference's are listed in the notes."""
    import pandas as pd  # why: slow to import (~0.5 s); the commands that need it load it

    result, notes = paired_seed_intervals(
        images, reference, method, metric, resamples, bootstrap_seed
    )
    rows = []
    for r in result.itertuples():
        total = r.v_seed + r.v_image
        per_seed = ", ".join(
            f"s{s}: {b:+.2f}" if math.isfinite(b) else f"s{s}: n/a"
            for s, b in zip(r.seeds, r.seed_bd)
        )
        rows.append(
            {
                "dataset": r.dataset,
                "variant": r.variant,
                "n_seeds": r.n_seeds,
                "n_images": r.n_images,
                "BD-rate (%)": r.bd_rate,
                "CI low (%)": r.low,
                "CI high (%)": r.high,
                "CI excludes 0": _excludes_text(r.excludes_zero),
                "per-seed BD-rate (%)": per_seed,
                "seed SD (%)": r.seed_sd,
                "seed share of variance": r.v_seed / total if total > 0 else math.nan,
                "dof": r.dof,
            }
        )
    quality = "PSNR" if metric == "psnr" else "MS-SSIM (dB)"
    notes += reference_span_notes(images, reference, metric)
    notes += [
        f"BD-rate ({method}, on {quality}) of the seed-averaged curves vs {reference}; "
        "negative = fewer bits at equal quality",
        "95 % CI: BD +- t(dof) * sqrt(v_seed + v_image); v_seed = (seed SD)^2 / n_seeds, "
        f"each seed's BD against the reference's same seed; v_image = variance of {resamples} "
        "paired bootstrap resamples of the test images x n/(n-1); dof: Welch-Satterthwaite "
        "(docs/results.md)",
        "seed share of variance: v_seed / (v_seed + v_image)",
    ]
    notes += [
        f"{r.dataset}/{r.variant}: no BD-rate (a seed's or the mean curve does not rise "
        "strictly in rate and quality, or the curves do not overlap)"
        for r in result.itertuples()
        if not math.isfinite(r.bd_rate)
    ]
    notes += [
        f"{r.dataset}/{r.variant}: {r.invalid} of {r.resamples} image resamples gave no "
        "valid BD curve (left out of v_image)"
        for r in result.itertuples()
        if r.invalid
    ]
    columns = [
        "dataset",
        "variant",
        "n_seeds",
        "n_images",
        "BD-rate (%)",
        "CI low (%)",
        "CI high (%)",
        "CI excludes 0",
        "per-seed BD-rate (%)",
        "seed SD (%)",
        "seed share of variance",
        "dof",
    ]
    return Table(
        f"bd_seeds_vs_{reference}",
        f"BD-rate vs {reference} over training seeds and test images",
        pd.DataFrame(rows, columns=columns),
        SEED_FORMATS,
        notes,
    )


def reference_span_notes(images, reference: str, metric: str) -> list[str]:
    """Per dataset: the reference's seed-averaged curve, its quality span and whether it rises with
    the rate (a BD needs a monotonic reference; the pilot asks for a span of at least 4 dB)."""
    notes = []
    for dataset, on in images[images["variant"] == reference].groupby("dataset", sort=True):
        per_image = on.groupby(["lmbda", "image"])[["bpp", "psnr", "ms_ssim"]].mean()  # seeds first
        means = per_image.groupby("lmbda").mean().sort_values("bpp")
        quality = means["psnr"] if metric == "psnr" else means["ms_ssim"].map(ms_ssim_to_db)
        rising = bool(
            (quality.diff().dropna() > 0).all() and (means["bpp"].diff().dropna() > 0).all()
        )
        notes.append(
            f"{dataset}: {reference} curve {quality.min():.2f}-{quality.max():.2f} dB "
            "over "
            f"{len(means)} lambdas (span {quality.max() - quality.min():.2f} dB), "
            f"{'monotonic' if rising else 'NOT monotonic'} in rate and quality"
        )
    return notes


def has_several_seeds(images, reference: str) -> bool:
    """True when the reference was trained with more than one seed (the seed table is written)."""
    return images.loc[images["variant"] == reference, "seed"].nunique() > 1


OVERHEAD_FORMAT = "hpcm-optimizer-overhead/1"  # benchmarks/optimizer_overhead.py JSON_FORMAT
OVERHEAD_FIELDS = (
    "optimizer",
    "decomposition",
    "update_mode",
    "median_s",
    "ratio_vs_adam",
    "peak_mb",
)


def overhead_from_benchmark(path: str | Path) -> Table:
    """Overhead table from ``benchmarks/optimizer_overhead.py --json`` (one model, one batch)."""
    import pandas as pd  # why: slow to import (~0.5 s); the commands that need it load it

    path = Path(path)
    if not path.is_file():
        raise TableError(f"benchmark file not found: {path}")
    doc = json.loads(path.read_text())
    if (
        not isinstance(doc, dict)
        or doc.get("format") != OVERHEAD_FORMAT
        or not {"setup", "variants"} <= doc.keys()
    ):
        raise TableError(
            f"{path}: not an optimizer_overhead.py --json file (format {OVERHEAD_FORMAT!r} "
            "with 'setup' and 'variants')"
        )
    rows = []
    for variant, r in doc["variants"].items():
        missing = [key for key in OVERHEAD_FIELDS if key not in r]
        if missing:
            raise TableError(f"{path}: variant {variant!r} lacks {missing}")
        rows.append(
            {
                "optimizer": r["optimizer"],
                "decomposition": r["decomposition"],
                "update mode": r["update_mode"],
                "time per step (s)": float(r["median_s"]),
                "time vs adam": float(r["ratio_vs_adam"]),
                "peak memory (MB)": math.nan if r["peak_mb"] is None else float(r["peak_mb"]),
            }
        )
    setup = doc["setup"]
    notes = [
        f"from {path.name}: {setup['model']}, batch {setup['batch_size']} x "
        f"{setup['patch_size']}^2 on {setup['device']}; time: median step time; time vs adam: "
        "median over rounds of the ratio within a round; peak memory: CUDA max allocated, or peak "
        "RSS of a fresh process on CPU (empty: not measured)"
    ]
    return Table(
        "overhead_benchmark",
        "Computational overhead (training-step benchmark)",
        pd.DataFrame(rows),
        {"time per step (s)": ".4f", "time vs adam": ".3f", "peak memory (MB)": ".0f"},
        notes,
    )


# analysis-YAML key (written by the workflow's rule analysis_config from the study config): one
# sentence per training / validation folder that holds evaluated images, when the study config
# allows it (allow_test_data_in_training: true, hpcm.config.study); every table repeats them.
NOT_HELD_OUT = "not_held_out"


def not_held_out_notes(analysis: dict[str, Any]) -> list[str]:
    """The notes that say the test photos were not held out (none when they were)."""
    return [
        f"NOT HELD OUT (allow_test_data_in_training: true): {sentence}; the test photos "
        "trained or selected these models"
        for sentence in analysis.get(NOT_HELD_OUT) or []
    ]


# --------------------------------------------------------------------------------------------
# The table registry: every table the command writes, in order
# --------------------------------------------------------------------------------------------

DEFAULT_REFERENCE = "baseline"
DEFAULT_METHOD = "pchip"


@dataclass(frozen=True)
class TableInputs:
    """What a table builder may read: the measured points and runs, the ``analysis`` section, the
    BD of every variant against the reference (computed once, shared) and the bootstrap intervals
    (None without ``--images``), the per-image rows themselves and the bootstrap settings."""

    points: Any
    runs: Any
    analysis: Mapping[str, Any]
    reference: str
    method: str
    metric: str
    bd: Any
    unc: Uncertainty | None
    images: Any = None  # per-image rows (``--images``), or None
    resamples: int = DEFAULT_RESAMPLES
    bootstrap_seed: int = DEFAULT_SEED
    measured: tuple = ()  # per-image CSVs of measured codec anchors (``--measured``)


@dataclass(frozen=True)
class TableKind:
    """One registered kind of table.

    ``names(analysis)`` lists the tables it writes for an ``analysis`` section (none, one, or one
    per anchor / study); ``build(inputs)`` returns exactly those tables, in that order. ``caption``
    is the file under ``workflow/report/`` that the Snakemake report shows with them.
    ``quality_axis``: its tables have BD columns and say which quality axis they measure.
    """

    kind: str
    caption: str
    names: Callable[[Mapping[str, Any]], list[str]]
    build: Callable[[TableInputs], list[Table]]
    quality_axis: bool


TABLES: dict[str, TableKind] = {}


def register_table(
    kind: str,
    *,
    caption: str,
    names: Callable[[Mapping[str, Any]], list[str]] | None = None,
    quality_axis: bool = False,
) -> Callable:
    """Decorator: register ``build(inputs) -> list[Table]`` as table kind ``kind`` (written after
    the kinds registered before it). Without ``names`` the kind writes one table named ``kind``."""

    def decorate(build: Callable[[TableInputs], list[Table]]) -> Callable:
        if kind in TABLES:
            raise ValueError(f"table kind {kind!r} is registered twice")
        TABLES[kind] = TableKind(
            kind, caption, names or (lambda analysis: [kind]), build, quality_axis
        )
        return build

    return decorate


def reference_of(analysis: Mapping[str, Any]) -> str:
    return analysis.get("reference") or DEFAULT_REFERENCE


def table_names(analysis: Mapping[str, Any]) -> list[str]:
    """Every table that ``hpcm tables`` writes for this ``analysis`` section, in order."""
    return list(table_captions(analysis))


def table_captions(analysis: Mapping[str, Any]) -> dict[str, str]:
    """Table name -> its caption file (under ``workflow/report/``), in the order written."""
    return {name: kind.caption for kind in TABLES.values() for name in kind.names(analysis)}


@register_table(
    "bd",
    caption="table_bd.rst",
    quality_axis=True,
    names=lambda analysis: [bd_table_name(reference_of(analysis))],
)
def _bd_reference_tables(inputs: TableInputs) -> list[Table]:
    return [
        bd_vs(
            inputs.points,
            inputs.reference,
            inputs.method,
            inputs.metric,
            bd=inputs.bd,
            unc=inputs.unc,
        )
    ]


def anchor_names(analysis: Mapping[str, Any]) -> list[str]:
    """The anchors with a BD table: published ones (``anchors``), then measured codec anchors
    (``measured_anchors``, written by the workflow from the datasets' ``anchors:``)."""
    return list(
        dict.fromkeys([*(analysis.get("anchors") or []), *(analysis.get("measured_anchors") or [])])
    )


@register_table(
    "bd_anchor",
    caption="table_bd.rst",
    quality_axis=True,
    names=lambda analysis: [bd_table_name("", a) for a in anchor_names(analysis)],
)
def _bd_anchor_tables(inputs: TableInputs) -> list[Table]:
    anchors = anchor_names(inputs.analysis)
    if not anchors:
        return []
    anchor_table = load_anchors(measured=inputs.measured)
    measured_rows = measured_image_rows([*shipped_csvs(), *inputs.measured])
    tables = []
    for anchor in anchors:
        anchor_unc = (
            None
            if inputs.images is None
            else anchor_uncertainty(
                inputs.images,
                measured_rows,
                anchor,
                inputs.metric,
                inputs.method,
                inputs.resamples,
                inputs.bootstrap_seed,
            )
        )
        tables.append(
            bd_vs(
                inputs.points,
                inputs.reference,
                inputs.method,
                inputs.metric,
                anchor=anchor,
                unc=anchor_unc,
                anchor_table=anchor_table,
            )
        )
    return tables


@register_table(
    "expected_gains",
    caption="table_expected_gains.rst",
    quality_axis=True,
    names=lambda analysis: ["expected_gains"] if analysis.get("gains") else [],
)
def _expected_gains_tables(inputs: TableInputs) -> list[Table]:
    gains = inputs.analysis.get("gains")
    if not gains:
        return []
    return [
        expected_gains(
            inputs.points,
            inputs.runs,
            dict(gains),
            inputs.reference,
            inputs.method,
            inputs.metric,
            inputs.bd,
            inputs.unc,
        )
    ]


@register_table(
    "study",
    caption="table_study.rst",
    quality_axis=True,
    names=lambda analysis: list(analysis.get("studies") or {}),
)
def _study_tables(inputs: TableInputs) -> list[Table]:
    tables = []
    for name, spec in (inputs.analysis.get("studies") or {}).items():
        if "rows" not in spec:
            raise TableError(f"analysis.studies.{name}: no 'rows' mapping label -> variant")
        tables.append(
            study_table(
                name,
                spec.get("title", name),
                dict(spec["rows"]),
                inputs.points,
                inputs.runs,
                inputs.reference,
                inputs.method,
                inputs.metric,
                inputs.bd,
                inputs.unc,
            )
        )
    return tables


def several_seeds(analysis: Mapping[str, Any]) -> bool:
    """The study trains more than one seed (``seeds``, copied into the section by
    :func:`analysis_section`): then the seed-and-image table is written."""
    return len(analysis.get("seeds") or [0]) > 1


@register_table(
    "bd_seeds",
    caption="table_bd_seeds.rst",
    quality_axis=True,
    names=lambda analysis: (
        [f"bd_seeds_vs_{reference_of(analysis)}"] if several_seeds(analysis) else []
    ),
)
def _seed_tables(inputs: TableInputs) -> list[Table]:
    if not several_seeds(inputs.analysis):
        return []
    if inputs.images is None or not has_several_seeds(inputs.images, inputs.reference):
        raise TableError(
            f"the study trains seeds {list(inputs.analysis['seeds'])}, so the seed "
            "table needs the per-image rows of every seed: pass --images (hpcm rd "
            "points --images) with the reference's runs of more than one seed"
        )
    return [
        seed_bd_table(
            inputs.images,
            inputs.reference,
            inputs.method,
            inputs.metric,
            inputs.resamples,
            inputs.bootstrap_seed,
        )
    ]


@register_table("overhead", caption="table_overhead.rst")
def _overhead_tables(inputs: TableInputs) -> list[Table]:
    return [overhead_table(inputs.runs)]


@register_table(
    "overhead_benchmark",
    caption="table_overhead.rst",
    names=lambda analysis: ["overhead_benchmark"] if analysis.get("overhead_json") else [],
)
def _overhead_benchmark_tables(inputs: TableInputs) -> list[Table]:
    path = inputs.analysis.get("overhead_json")
    return [overhead_from_benchmark(path)] if path else []


def build_all(
    points_path: str | Path,
    runs_root: str | Path,
    analysis: dict[str, Any],
    output_dir: str | Path,
    benchmarks: str | Path | None = None,
    method: str | None = None,
    metric: str | None = None,
    overhead_json: str | Path | None = None,
    images_path: str | Path | None = None,
    resamples: int = DEFAULT_RESAMPLES,
    bootstrap_seed: int = DEFAULT_SEED,
    measured: Sequence[str | Path] = (),
) -> list[Path]:
    """Write every registered table (:data:`TABLES`); ``overhead_json`` joins the analysis section
    as its key ``overhead_json`` (the kind ``overhead_benchmark`` reads it); ``measured``: per-image
    CSVs of measured codec anchors, beside the shipped ones."""
    points = read_points(points_path)
    runs = load_runs(runs_root, benchmarks)
    analysis = {**analysis, "overhead_json": overhead_json}
    reference = reference_of(analysis)
    method = method or analysis.get("bd_method") or DEFAULT_METHOD
    metric = metric or analysis.get("metric") or "psnr"
    bd = bd_table(points, reference, metric, method)  # shared by the BD, gains and study tables
    images = read_images(images_path) if images_path else None
    unc = (
        uncertainty(images, reference, metric, method, resamples, bootstrap_seed)
        if images_path
        else None
    )
    inputs = TableInputs(
        points,
        runs,
        analysis,
        reference,
        method,
        metric,
        bd,
        unc,
        images,
        resamples,
        bootstrap_seed,
        tuple(measured),
    )
    written = []
    for kind in TABLES.values():
        tables = kind.build(inputs)
        built, expected = [t.name for t in tables], kind.names(analysis)
        if built != expected:  # a builder and its declared names out of step: a bug
            raise RuntimeError(f"table kind {kind.kind!r} built {built}, declared {expected}")
        for table in tables:
            if kind.quality_axis and metric != "psnr":  # the BD columns keep their names
                table.notes.append(
                    "quality axis: MS-SSIM in dB, -10 log10(1 - MS-SSIM); the "
                    "BD-PSNR columns are BD-MS-SSIM (dB)"
                )
            table.notes += not_held_out_notes(analysis)
            written += write_table(table, output_dir)
    return written


def read_analysis(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise TableError(f"config file not found: {path}")
    doc = yaml.safe_load(path.read_text()) or {}
    if not isinstance(doc, dict):
        raise TableError(f"{path}: expected a YAML mapping")
    return analysis_section(doc)


def analysis_section(doc: Mapping[str, Any]) -> dict[str, Any]:
    """The ``analysis`` section of a study config (or the section itself), with the study's
    ``seeds`` copied in: which tables are written depends on both."""
    analysis = dict(doc.get("analysis", doc))
    analysis.setdefault("seeds", list(doc.get("seeds") or [0]))
    return analysis


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hpcm tables",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--points", required=True, help="R-D points CSV (hpcm rd points)")
    parser.add_argument("--runs", required=True, help="folder holding the training run folders")
    parser.add_argument("--config", required=True, help="YAML with the 'analysis' section")
    parser.add_argument("--output-dir", required=True, help="where the tables go")
    parser.add_argument("--benchmarks", help="Snakemake benchmark folder of the training jobs")
    parser.add_argument(
        "--method",
        choices=METHODS,
        help="BD interpolation (default: analysis.bd_method, else pchip)",
    )
    parser.add_argument(
        "--metric",
        choices=("psnr", "ms_ssim_db"),
        help="quality axis (default: analysis.metric, else psnr)",
    )
    parser.add_argument("--overhead-json", help="benchmarks/optimizer_overhead.py --json output")
    parser.add_argument(
        "--images",
        help="per-image rows (hpcm rd points --images): adds 95 %% "
        "bootstrap intervals and seed spreads to the BD columns",
    )
    parser.add_argument(
        "--resamples",
        type=int,
        default=DEFAULT_RESAMPLES,
        help="bootstrap resamples (default %(default)s)",
    )
    parser.add_argument(
        "--bootstrap-seed",
        type=int,
        default=DEFAULT_SEED,
        help="seed of the resampling (default %(default)s)",
    )
    parser.add_argument(
        "--measured",
        nargs="*",
        default=[],
        help="per-image CSVs of measured codec anchors (results/anchors/D/A.csv): "
        "BD tables against them, with intervals paired on images",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(
        lambda: build_all(
            args.points,
            args.runs,
            read_analysis(args.config),
            args.output_dir,
            args.benchmarks,
            args.method,
            args.metric,
            args.overhead_json,
            args.images,
            args.resamples,
            args.bootstrap_seed,
            args.measured,
        )
    )


if __name__ == "__main__":
    sys.exit(main())
