"""The R-D command: ``hpcm rd points|bd`` (R-D points, then BD tables).

CLI::

    hpcm rd points --eval-csv results/eval/*/*/*/*.csv --output results/rd/points.csv
        Reads the per-image CSVs (columns variant, lmbda, dataset, bpp, psnr, ms_ssim, ...), writes
        one row per (variant, lmbda, dataset): means over images following CompressAI (PSNR
        averaged in dB, bpp and MS-SSIM averaged per image; ms_ssim_db = -10 log10(1 - mean)),
        n_images, and provenance (source CSV, its SHA-256, checkpoint). Written atomically.
        [--images results/rd/images.csv]: also the per-image rows (one per image and training
        seed), which hpcm tables resamples for the bootstrap intervals of BD.
        [--curves-dir results/rd/curves]: also one CompressAI-format JSON per (dataset, variant)
        curve, DIR/<dataset>/<variant>.json, readable by python -m compressai.utils.plot.

    hpcm rd bd --points results/rd/points.csv --reference baseline --output bd.csv
        [--method pchip] [--metric psnr|ms_ssim_db] [--anchor kodak/vtm]
        BD-rate / BD-PSNR of every variant's curve against a variant or a published anchor
        (``hpcm.analysis.anchors``), one row per (dataset, variant) with overlap and point counts.

The work lives in ``hpcm.analysis.points`` (extraction) and ``hpcm.analysis.bd`` (Bjøntegaard).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from hpcm.analysis.anchors import anchor_curves_by_dataset
from hpcm.analysis.bd import METHODS, bd_table
from hpcm.analysis.points import curve_documents, eval_rows, image_table, rd_points, read_points
from hpcm.util.cli import run_command
from hpcm.util.io import atomic_write_text

# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def _write_csv(frame, path: str | Path) -> None:
    atomic_write_text(path, frame.to_csv(index=False))


def _cmd_points(args: argparse.Namespace) -> None:
    table = rd_points(args.eval_csv)
    _write_csv(table, args.output)
    print(f"wrote {len(table)} R-D point(s) to {args.output}")
    if args.images:
        _write_csv(image_table(eval_rows(args.eval_csv)), args.images)
        print(f"wrote the per-image, per-seed rows to {args.images}")
    if args.curves_dir:
        for (dataset, variant), doc in curve_documents(table).items():
            path = Path(args.curves_dir) / dataset / f"{variant}.json"
            atomic_write_text(path, json.dumps(doc, indent=2, allow_nan=False) + "\n")
        print(f"wrote one CompressAI-format curve per (dataset, variant) under {args.curves_dir}")


def _cmd_bd(args: argparse.Namespace) -> None:
    points = read_points(args.points)
    anchor_curves = None
    reference = args.reference
    if args.anchor:
        anchor_curves = anchor_curves_by_dataset(
            args.anchor, args.metric, datasets=points["dataset"].unique()
        )
        reference = args.anchor
    table = bd_table(points, reference, args.metric, args.method, anchor_curves)
    _write_csv(table, args.output)
    print(table.to_string(index=False))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hpcm rd", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("points", help="per-image evaluation CSVs -> long-format R-D points CSV")
    p.add_argument("--eval-csv", nargs="+", required=True, help="hpcm.evaluate per-image CSVs")
    p.add_argument("--output", required=True, help="points CSV to write (atomically)")
    p.add_argument(
        "--images",
        help="also write the per-image rows (one per image and seed) "
        "that hpcm tables resamples for its confidence intervals",
    )
    p.add_argument(
        "--curves-dir",
        help="also write DIR/<dataset>/<variant>.json curves "
        "(CompressAI format, for compressai.utils.plot)",
    )
    p.set_defaults(func=_cmd_points)
    b = sub.add_parser("bd", help="BD-rate/BD-PSNR of every variant against a reference")
    b.add_argument("--points", required=True, help="points CSV from the 'points' command")
    b.add_argument("--reference", default="baseline", help="reference variant (default baseline)")
    b.add_argument(
        "--anchor", help="published anchor name instead, e.g. 'vtm' (see hpcm anchors list)"
    )
    b.add_argument("--metric", default="psnr", choices=("psnr", "ms_ssim_db"))
    b.add_argument("--method", default="pchip", choices=METHODS)
    b.add_argument("--output", required=True, help="BD table CSV to write")
    b.set_defaults(func=_cmd_bd)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(lambda: args.func(args))


if __name__ == "__main__":
    sys.exit(main())
