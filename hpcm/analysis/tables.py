"""Ablation tables from measured results only (CSV + Markdown + LaTeX).

Inputs: the R-D points (``python -m hpcm.rd points``), the training run folders (each with
``metrics.csv`` and ``run.yaml``), optionally Snakemake benchmark TSVs of the training jobs, and
the ``analysis`` section of the workflow config (reference variant, anchors, gains, studies).
Nothing here is a constant: every number comes from those files, and a number that cannot be
computed (missing lambda, non-monotonic curve, no overlap) is shown as n/a with the reason.

Tables written to ``--output-dir`` as ``NAME.csv``, ``NAME.md`` and ``NAME.tex``:

- ``bd_vs_<reference>``: BD-rate (%) and BD-PSNR (dB) of every variant vs the reference variant,
  per dataset, with overlap and point counts;
- ``bd_vs_anchor-<anchor>``: the same against each published anchor (``hpcm.anchors``);
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

With ``--images`` (the per-image rows of ``python -m hpcm.rd points --images``) every BD-rate and
BD-PSNR of the BD, gains and study tables gets its 95 % paired-bootstrap interval over the test
images (``hpcm.analysis.bootstrap``; ``--resamples``, ``--bootstrap-seed``), a column saying
whether it excludes 0, and, where a variant was trained with more than one seed, the seed-to-seed
standard deviation of its BD (each seed's curve against the reference's curve of the same seed,
or the reference's seed mean where it lacks that seed).

CLI::

    python -m hpcm.tables --points results/rd/points.csv --runs results/train
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
from typing import Any, Sequence

import numpy as np
import yaml

from hpcm.analysis.anchors import anchor_curves_by_dataset
from hpcm.analysis.bd import METHODS, bd_row, bd_table
from hpcm.analysis.bootstrap import DEFAULT_RESAMPLES, DEFAULT_SEED, excludes_zero, interval_table
from hpcm.analysis.points import IMAGE_COLUMNS, curve, read_points, read_table, seed_points
from hpcm.analysis.runs import RunDiscoveryError, find_runs
from hpcm.config.optimizers import BASELINE_OPTIMIZER, OPTIMIZER_SPECS
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
        return Stability(math.nan, per_step, f"only {len(rows)} logged row(s) in the last "
                         f"{tail:.0%} of steps (need {MIN_TAIL_ROWS}); log more often")
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
        parts.append("unfrozen at: " + ", ".join(f"{g} {float(f):g}" for g, f in config["unfreeze_schedule"].items()))
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
        rows.append({
            "variant": str(config["variant"]), "lmbda": float(config["lmbda"]),
            "optimizer": str(config.get("optimizer", "")),
            "decomposition": str(config.get("decomposition", "")) if _has_scale_tasks(config) else "",
            "scale_weights": config.get("scale_weights"), "gammas": config.get("gammas"),
            "phase4": phase4_summary(config),
            "convergence_epoch": convergence_epoch(metrics), "loss_cv": stability.value,
            "loss_cv_per_step": stability.per_step, "loss_cv_note": stability.note,
            "loss_cv_logged": logged.value, "loss_cv_logged_note": logged.note,
            "skipped_steps": _last(metrics, "skipped_steps"),
            # median: the first logged steps include warm-up (allocations, autotuning)
            "step_time": _mean(metrics, "step_time", "median"),
            "peak_memory_mb": bench.get("peak_rss_mb", math.nan),
            "best_val_loss": float(metrics["val_loss"].min()),
            "run_dir": str(run_dir),
        })
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
    lines = [f"### {table.title}", "", "| " + " | ".join(cols) + " |",
             "|" + "|".join("---" for _ in cols) + "|"]
    for _, row in table.frame.iterrows():
        lines.append("| " + " | ".join(_cell(row[c], table.formats.get(c)) for c in cols) + " |")
    lines += [""] + [f"- {note}" for note in table.notes]
    return "\n".join(lines) + "\n"


_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "_": r"\_", "#": r"\#",
                  "$": r"\$", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\^{}"}


def _latex_escape(text: str) -> str:
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in text)


def to_latex(table: Table) -> str:
    cols = list(table.frame.columns)
    lines = [r"\begin{table}[t]", r"\centering", rf"\caption{{{_latex_escape(table.title)}}}",
             rf"\begin{{tabular}}{{{'l' * len(cols)}}}", r"\toprule",
             " & ".join(_latex_escape(c) for c in cols) + r" \\", r"\midrule"]
    for _, row in table.frame.iterrows():
        lines.append(" & ".join(_latex_escape(_cell(row[c], table.formats.get(c)))
                                for c in cols) + r" \\")
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

CI_COLUMNS = ("BD-rate CI low (%)", "BD-rate CI high (%)", "BD-rate CI excludes 0",
              "BD-PSNR CI low (dB)", "BD-PSNR CI high (dB)", "BD-PSNR CI excludes 0")
SEED_COLUMNS = ("n_seeds", "BD-rate seed std (%)", "BD-PSNR seed std (dB)")


@dataclass
class Uncertainty:
    """Bootstrap intervals and seed spreads per (dataset, variant); ``None`` fields: not computed."""

    intervals: Any  # DataFrame of hpcm.analysis.bootstrap.interval_table, or None
    seeds: Any  # DataFrame dataset, variant, n_seeds, bd_rate_std, bd_psnr_std, or None
    resamples: int = DEFAULT_RESAMPLES

    def columns(self, dataset: str, variant: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.intervals is not None:
            sel = self.intervals[(self.intervals["dataset"] == dataset)
                                 & (self.intervals["variant"] == variant)]
            r = sel.iloc[0] if len(sel) else None
            lows = (r["rate_low"], r["rate_high"], r["psnr_low"], r["psnr_high"]) if r is not None \
                else (math.nan,) * 4
            out.update(zip(CI_COLUMNS, (lows[0], lows[1], excludes_zero(lows[0], lows[1]),
                                        lows[2], lows[3], excludes_zero(lows[2], lows[3]))))
        if self.seeds is not None:
            sel = self.seeds[(self.seeds["dataset"] == dataset) & (self.seeds["variant"] == variant)]
            r = sel.iloc[0] if len(sel) else None
            out.update(zip(SEED_COLUMNS, (int(r["n_seeds"]), r["bd_rate_std"], r["bd_psnr_std"])
                           if r is not None else (math.nan,) * 3))
        return out

    def notes(self) -> list[str]:
        notes = []
        if self.intervals is not None:
            notes.append(f"CI: 95 % paired bootstrap over the test images ({self.resamples} "
                         "resamples of image indices with replacement, the same for both curves; "
                         "percentile interval); the BD itself is that of the plain means")
            notes += [f"{r.dataset}/{r.variant}: {r.invalid} of {r.resamples} resamples gave no "
                      "valid BD curve and are left out of the interval"
                      for r in self.intervals.itertuples() if r.invalid]
        if self.seeds is not None:
            notes.append("seed std: standard deviation (ddof=1) over training seeds of each "
                         "seed's BD against the reference")
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
    means = per_seed.groupby(["dataset", "variant", "lmbda"])[["bpp", "psnr", "ms_ssim_db"]].mean() \
        .reset_index()
    rows = []
    for (dataset, variant), n in counts.items():
        if n <= 1:
            rows.append({"dataset": dataset, "variant": variant, "n_seeds": int(n),
                         "bd_rate_std": math.nan, "bd_psnr_std": math.nan})
            continue
        rates, psnrs = [], []
        for seed, group in per_seed[(per_seed["dataset"] == dataset)
                                    & (per_seed["variant"] == variant)].groupby("seed"):
            ref = per_seed[(per_seed["dataset"] == dataset) & (per_seed["variant"] == reference)
                           & (per_seed["seed"] == seed)]
            if ref.empty:
                ref = means[(means["dataset"] == dataset) & (means["variant"] == reference)]
            ref_curve = curve(ref, dataset, reference, metric)
            row = bd_row(dataset, variant, reference, ref_curve, curve(group, dataset, variant, metric),
                         metric, method)
            rates.append(row.bd_rate)
            psnrs.append(row.bd_psnr)
        rows.append({"dataset": dataset, "variant": variant, "n_seeds": int(n),
                     "bd_rate_std": float(np.std(rates, ddof=1)),
                     "bd_psnr_std": float(np.std(psnrs, ddof=1))})
    return pd.DataFrame(rows)


def read_images(path: str | Path):
    """The per-image table of ``python -m hpcm.rd points --images``, checking its columns."""
    return read_table(path, IMAGE_COLUMNS, "per-image file", "; write it with `python -m hpcm.rd points --images`",
                      error=TableError)


def uncertainty(images, reference: str, metric: str, method: str,
                resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED) -> Uncertainty:
    try:
        intervals = interval_table(images, reference, metric, method, resamples, seed)
    except ValueError as err:
        raise TableError(f"bootstrap intervals: {err}") from None
    return Uncertainty(intervals, seed_spread(images, reference, metric, method), resamples)


BD_FORMATS = {"BD-rate (%)": "+.2f", "BD-PSNR (dB)": "+.3f", "overlap (%)": ".0f",
              "BD-rate CI low (%)": "+.2f", "BD-rate CI high (%)": "+.2f",
              "BD-PSNR CI low (dB)": "+.3f", "BD-PSNR CI high (dB)": "+.3f",
              "BD-rate seed std (%)": ".2f", "BD-PSNR seed std (dB)": ".3f"}


def _with_uncertainty(frame, unc: Uncertainty | None):
    """``frame`` (dataset and variant columns) with the interval / seed columns appended."""
    if unc is None:
        return frame
    extra = [unc.columns(r.dataset, r.variant) for r in frame[["dataset", "variant"]].itertuples()]
    # no interval where the plain means give no BD (the note says why)
    has_bd = frame["BD-rate (%)"].notna().to_numpy() & frame["BD-PSNR (dB)"].notna().to_numpy()
    for column in (extra[0] if extra else {}):
        values = [e[column] if ok or column in SEED_COLUMNS else math.nan
                  for e, ok in zip(extra, has_bd)]
        if column.endswith("excludes 0"):
            values = [_excludes_text(v) for v in values]
        frame[column] = values
    return frame


def _bd_notes(bd) -> list[str]:
    notes = [f"{r.dataset}/{r.variant}: {r.error}" for r in bd.itertuples() if r.error]
    notes += [f"{r.dataset}/{r.variant}: low overlap ({r.overlap_rate * 100:.0f} % of the "
              "distortion range); BD covers the overlap only"
              for r in bd.itertuples() if r.low_overlap and not r.error]
    return notes


def bd_vs(points, reference: str, method: str, metric: str, anchor: str | None = None,
          bd=None, unc: Uncertainty | None = None) -> Table:
    """BD table of every variant vs ``reference`` (or a published ``anchor``); ``bd`` if computed."""
    curves = None
    if anchor:
        curves = anchor_curves_by_dataset(anchor, metric, datasets=points["dataset"].unique())
        reference = anchor
    if bd is None:
        bd = bd_table(points, reference, metric, method, curves)
    frame = bd.rename(columns={"bd_rate": "BD-rate (%)", "bd_psnr": "BD-PSNR (dB)"})
    frame["overlap (%)"] = bd["overlap_rate"] * 100
    frame = frame[["dataset", "variant", "BD-rate (%)", "BD-PSNR (dB)", "overlap (%)",
                   "n_reference", "n_test"]].copy()
    frame = _with_uncertainty(frame, None if anchor else unc)
    quality = "PSNR" if metric == "psnr" else "MS-SSIM (dB)"
    title = (f"BD-rate and BD-{quality} vs {'anchor ' if anchor else ''}{reference} "
             f"({method})")
    name = f"bd_vs_anchor-{anchor}" if anchor else f"bd_vs_{reference}"
    notes = _bd_notes(bd) + (unc.notes() if unc is not None and not anchor else [])
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
        lookup[(dataset, reference)] = bd_row(dataset, reference, reference, ref_curve, ref_curve,
                                              metric, method)
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


def expected_gains(points, runs, gains: dict[str, str], reference: str, method: str,
                   metric: str, bd=None, unc: Uncertainty | None = None) -> Table:
    import pandas as pd  # why: slow to import (~0.5 s); the commands that need it load it

    lookup, bd = _bd_lookup(points, reference, method, metric, bd)
    rows = []
    for dataset in sorted(points["dataset"].unique()):
        for label, variant in [(reference, reference), *gains.items()]:
            r = lookup.get((dataset, variant))
            rows.append({
                "dataset": dataset, "phase": label, "variant": variant,
                "BD-PSNR (dB)": r.bd_psnr if r else math.nan,
                "BD-rate (%)": r.bd_rate if r else math.nan,
                "convergence epoch": _run_stat(runs, variant, "convergence_epoch"),
                "lambdas": int((points[(points["dataset"] == dataset)
                                       & (points["variant"] == variant)]).shape[0]),
            })
    notes = _bd_notes(bd[bd["variant"].isin(gains.values())]) + _absent(points, runs, gains.values())
    notes.append("convergence epoch: first epoch with validation loss within 1 % of the run's "
                 "best, mean over lambdas")
    notes += unc.notes() if unc is not None else []
    frame = _with_uncertainty(pd.DataFrame(rows), unc)
    return Table("expected_gains", f"Expected gains as measured (vs {reference}, {method})",
                 frame, {**BD_FORMATS, "convergence epoch": ".1f"}, notes)


def study_table(name: str, title: str, rows_spec: dict[str, str], points, runs, reference: str,
                method: str, metric: str, bd=None, unc: Uncertainty | None = None) -> Table:
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
            described = ({"phase 4 keys": sel["phase4"].iloc[0] if len(sel) else None} if phase4_study else
                         {"scale weights": sel["scale_weights"].iloc[0] if len(sel) else None,
                          "gammas": sel["gammas"].iloc[0] if len(sel) else None})
            rows.append({
                "dataset": dataset, "config": label, "variant": variant, **described,
                "BD-PSNR (dB)": r.bd_psnr if r else math.nan,
                "BD-rate (%)": r.bd_rate if r else math.nan,
                cv_column: _run_stat(runs, variant, "loss_cv") if per_step else
                _run_stat(runs, variant, "loss_cv_logged"),
                "skipped steps": _run_stat(runs, variant, "skipped_steps", "sum"),
            })
    notes = _bd_notes(bd[bd["variant"].isin(rows_spec.values())]) + _absent(points, runs,
                                                                            rows_spec.values())
    basis = ("the per-step training losses, pooled exactly from each logging window's mean "
             "and std" if per_step else "the logged training-loss rows, each a MEAN over "
             "log_every steps (this understates the per-step spread; the runs logged no "
             "loss_std)")
    notes.append(f"CoV: std/mean (ddof=1) of {basis}, over the last 10 % of steps, mean over "
                 "lambdas; skipped steps: non-finite gradients, summed over lambdas")
    note_column = "loss_cv_note" if per_step else "loss_cv_logged_note"
    notes += [f"{r.variant} (lambda {r.lmbda:g}): CoV n/a: {getattr(r, note_column)}"
              for r in study_runs.itertuples() if getattr(r, note_column)]
    notes += unc.notes() if unc is not None else []
    return Table(name, f"{title} (vs {reference}, {method})", _with_uncertainty(pd.DataFrame(rows), unc),
                 {**BD_FORMATS, cv_column: ".4f", "skipped steps": ".0f"}, notes)


def overhead_table(runs) -> Table:
    grouped = (runs.groupby(["optimizer", "decomposition"], sort=True)
               .agg(runs=("variant", "size"), step_time=("step_time", "mean"),
                    peak_memory=("peak_memory_mb", "max")).reset_index())
    adam = grouped.loc[grouped["optimizer"] == BASELINE_OPTIMIZER, "step_time"]
    base = float(adam.iloc[0]) if len(adam) else math.nan
    grouped["time vs adam"] = grouped["step_time"] / base
    frame = grouped.rename(columns={"step_time": "time per step (s)",
                                    "peak_memory": "peak memory (MB)"})
    notes = ["time per step: median of each run's metrics.csv step_time, averaged over the runs; "
             "peak memory: max_rss "
             "of the Snakemake benchmark of the training job (process RSS, includes data loading)"]
    return Table("overhead", "Computational overhead per optimizer and decomposition", frame,
                 {"time per step (s)": ".4f", "peak memory (MB)": ".0f", "time vs adam": ".2f"},
                 notes)


OVERHEAD_FORMAT = "hpcm-optimizer-overhead/1"  # benchmarks/optimizer_overhead.py JSON_FORMAT
OVERHEAD_FIELDS = ("optimizer", "decomposition", "update_mode", "median_s", "ratio_vs_adam", "peak_mb")


def overhead_from_benchmark(path: str | Path) -> Table:
    """Overhead table from ``benchmarks/optimizer_overhead.py --json`` (one model, one batch)."""
    import pandas as pd  # why: slow to import (~0.5 s); the commands that need it load it

    path = Path(path)
    if not path.is_file():
        raise TableError(f"benchmark file not found: {path}")
    doc = json.loads(path.read_text())
    if not isinstance(doc, dict) or doc.get("format") != OVERHEAD_FORMAT or not {"setup", "variants"} <= doc.keys():
        raise TableError(f"{path}: not an optimizer_overhead.py --json file (format {OVERHEAD_FORMAT!r} "
                         "with 'setup' and 'variants')")
    rows = []
    for variant, r in doc["variants"].items():
        missing = [key for key in OVERHEAD_FIELDS if key not in r]
        if missing:
            raise TableError(f"{path}: variant {variant!r} lacks {missing}")
        rows.append({"optimizer": r["optimizer"], "decomposition": r["decomposition"],
                     "update mode": r["update_mode"], "time per step (s)": float(r["median_s"]),
                     "time vs adam": float(r["ratio_vs_adam"]),
                     "peak memory (MB)": math.nan if r["peak_mb"] is None else float(r["peak_mb"])})
    setup = doc["setup"]
    notes = [f"from {path.name}: {setup['model']}, batch {setup['batch_size']} x {setup['patch_size']}^2 "
             f"on {setup['device']}; time: median step time; "
             "time vs adam: median over rounds of the ratio within a round; peak memory: CUDA max "
             "allocated, or peak RSS of a fresh process on CPU (empty: not measured)"]
    return Table("overhead_benchmark", "Computational overhead (training-step benchmark)",
                 pd.DataFrame(rows), {"time per step (s)": ".4f", "time vs adam": ".3f",
                                      "peak memory (MB)": ".0f"}, notes)


def build_all(points_path: str | Path, runs_root: str | Path, analysis: dict[str, Any],
              output_dir: str | Path, benchmarks: str | Path | None = None,
              method: str | None = None, metric: str | None = None,
              overhead_json: str | Path | None = None, images_path: str | Path | None = None,
              resamples: int = DEFAULT_RESAMPLES, bootstrap_seed: int = DEFAULT_SEED) -> list[Path]:
    points = read_points(points_path)
    runs = load_runs(runs_root, benchmarks)
    reference = analysis.get("reference", "baseline")
    method = method or analysis.get("bd_method", "pchip")
    metric = metric or analysis.get("metric") or "psnr"
    bd = bd_table(points, reference, metric, method)  # shared by the BD, gains and study tables
    unc = uncertainty(read_images(images_path), reference, metric, method, resamples,
                      bootstrap_seed) if images_path else None
    tables = [bd_vs(points, reference, method, metric, bd=bd, unc=unc)]
    tables += [bd_vs(points, reference, method, metric, anchor=a)
               for a in analysis.get("anchors") or []]
    if analysis.get("gains"):
        tables.append(expected_gains(points, runs, dict(analysis["gains"]), reference, method,
                                     metric, bd, unc))
    for name, spec in (analysis.get("studies") or {}).items():
        if "rows" not in spec:
            raise TableError(f"analysis.studies.{name}: no 'rows' mapping label -> variant")
        tables.append(study_table(name, spec.get("title", name), dict(spec["rows"]), points,
                                  runs, reference, method, metric, bd, unc))
    if metric != "psnr":  # the BD columns keep their names; every BD table says what they measure
        for table in tables:
            table.notes.append("quality axis: MS-SSIM in dB, -10 log10(1 - MS-SSIM); the BD-PSNR columns "
                               "are BD-MS-SSIM (dB)")
    tables.append(overhead_table(runs))
    if overhead_json:
        tables.append(overhead_from_benchmark(overhead_json))
    written = []
    for table in tables:
        written += write_table(table, output_dir)
    return written


def read_analysis(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise TableError(f"config file not found: {path}")
    doc = yaml.safe_load(path.read_text()) or {}
    if not isinstance(doc, dict):
        raise TableError(f"{path}: expected a YAML mapping")
    return doc.get("analysis", doc)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m hpcm.tables", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--points", required=True, help="R-D points CSV (hpcm.rd points)")
    parser.add_argument("--runs", required=True, help="folder holding the training run folders")
    parser.add_argument("--config", required=True, help="YAML with the 'analysis' section")
    parser.add_argument("--output-dir", required=True, help="where the tables go")
    parser.add_argument("--benchmarks", help="Snakemake benchmark folder of the training jobs")
    parser.add_argument("--method", choices=METHODS,
                        help="BD interpolation (default: analysis.bd_method, else pchip)")
    parser.add_argument("--metric", choices=("psnr", "ms_ssim_db"),
                        help="quality axis (default: analysis.metric, else psnr)")
    parser.add_argument("--overhead-json", help="benchmarks/optimizer_overhead.py --json output")
    parser.add_argument("--images", help="per-image rows (hpcm.rd points --images): adds 95 %% "
                                         "bootstrap intervals and seed spreads to the BD columns")
    parser.add_argument("--resamples", type=int, default=DEFAULT_RESAMPLES,
                        help="bootstrap resamples (default %(default)s)")
    parser.add_argument("--bootstrap-seed", type=int, default=DEFAULT_SEED,
                        help="seed of the resampling (default %(default)s)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(lambda: build_all(args.points, args.runs, read_analysis(args.config), args.output_dir,
                                         args.benchmarks, args.method, args.metric, args.overhead_json,
                                         args.images, args.resamples, args.bootstrap_seed))


if __name__ == "__main__":
    sys.exit(main())
