"""The report's first page: the study's answer and its scale, as reStructuredText.

Snakemake's HTML report opens on the workflow description (``workflow/report/workflow.rst``),
which includes the file written here, so the first thing a reader sees is the number:

- per dataset, every variant of the summary table (``hpcm.analysis.summary``) with its BD-rate
  against the reference in PSNR and in MS-SSIM, the 95 % interval of each and whether it
  excludes 0 (read from ``summary.csv``, the reference's own row left out);
- the scale of the study, read from what ran: the model(s), training steps (or epochs) per run,
  the λs, the training seeds and how many runs start from a checkpoint (the training runs'
  ``run.yaml``), and the test images per dataset (the per-image table of ``hpcm rd points``).

CLI::

    python -m hpcm.analysis.answer --summary results/tables/summary.csv
        --config results/configs/analysis.yaml --runs results/train
        --images results/rd/images.csv --output results/report/answer.rst
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any, Sequence

from hpcm.analysis.bootstrap import excludes_zero
from hpcm.analysis.forest import SUMMARY_LABELS, read_summary, summary_column
from hpcm.analysis.runs import RunDiscoveryError, find_runs
from hpcm.analysis.tables import TableError, read_analysis, read_images
from hpcm.util.cli import run_command
from hpcm.util.io import atomic_write_text

EXCLUDES = {True: "**yes**", False: "no"}


def interval_cell(value: float, low: float, high: float) -> str:
    """ "-4.79 [-6.47, -3.22]" (as the summary's Markdown), "n/a" without a value."""
    if not math.isfinite(value):
        return "n/a"
    text = f"{value:+.2f}"
    if math.isfinite(low) and math.isfinite(high):
        text += f" [{low:+.2f}, {high:+.2f}]"
    return text


def excludes_cell(low: float, high: float) -> str:
    verdict = excludes_zero(low, high)
    return EXCLUDES[verdict] if isinstance(verdict, bool) else "n/a"


def measured_metrics(summary, reference: str, dataset: str) -> list[str]:
    """The metrics with at least one BD-rate on ``dataset`` (MS-SSIM is not measured on images
    smaller than its 5 scales need)."""
    on = summary[summary["dataset"] == dataset]
    return [m for m in SUMMARY_LABELS if on[summary_column(m, reference)].notna().any()]


def answer_rows(
    summary, reference: str, dataset: str, metrics: Sequence[str] = tuple(SUMMARY_LABELS)
) -> list[list[str]]:
    """[variant, then per metric: BD-rate [CI], excludes 0] for every variant but the reference."""
    rows = []
    for _, r in summary[
        (summary["dataset"] == dataset) & (summary["variant"] != reference)
    ].iterrows():
        cells = [str(r["variant"])]
        for metric in metrics:
            key = summary_column(metric, reference)
            value, low, high = (float(r[key]), float(r[f"{key} low"]), float(r[f"{key} high"]))
            cells += [interval_cell(value, low, high), excludes_cell(low, high)]
        rows.append(cells)
    return rows


def _list_table(caption: str, header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = [f".. list-table:: {caption}", "   :header-rows: 1", ""]
    for cells in [header, *rows]:
        lines.append(f"   * - {cells[0]}")
        lines += [f"     - {cell}" for cell in cells[1:]]
    return lines + [""]


def _values(values) -> str:
    return ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in sorted(set(values)))


def study_scale(runs_root: str | Path, images) -> list[str]:
    """Bullet lines: models, run length, λs, seeds, checkpoints started from, test images."""
    try:
        runs = find_runs(runs_root)
    except RunDiscoveryError as err:
        raise TableError(str(err)) from None
    configs = [run.config for run in runs]
    steps = [c.get("steps") for c in configs if c.get("steps") is not None]
    epochs = [c.get("epochs") for c in configs if c.get("epochs") is not None]
    length = []
    if steps:
        length.append(f"{_values(int(s) for s in steps)} steps")
    if epochs:
        length.append(f"{_values(int(e) for e in epochs)} epochs")
    started = sum(1 for c in configs if c.get("init_checkpoint"))
    variants = {str(c["variant"]) for c in configs}
    seeds = [int(c.get("seed", 0)) for c in configs]
    per_point: dict[tuple, set] = {}
    for c, seed in zip(configs, seeds):
        per_point.setdefault((str(c["variant"]), float(c["lmbda"])), set()).add(seed)
    counts = sorted({len(s) for s in per_point.values()})
    n_seeds = str(counts[0]) if len(counts) == 1 else f"{counts[0]} to {counts[-1]}"
    lines = [
        f"- **model**: {_values(str(c.get('model', '')) for c in configs)}",
        f"- **training**: {len(configs)} runs ({len(variants)} variants); "
        f"{' / '.join(length) or 'n/a'} per run, batch "
        f"{_values(int(c['batch_size']) for c in configs if c.get('batch_size'))}, crops "
        f"{_values(int(c['patch_size']) for c in configs if c.get('patch_size'))} px; "
        + (
            "all from scratch"
            if not started
            else "all start from a checkpoint (warm start or fine-tuning)"
            if started == len(configs)
            else f"{started} of {len(configs)} runs start from a checkpoint (warm start or "
            "fine-tuning), the others from scratch"
        ),
        f"- **λ**: {_values(float(c['lmbda']) for c in configs)}",
        f"- **training seeds**: {_values(seeds)} ({n_seeds} per variant and λ)",
    ]
    for dataset in sorted(images["dataset"].unique()):
        n = images.loc[images["dataset"] == dataset, "image"].nunique()
        lines.append(f"- **test images**: {dataset}, {n} images (real bitstreams)")
    return lines


def answer_rst(summary, analysis: dict[str, Any], runs_root: str | Path, images) -> str:
    reference = analysis.get("reference", "baseline")
    method = analysis.get("bd_method", "pchip")
    lines = [
        f"BD-rate of every variant against **{reference}** ({method}; negative = fewer bits at "
        'equal quality; 95 % paired bootstrap interval over the test images; "yes": the '
        "interval excludes 0). Read from ``summary.csv`` when the workflow wrote this page.",
        "",
    ]
    for dataset in sorted(summary["dataset"].unique()):
        n = images.loc[images["dataset"] == dataset, "image"].nunique()
        metrics = measured_metrics(summary, reference, dataset)
        header = ["variant"]
        for metric in metrics:
            header += [f"BD-rate {SUMMARY_LABELS[metric]} (%) [95 % CI]", "CI excludes 0"]
        lines += _list_table(
            f"{dataset} ({n} test images)",
            header,
            answer_rows(summary, reference, dataset, metrics),
        )
        lines += [
            f"{dataset}: no {SUMMARY_LABELS[m]} BD-rate (not measured)."
            for m in SUMMARY_LABELS
            if m not in metrics
        ] + [""]
    lines += [
        "**Scale of the study** (from the training runs' ``run.yaml`` and the evaluated images):",
        "",
    ]
    lines += study_scale(runs_root, images) + [""]
    return "\n".join(lines)


def build(
    summary_path: str | Path,
    config_path: str | Path,
    runs_root: str | Path,
    images_path: str | Path,
    output: str | Path,
) -> list[Path]:
    analysis = read_analysis(config_path)
    summary = read_summary(summary_path, analysis.get("reference", "baseline"))
    text = answer_rst(summary, analysis, runs_root, read_images(images_path))
    atomic_write_text(Path(output), text)
    return [Path(output)]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m hpcm.analysis.answer",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--summary", required=True, help="summary.csv (hpcm.analysis.summary)")
    parser.add_argument("--config", required=True, help="YAML with the 'analysis' section")
    parser.add_argument("--runs", required=True, help="folder holding the training run folders")
    parser.add_argument("--images", required=True, help="per-image table (hpcm rd points --images)")
    parser.add_argument("--output", required=True, help="the reStructuredText file to write")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(
        lambda: build(args.summary, args.config, args.runs, args.images, args.output)
    )


if __name__ == "__main__":
    sys.exit(main())
