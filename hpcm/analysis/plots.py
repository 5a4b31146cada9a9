"""Figures (PNG + PDF, matplotlib Agg): R-D curves, task weights, scale contributions, γ schedules,
training curves. One colour per variant everywhere (``variant_colors``: assigned in the order of a
variant list, so no two variants share a colour); each anchor is grey with its own dash pattern and
marker.

CLI::

    hpcm plots all --points results/rd/points.csv --runs results/train
        --output-dir results/plots [--anchors vtm hm ...] [--metric psnr|ms_ssim_db]
        [--variants baseline phase1 ...]
    hpcm plots rd --points P --output-dir D [--anchors ...] [--metric ...]
        rd_<dataset>_<metric>.{png,pdf}: every variant's measured curve (solid, markers) and the
        published anchors of that dataset (dashed).
    hpcm plots runs --runs R --output-dir D
        training_lmbda<λ>.{png,pdf}: training loss (line) and validation loss (dots) vs step,
        one colour per variant; task_weights_<variant>_lmbda<λ>: FAMO task weights vs step
        (balanced runs); scale_contributions_<variant>_lmbda<λ>: Phase-3 s1/s2/s3 shares.
    hpcm plots gammas --output-dir D [--total-epochs 3000]
        gamma_schedules.{png,pdf}: the per-scale γ of every ScaleGammaManager strategy (the
        seed's visualize_gamma_schedules); the adaptive strategy is driven by a synthetic
        decaying, noisy scale loss (it reacts to losses, so it has no loss-free curve).

Colours: ``--variants`` lists every variant in a fixed order (the workflow config's order); the
i-th gets the i-th colour of a fixed palette, so separate calls colour a variant the same way.
Without it, the variants one call sees are sorted by name. Run folders (anything with
``metrics.csv``) are found recursively; variant and λ come from ``run.yaml``. Every file is
written atomically.
"""

from __future__ import annotations

import argparse
import io
import itertools
import sys
from pathlib import Path
from typing import Iterable, Sequence

import matplotlib

matplotlib.use("Agg")  # no display on cluster nodes and CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from hpcm.analysis.anchors import anchor_curve, load_anchors  # noqa: E402
from hpcm.analysis.points import read_points  # noqa: E402
from hpcm.analysis.runs import find_runs  # noqa: E402
from hpcm.config.tasks import SCALES, SEED_TASK_NAMES  # noqa: E402
from hpcm.train.schedules import GAMMA_STRATEGIES, ScaleGammaManager  # noqa: E402
from hpcm.util.cli import run_command  # noqa: E402
from hpcm.util.io import atomic_write_bytes  # noqa: E402

SCALE_COLORS = dict(zip(SCALES, ("#1f77b4", "#ff7f0e", "#2ca02c")))
METRIC_LABELS = {"psnr": "PSNR (dB)", "ms_ssim_db": "MS-SSIM (dB)"}
ANCHOR_COLOR = "0.55"
# Anchors are all grey; each gets its own (dash pattern, marker) pair, in the order asked for.
ANCHOR_STYLES = [
    (line, marker) for marker in ("s", "^", "D", "v", "P", "X") for line in ("--", "-.", ":")
]


def _palette() -> list[str]:
    """Distinct, non-grey colours: tab10, then the light tab20 tones, then Dark2 and Set1."""
    grey = {"#7f7f7f", "#c7c7c7", "#666666", "#999999"}
    colors = (
        list(plt.get_cmap("tab10").colors)
        + list(plt.get_cmap("tab20").colors[1::2])
        + list(plt.get_cmap("Dark2").colors)
        + list(plt.get_cmap("Set1").colors)
    )
    hexes = [matplotlib.colors.to_hex(c) for c in colors]
    return [c for c in dict.fromkeys(hexes) if c not in grey]


def variant_colors(variants: Sequence[str]) -> dict[str, str]:
    """Variant -> colour: the i-th distinct name of ``variants`` gets the i-th palette colour.

    Deterministic in the list, so passing the same ordered list (the config's variants) to every
    figure gives a variant the same colour everywhere, and no two variants share one.
    """
    names = list(dict.fromkeys(variants))
    palette = _palette()
    if len(names) > len(palette):  # more variants than curated colours: evenly spaced hues
        extra = len(names) - len(palette)
        palette += [matplotlib.colors.to_hex(plt.get_cmap("hsv")(i / extra)) for i in range(extra)]
    return dict(zip(names, palette))


def _colors_for(colors: dict[str, str] | None, variants: Iterable[str]) -> dict[str, str]:
    variants = list(variants)
    if colors is None:
        return variant_colors(sorted(set(variants)))
    unknown = sorted(set(variants) - set(colors))
    if unknown:
        raise ValueError(f"variant(s) {unknown} missing from the --variants list {list(colors)}")
    return colors


def save_figure(fig, output_dir: str | Path, stem: str) -> list[Path]:
    output_dir = Path(output_dir)
    paths = []
    for ext in ("png", "pdf"):
        buffer = io.BytesIO()
        fig.savefig(buffer, format=ext, dpi=150, bbox_inches="tight")
        path = output_dir / f"{stem}.{ext}"
        atomic_write_bytes(path, buffer.getvalue())
        paths.append(path)
    plt.close(fig)
    return paths


# --------------------------------------------------------------------------------------------
# R-D curves
# --------------------------------------------------------------------------------------------


REFERENCE_COLOR = "black"


def plot_rd(
    points,
    output_dir: str | Path,
    anchors: Sequence[str] = (),
    metric: str = "psnr",
    colors: dict[str, str] | None = None,
    reference: str | None = None,
    measured: Sequence[str | Path] = (),
) -> list[Path]:
    """One figure per dataset (``measured``: per-image CSVs of measured anchors besides the
    shipped ones, see hpcm.analysis.measured). The reference variant (every BD is measured
    against it) is a thick black line under the others; anchors are grey and dashed; the legend
    sits outside the axes so that it never covers a curve."""
    table = load_anchors(measured=measured) if anchors else None
    colors = _colors_for(colors, points["variant"].unique())
    anchor_styles = dict(zip(dict.fromkeys(anchors), itertools.cycle(ANCHOR_STYLES)))
    written = []
    for dataset in sorted(points["dataset"].unique()):
        fig, ax = plt.subplots(figsize=(9.0, 4.8))
        sel = points[points["dataset"] == dataset]
        for variant in sorted(sel["variant"].unique()):
            cur = sel[sel["variant"] == variant].sort_values("bpp")
            if variant == reference:
                ax.plot(
                    cur["bpp"],
                    cur[metric],
                    "-s",
                    color=REFERENCE_COLOR,
                    linewidth=3.0,
                    markersize=7,
                    alpha=0.45,
                    zorder=1,
                    label=f"{variant} (reference)",
                )
            else:
                ax.plot(
                    cur["bpp"],
                    cur[metric],
                    "-o",
                    color=colors[variant],
                    label=variant,
                    markersize=4,
                    linewidth=1.2,
                    zorder=2,
                )
        for name in anchors:
            try:
                bpp, values = anchor_curve(dataset, name, metric, table)
            except ValueError:
                continue  # this dataset has no such published curve
            rows = table[(table["anchor"] == name) & (table["dataset"] == dataset)]
            label = rows["label"].iloc[0]
            measured_here = str(rows["note"].iloc[0]).startswith("measured by")
            kind = "measured" if measured_here else "published"
            linestyle, marker = anchor_styles[name]
            ax.plot(
                bpp,
                values,
                linestyle=linestyle,
                marker=marker,
                color=ANCHOR_COLOR,
                linewidth=1,
                markersize=3,
                label=f"{label} ({kind})",
            )
        ax.set_xscale("log")  # BD integrates over log-rate: the axis it is computed on
        ax.set_xlabel("Rate (bpp, log scale)")
        ax.set_ylabel(METRIC_LABELS[metric])
        ax.set_title(f"Rate-distortion on {dataset}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
        fig.tight_layout()
        written += save_figure(fig, output_dir, f"rd_{dataset}_{metric}")
    return written


# --------------------------------------------------------------------------------------------
# Training runs
# --------------------------------------------------------------------------------------------


def iter_runs(root: str | Path) -> Iterable[tuple[str, float, object]]:
    """(variant, lmbda, metrics DataFrame) of every run folder under ``root``
    (``hpcm.analysis.runs``)."""
    import pandas as pd  # why: slow to import, only the run figures need it

    for run in find_runs(root):
        frame = pd.read_csv(run.metrics_csv)
        if "step" not in frame.columns:
            raise ValueError(f"{run.metrics_csv}: no 'step' column")
        yield run.variant, run.lmbda, frame


def _lines(ax, frame, columns: Sequence[str], labels: Sequence[str], colors=None) -> bool:
    drew = False
    for i, (column, label) in enumerate(zip(columns, labels)):
        if column not in frame.columns:
            continue
        rows = frame.dropna(subset=[column])
        if rows.empty:
            continue
        ax.plot(rows["step"], rows[column], label=label, color=colors[i] if colors else None)
        drew = True
    return drew


TASK_COLUMNS = {
    2: (("task_weight_distortion", "task_weight_bpp"), ("distortion", "bpp")),
    5: (
        tuple(f"task_weight_{t}" for t in SEED_TASK_NAMES),
        tuple(t.replace("_", " ") for t in SEED_TASK_NAMES),
    ),
}


def plot_runs(
    runs: Sequence[tuple[str, float, object]],
    output_dir: str | Path,
    colors: dict[str, str] | None = None,
) -> list[Path]:
    """The per-run and per-λ training figures of ``runs``, the list ``iter_runs`` yields."""
    written = []
    by_lambda: dict[float, list] = {}
    colors = _colors_for(colors, (variant for variant, _, _ in runs))
    for variant, lmbda, frame in runs:
        by_lambda.setdefault(lmbda, []).append((variant, frame))
        for n_tasks, (columns, labels) in TASK_COLUMNS.items():
            fig, ax = plt.subplots(figsize=(6.4, 4))
            if _lines(ax, frame, columns, labels):
                ax.set_xlabel("training step")
                ax.set_ylabel("task weight (softmax, sums to 1)")
                ax.set_title(f"Task weights: {variant}, λ={lmbda:g}")
                ax.grid(alpha=0.3)
                ax.legend(fontsize=8)
                suffix = "" if n_tasks == 2 else "_scales"
                written += save_figure(
                    fig, output_dir, f"task_weights{suffix}_{variant}_lmbda{lmbda:g}"
                )
            else:
                plt.close(fig)
        fig, ax = plt.subplots(figsize=(6.4, 4))
        if _lines(
            ax,
            frame,
            [f"scale_contribution_{s}" for s in SCALES],
            SCALES,
            [SCALE_COLORS[s] for s in SCALES],
        ):
            ax.set_xlabel("training step")
            ax.set_ylabel("scale contribution (share of the weighted loss)")
            ax.set_title(f"Phase 3 scale contributions: {variant}, λ={lmbda:g}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
            written += save_figure(fig, output_dir, f"scale_contributions_{variant}_lmbda{lmbda:g}")
        else:
            plt.close(fig)
    for lmbda, runs in sorted(by_lambda.items()):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for variant, frame in sorted(runs, key=lambda r: r[0]):
            color = colors[variant]
            if "loss" in frame.columns:
                train = frame.dropna(subset=["loss"])
                ax.plot(
                    train["step"], train["loss"], color=color, label=f"{variant} train", linewidth=1
                )
            if "val_loss" in frame.columns:
                val = frame.dropna(subset=["val_loss"])
                ax.plot(
                    val["step"],
                    val["val_loss"],
                    "o",
                    color=color,
                    markersize=4,
                    label=f"{variant} val",
                )
        ax.set_xlabel("training step")
        ax.set_ylabel("loss = λ·255²·MSE + bpp")
        ax.set_yscale("log")
        ax.set_title(f"Training curves, λ={lmbda:g}")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7, ncol=2)
        written += save_figure(fig, output_dir, f"training_lmbda{lmbda:g}")
    return written


# --------------------------------------------------------------------------------------------
# γ schedules
# --------------------------------------------------------------------------------------------


def gamma_trajectories(
    total_epochs: int = 3000, seed: int = 0, initial_gammas: Sequence[float] | None = None
) -> dict[str, np.ndarray]:
    """strategy -> (epochs, 3) gammas of s1, s2, s3 (``hpcm.train.schedules.ScaleGammaManager``)."""
    rng = np.random.default_rng(seed)
    epochs = np.arange(total_epochs + 1)
    # Synthetic scale losses for 'adaptive': decaying, noisier early (it only reacts to losses).
    decay = np.exp(-epochs / (0.3 * total_epochs))
    noise = rng.normal(0.0, 1.0, (epochs.size, 3)) * (0.003 + 0.08 * decay)[:, None]
    losses = (1.0 + decay)[:, None] * np.array([1.0, 0.8, 0.6]) * (1 + noise)
    out = {}
    for strategy in GAMMA_STRATEGIES:
        manager = ScaleGammaManager(
            strategy=strategy, total_epochs=total_epochs, initial_gammas=initial_gammas
        )
        values = []
        for i, epoch in enumerate(epochs):
            scale_losses = dict(zip(SCALES, losses[i])) if strategy == "adaptive" else None
            gammas = manager.step(float(epoch), scale_losses)
            values.append([gammas[s] for s in SCALES])
        out[strategy] = np.asarray(values)
    return out


def plot_gammas(
    output_dir: str | Path, total_epochs: int = 3000, initial_gammas: Sequence[float] | None = None
) -> list[Path]:
    trajectories = gamma_trajectories(total_epochs, initial_gammas=initial_gammas)
    # The title states the γs the curves start from, as the manager resolved them.
    start = ScaleGammaManager(
        strategy="fixed", total_epochs=total_epochs, initial_gammas=initial_gammas
    ).initial_gammas
    fig, axes = plt.subplots(
        1, len(trajectories), figsize=(4 * len(trajectories), 3.6), sharey=True
    )
    epochs = np.arange(total_epochs + 1)
    for ax, (strategy, values) in zip(np.atleast_1d(axes), trajectories.items()):
        for k, scale in enumerate(SCALES):
            ax.plot(epochs, values[:, k], color=SCALE_COLORS[scale], label=scale)
        ax.set_title(strategy + (" (synthetic losses)" if strategy == "adaptive" else ""))
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    np.atleast_1d(axes)[0].set_ylabel("γ (task-weight regularisation)")
    np.atleast_1d(axes)[0].legend(fontsize=8)
    fig.suptitle(
        "ScaleGammaManager γ schedules per strategy (initial γ s1/s2/s3 = "
        + " / ".join(f"{start[s]:g}" for s in SCALES)
        + ")",
        y=1.04,
    )
    return save_figure(fig, output_dir, "gamma_schedules")


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hpcm plots", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    commands = {name: sub.add_parser(name) for name in ("all", "rd", "runs", "gammas")}
    for name, p in commands.items():
        p.add_argument("--output-dir", required=True)
        if name in ("all", "rd"):
            p.add_argument(
                "--reference",
                help="the variant every BD is measured against: drawn "
                "as a thick black line (default: none)",
            )
        if name in ("all", "rd", "runs"):
            p.add_argument(
                "--variants",
                nargs="+",
                help="every variant in a fixed order (the config's): colour i goes to "
                "the i-th, the same in every call (default: sorted names seen)",
            )
        if name in ("all", "rd"):
            p.add_argument("--points", required=True, help="R-D points CSV (hpcm rd points)")
            p.add_argument("--anchors", nargs="*", default=[], help="anchors to draw")
            p.add_argument(
                "--measured",
                nargs="*",
                default=[],
                help="per-image CSVs of measured anchors (results/anchors/D/A.csv)",
            )
            p.add_argument("--metric", default="psnr", choices=tuple(METRIC_LABELS))
        if name in ("all", "runs"):
            p.add_argument("--runs", required=True, help="folder holding the run folders")
        if name in ("all", "gammas"):
            p.add_argument("--total-epochs", type=int, default=3000)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(lambda: _draw(args), errors=(ValueError, OSError, KeyError))


def _draw(args: argparse.Namespace) -> list[Path]:
    written: list[Path] = []
    colors = variant_colors(args.variants) if getattr(args, "variants", None) else None
    points = runs = None
    if args.command in ("all", "rd"):
        points = read_points(args.points)
    if args.command in ("all", "runs"):
        runs = list(iter_runs(args.runs))  # read once: the colours and the figures share it
    if args.command == "all" and colors is None:  # one call: one assignment for all figures
        seen = set(points["variant"]) | {variant for variant, _, _ in runs}
        colors = variant_colors(sorted(seen))
    if points is not None:
        written += plot_rd(
            points,
            args.output_dir,
            args.anchors,
            args.metric,
            colors,
            getattr(args, "reference", None),
            args.measured,
        )
    if runs is not None:
        written += plot_runs(runs, args.output_dir, colors)
    if args.command in ("all", "gammas"):
        written += plot_gammas(args.output_dir, args.total_epochs)
    return written


if __name__ == "__main__":
    sys.exit(main())
