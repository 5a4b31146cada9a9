"""HPCM's published Kodak BD-rates reproduced against an anchor, over the choices that move them.

The HPCM paper (ICCV 2025) reports, on Kodak against VTM-22.0, BD-rate -15.31 % (HPCM-Base) and
-19.19 % (HPCM-Large) (``PAPER``). The models' points are those of the anchor table
(``hpcm-base`` / ``hpcm-large``: lyq133/LIC-HPCM README). This module computes the same BD-rate
against any anchor of the table (``vtm-22.0`` and ``vtm-22.0-truncated``, measured by this project
with the colour conversion rounded and truncated, or CompressAI's ``vtm``) and varies one choice
at a time from the default (pchip, RGB PSNR, every complete quality, per-image averaging):

- ``method``: pchip (JVET), akima, cubic (VCEG-M33);
- ``distortion`` (measured anchors): RGB PSNR; (6 Y + U + V) / 8 of VTM's PSNRs; VTM's own
  YUV-PSNR; Y PSNR
  (the models' curves stay RGB: this asks whether the paper's anchor was on another axis);
- ``averaging`` (measured anchors): the mean of per-image PSNR; the PSNR of the mean MSE;
- ``qualities``: the anchor's points without its highest- or lowest-rate end (runs of
  consecutive points, at least 4 so that every method applies).

A measured anchor (per-image rows, ``hpcm.analysis.measured``) allows every choice; a published
curve of mean points only ``method`` and ``qualities`` (its points are numbered 0, 1, ... by rate).

CLI::

    python -m hpcm.analysis.reproduce [--reference vtm-22.0] [--dataset kodak]
        [--measured results/anchors/kodak/vtm-22.0.csv] [--markdown]
"""

from __future__ import annotations

import argparse
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from hpcm.analysis.anchors import anchor_curve, load_anchors
from hpcm.analysis.bd import METHODS, bd_metrics
from hpcm.analysis.measured import (
    AVERAGING,
    DISTORTIONS,
    complete_qualities,
    mean_curve,
    measured_image_rows,
    shipped_csvs,
)
from hpcm.util.cli import run_command

# HPCM paper, Kodak, PSNR BD-rate vs VTM-22.0 (research notes: /work/shared/research/anchors.md)
PAPER = {"hpcm-base": -15.31, "hpcm-large": -19.19}
# the measured VTM-22.0 anchor with the colour conversion rounded (hpcm/analysis/measured/vtm-22.0)
REFERENCE = "vtm-22.0"
DEFAULT = {"method": "pchip", "distortion": "psnr", "averaging": "image", "qualities": "all"}
MIN_POINTS = 4


@dataclass(frozen=True)
class Reference:
    """The anchor's curve for any choice: per-image rows when measured, else fixed points."""

    name: str
    dataset: str
    rows: object | None  # per-image frame (measured) or None (published means)
    points: tuple[np.ndarray, np.ndarray] | None = None

    @property
    def measured(self) -> bool:
        return self.rows is not None

    def qualities(self) -> list[int]:
        """Quality labels by increasing rate (point indices for a published curve)."""
        if not self.measured:
            return list(range(len(self.points[0])))
        bpp = {
            q: self.rows.loc[self.rows["quality"] == q, "bpp"].mean()
            for q in complete_qualities(self.rows)
        }
        return sorted(bpp, key=bpp.get)

    def curve(self, distortion: str, averaging: str, qualities: Sequence[int] | None):
        if not self.measured:
            if (distortion, averaging) != ("psnr", "image"):
                raise ValueError(f"{self.name} has no per-image data: only RGB PSNR, per-image")
            keep = list(range(len(self.points[0]))) if qualities is None else list(qualities)
            return self.points[0][keep], self.points[1][keep]
        return mean_curve(self.rows, distortion, averaging, qualities)


def load_reference(
    dataset: str, name: str, measured: Sequence[str | Path] = (), table=None
) -> Reference:
    rows = measured_image_rows([*shipped_csvs(), *measured])
    mine = rows[(rows["dataset"] == dataset) & (rows["anchor"] == name)] if len(rows) else rows
    if len(mine):
        return Reference(name, dataset, mine.reset_index(drop=True))
    table = load_anchors(measured=measured) if table is None else table
    return Reference(name, dataset, None, anchor_curve(dataset, name, "psnr", table))


def choices(reference: Reference) -> list[dict[str, object]]:
    """The default, then one choice changed at a time."""
    out = [dict(DEFAULT)]
    out += [{**DEFAULT, "method": m} for m in METHODS if m != DEFAULT["method"]]
    if reference.measured:
        out += [{**DEFAULT, "distortion": d} for d in DISTORTIONS if d != DEFAULT["distortion"]]
        out += [{**DEFAULT, "averaging": a} for a in AVERAGING if a != DEFAULT["averaging"]]
    order = reference.qualities()
    for drop in range(1, len(order) - MIN_POINTS + 1):
        out.append({**DEFAULT, "qualities": tuple(order[drop:])})  # without the lowest rates
        out.append({**DEFAULT, "qualities": tuple(order[:-drop])})  # without the highest rates
    return out


def reproduce(
    dataset: str = "kodak",
    reference: str = REFERENCE,
    models: Sequence[str] = tuple(PAPER),
    measured: Sequence[str | Path] = (),
    table=None,
):
    """One row per (choice, model): BD-rate against ``reference``, the paper's value and the
    difference (``ours - paper``); a choice that cannot be computed has NaN and the reason."""
    import pandas as pd  # why: slow to import (~0.5 s); the commands that need it load it

    table = load_anchors(measured=measured) if table is None else table
    ref = load_reference(dataset, reference, measured, table)
    rows = []
    for choice in choices(ref):
        subset = None if choice["qualities"] == "all" else list(choice["qualities"])
        changed = [k for k in DEFAULT if choice[k] != DEFAULT[k]]
        label = "default" if not changed else ", ".join(f"{k}={_text(choice[k])}" for k in changed)
        try:
            ref_curve = ref.curve(str(choice["distortion"]), str(choice["averaging"]), subset)
            error = ""
        except ValueError as err:
            ref_curve, error = None, str(err)
        for model in models:
            value, overlap, why = np.nan, np.nan, error
            if ref_curve is not None:
                test = anchor_curve(dataset, model, "psnr", table)
                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")  # the overlap is a column
                        result = bd_metrics(*ref_curve, *test, "rate", str(choice["method"]))
                    value, overlap = result.value, result.overlap
                except ValueError as err:
                    why = str(err)
            paper = PAPER.get(model, np.nan)
            rows.append(
                {
                    "choice": label,
                    "model": model,
                    "reference": reference,
                    "BD-rate (%)": value,
                    "paper (%)": paper,
                    "difference (points)": value - paper,
                    "overlap (%)": overlap * 100,
                    "points": len(ref_curve[0]) if ref_curve is not None else 0,
                    "error": why,
                    **{k: _text(v) for k, v in choice.items()},
                }
            )
    return pd.DataFrame(rows)


def _text(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


def to_text(frame, markdown: bool = False) -> str:
    shown = frame[
        [
            "choice",
            "model",
            "BD-rate (%)",
            "paper (%)",
            "difference (points)",
            "overlap (%)",
            "points",
            "error",
        ]
    ]
    if not markdown:
        return shown.to_string(index=False, float_format=lambda v: f"{v:+.2f}")
    lines = ["| " + " | ".join(shown.columns) + " |", "|" + "---|" * len(shown.columns)]
    for r in shown.itertuples(index=False):
        lines.append(
            "| " + " | ".join(f"{v:+.2f}" if isinstance(v, float) else str(v) for v in r) + " |"
        )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m hpcm.analysis.reproduce",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--dataset", default="kodak")
    parser.add_argument(
        "--reference",
        default=REFERENCE,
        help=f"anchor name (measured or published; default {REFERENCE}), e.g. vtm",
    )
    parser.add_argument("--models", nargs="+", default=list(PAPER))
    parser.add_argument(
        "--measured",
        nargs="*",
        default=[],
        help="per-image CSVs of measured anchors besides the shipped ones",
    )
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--csv", help="also write the table as CSV")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def action():
        frame = reproduce(args.dataset, args.reference, args.models, args.measured)
        print(to_text(frame, args.markdown))
        if args.csv:
            frame.to_csv(args.csv, index=False)
            return [Path(args.csv)]
        return None

    return run_command(action)


if __name__ == "__main__":
    sys.exit(main())
