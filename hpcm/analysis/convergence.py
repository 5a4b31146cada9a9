"""BD-rate against the reference at the same training step: the convergence table and plot.

Balanced R-D claims better results at a fixed training budget, so every variant is compared with
the reference after the same number of steps. Inputs: the evaluations of the training snapshots
(``results/eval_snapshots/<dataset>/<variant>/lmbda<L>/seed<k>/step<N>.csv``, real bitstreams on
a fixed subset of the test images: the first images by name) and the final evaluations (every
image). Rows, per step and variant other than the reference:

- each snapshot step, on the subset;
- the last step on the same subset (the final evaluation's rows of those images), so that the
  subset's series ends at the last step too;
- the last step on every image: the study's answer, as in ``bd_seeds_vs_<reference>``.

Every BD-rate has its 95 % interval over seeds and images
(``hpcm.analysis.bootstrap.seed_image_interval``), or over images alone when the study has one
seed (the column ``interval`` says which). Written as ``convergence.{csv,md,tex}`` and a plot
(PNG + PDF) with the intervals as error bars.

CLI::

    python -m hpcm.analysis.convergence --snapshots results/eval_snapshots/kodak/*/*/*/step*.csv
        --final results/eval/kodak/*/*/seed*.csv --final-step 1000 --reference baseline
        --output-dir results/tables --plot results/plots/convergence.png
        [--metric psnr] [--method pchip] [--resamples 1000] [--bootstrap-seed 0]
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from pathlib import Path
from typing import Sequence

from hpcm.analysis.bootstrap import (
    DEFAULT_RESAMPLES,
    DEFAULT_SEED,
    excludes_zero,
    image_curve,
    interval_table,
    mean_curve_bd,
    seed_interval_table,
)
from hpcm.analysis.points import eval_rows, image_table
from hpcm.analysis.tables import Table, TableError, write_table
from hpcm.util.cli import run_command

STEP_FILE = re.compile(r"step(\d+)\.csv$")
FORMATS = {"BD-rate (%)": "+.2f", "CI low (%)": "+.2f", "CI high (%)": "+.2f", "seed SD (%)": ".2f"}


def snapshot_step(path: str | Path) -> int:
    """The training step of a snapshot evaluation, from its file name ``step<N>.csv``."""
    match = STEP_FILE.search(Path(path).name)
    if not match:
        raise TableError(f"{path}: a snapshot evaluation is named step<N>.csv (N = training step)")
    return int(match.group(1))


def _interval_rows(images, reference: str, metric: str, method: str, resamples: int, seed: int):
    """variant -> row of the BD-rate interval over seeds and images (images alone: 1 seed)."""
    seeds = images.groupby("variant")["seed"].nunique()
    rows = {}
    if int(seeds.min()) >= 2:
        table = seed_interval_table(images, reference, metric, method, resamples, seed)
        for r in table.itertuples():
            rows[r.variant] = {
                "n_seeds": r.n_seeds,
                "BD-rate (%)": r.bd_rate,
                "CI low (%)": r.low,
                "CI high (%)": r.high,
                "seed SD (%)": r.seed_sd,
                "interval": "seeds and images",
            }
        return rows
    table = interval_table(images, reference, metric, method, resamples, seed)
    order = sorted(images["image"].unique())
    dataset = str(images["dataset"].iloc[0])
    ref = image_curve(images, dataset, reference, metric, order)
    for hit in table[table["variant"] != reference].itertuples():
        value = mean_curve_bd(ref, image_curve(images, dataset, hit.variant, metric, order), method)
        rows[hit.variant] = {
            "n_seeds": 1,
            "BD-rate (%)": value,
            "CI low (%)": hit.rate_low,
            "CI high (%)": hit.rate_high,
            "seed SD (%)": math.nan,
            "interval": "images only (one seed)",
        }
    return rows


def convergence_frame(
    snapshots: Sequence[str | Path],
    finals: Sequence[str | Path],
    final_step: int,
    reference: str,
    metric: str = "psnr",
    method: str = "pchip",
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
):
    import pandas as pd  # why: slow to import (~0.5 s); the commands that need it load it

    by_step: dict[int, list[str]] = {}
    for path in snapshots:
        by_step.setdefault(snapshot_step(path), []).append(str(path))
    if not by_step:
        raise TableError("no snapshot evaluations given (--snapshots)")
    if max(by_step) >= final_step:
        raise TableError(f"snapshot step {max(by_step)} is not before the final step {final_step}")
    final = image_table(eval_rows(finals))
    datasets = sorted(final["dataset"].unique())
    if len(datasets) != 1:
        raise TableError(f"the final evaluations cover {datasets}; give those of one dataset")
    series = []
    subset = None
    for step in sorted(by_step):
        images = image_table(eval_rows(by_step[step]))
        names = sorted(images["image"].unique())
        if subset is not None and names != subset:
            raise TableError(
                f"step {step}: evaluated on {names}, earlier steps on {subset}; the subset is fixed"
            )
        subset = names
        series.append((step, images, f"first {len(names)} images"))
    if not set(subset) <= set(final["image"]):
        raise TableError(f"the snapshot images {subset} are not all in the final evaluations")
    series.append((final_step, final[final["image"].isin(subset)], f"first {len(subset)} images"))
    series.append((final_step, final, f"all {final['image'].nunique()} images"))
    rows = []
    for step, images, label in series:
        found = _interval_rows(images, reference, metric, method, resamples, seed)
        for variant, row in sorted(found.items()):
            excludes = excludes_zero(row["CI low (%)"], row["CI high (%)"])
            rows.append(
                {
                    "dataset": datasets[0],
                    "step": step,
                    "images": label,
                    "variant": variant,
                    "rate": "real bitstreams",
                    **row,
                    "excludes 0": _yes_no(excludes),
                }
            )
    columns = [
        "dataset",
        "step",
        "images",
        "variant",
        "n_seeds",
        "BD-rate (%)",
        "CI low (%)",
        "CI high (%)",
        "excludes 0",
        "seed SD (%)",
        "interval",
        "rate",
    ]
    return pd.DataFrame(rows)[columns]


def _yes_no(value) -> str:
    return "n/a" if isinstance(value, float) and math.isnan(value) else ("yes" if value else "no")


def convergence_table(frame, reference: str, method: str) -> Table:
    notes = [
        f"BD-rate (%, {method}) of each variant vs {reference} after the same number of "
        "training steps, negative = fewer bits at equal quality; every point: real bitstreams",
        "snapshot steps: the fixed subset of the test images (the first by name); the last "
        "step appears on that subset and on every image (the study's answer)",
        "95 % interval: BD +- t(nu) * sqrt(var(per-seed BD)/S + image-bootstrap variance), "
        "Welch-Satterthwaite nu (hpcm.analysis.bootstrap; docs/results.md)",
    ]
    missing = frame[~frame["BD-rate (%)"].map(math.isfinite)]
    notes += [
        f"step {step}, {images}, {variant}: no BD-rate (a seed's or the mean curve does not "
        "rise strictly in rate and quality, or the curves do not overlap)"
        for step, images, variant in zip(missing["step"], missing["images"], missing["variant"])
    ]
    return Table(
        "convergence",
        f"Convergence: BD-rate vs {reference} at the same step",
        frame,
        FORMATS,
        notes,
    )


def plot(frame, reference: str, path: str | Path) -> list[Path]:
    """BD-rate vs step with the intervals as error bars; the all-image last point hollow."""
    import matplotlib  # why: slow to import; only the plot needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # why: after the backend is chosen

    path = Path(path)
    fig, ax = plt.subplots(figsize=(6, 4))
    variants = sorted(frame["variant"].unique())
    span = max(frame["step"]) - min(frame["step"]) or 1
    for k, variant in enumerate(variants):
        mine = frame[frame["variant"] == variant]
        full = mine["images"].str.startswith("all")
        for selection, hollow in ((mine[~full], False), (mine[full], True)):
            x = selection["step"].to_numpy(float) + (0.015 * span if hollow else 0.0)
            y = selection["BD-rate (%)"].to_numpy(float)
            low = selection["CI low (%)"].to_numpy(float)
            high = selection["CI high (%)"].to_numpy(float)
            err = [y - low, high - y]
            ax.errorbar(
                x,
                y,
                yerr=err,
                fmt="o" if not hollow else "s",
                color=f"C{k}",
                capsize=3,
                mfc="none" if hollow else f"C{k}",
                ls="-" if not hollow else "none",
                label=variant if not hollow else f"{variant} (all images)",
            )
    ax.axhline(0.0, color="0.5", lw=0.8)
    ax.set_xlabel("training step")
    ax.set_ylabel(f"BD-rate vs {reference} (%)")
    ax.set_title("Convergence (95 % intervals over seeds and images)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    written = []
    for target in (path.with_suffix(".png"), path.with_suffix(".pdf")):
        fig.savefig(target, dpi=150)
        written.append(target)
    plt.close(fig)
    return written


def build(
    snapshots,
    finals,
    final_step: int,
    reference: str,
    output_dir: str | Path,
    plot_path: str | Path,
    metric: str = "psnr",
    method: str = "pchip",
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
) -> list[Path]:
    frame = convergence_frame(
        snapshots, finals, final_step, reference, metric, method, resamples, seed
    )
    tables = write_table(convergence_table(frame, reference, method), output_dir)
    return tables + plot(frame, reference, plot_path)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m hpcm.analysis.convergence",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--snapshots", nargs="+", required=True, help="snapshot evaluations .../step<N>.csv"
    )
    parser.add_argument("--final", nargs="+", required=True, help="final evaluations (every image)")
    parser.add_argument("--final-step", type=int, required=True, help="the runs' last step")
    parser.add_argument("--reference", required=True, help="reference variant")
    parser.add_argument("--output-dir", required=True, help="where convergence.{csv,md,tex} go")
    parser.add_argument(
        "--plot", required=True, help="plot path (.png; a .pdf is written beside it)"
    )
    parser.add_argument("--metric", default="psnr", choices=("psnr", "ms_ssim_db"))
    parser.add_argument("--method", default="pchip", choices=("pchip", "akima", "cubic"))
    parser.add_argument("--resamples", type=int, default=DEFAULT_RESAMPLES)
    parser.add_argument("--bootstrap-seed", type=int, default=DEFAULT_SEED)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(
        lambda: build(
            args.snapshots,
            args.final,
            args.final_step,
            args.reference,
            args.output_dir,
            args.plot,
            args.metric,
            args.method,
            args.resamples,
            args.bootstrap_seed,
        )
    )


if __name__ == "__main__":
    sys.exit(main())
