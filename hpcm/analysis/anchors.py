"""Published R-D anchors with provenance (``hpcm/anchors/anchors.csv``).

The table is long-format, one row per published R-D point:
``dataset, anchor, label, family, point, bpp, psnr, ms_ssim, ms_ssim_db, source_repo, commit,
file, blob_sha1, note``. ``psnr`` is RGB PSNR in dB averaged per image, ``ms_ssim`` linear, and
``ms_ssim_db = -10 log10(1 - ms_ssim)``; a metric a source does not give is empty.

Contents (see the ``note`` column for details):

- CompressAI ``results/image`` (InterDigitalInc/CompressAI): Kodak VTM, HM, BPG-444 and the
  8-bit-decoded learned baselines (bmshj2018-hyperprior, mbt2018, cheng2020-anchor, MSE models);
  CLIC 2020 professional VTM, HM, BPG-444 and the same learned baselines (float reconstructions;
  CompressAI does not say whether the CLIC valid or test split was used).
- HPCM-Base / HPCM-Large published points (lyq133/LIC-HPCM README.md and R-D_Data.md) on Kodak,
  CLIC Pro Valid and Tecnick, PSNR models and MS-SSIM models (``*-msssim``, MS-SSIM in dB only).

VTM-22.0 (the HPCM paper's anchor): no public source gives its R-D points (``VTM_22_STATUS`` says
what was searched), so this project measures it with the workflow's anchor rule and ships it as
measured anchors (per-image data in hpcm/analysis/measured/<anchor>/, hpcm.analysis.measured),
appended to this table's curves: ``vtm-22.0`` (Kodak; RGB <-> YCbCr rounded to 8 bits: the
paper's BD-rates within 0.13 / 0.21 points) and ``vtm-22.0-truncated`` (the same encoder with the
conversion truncated as compressai.utils.bench does; docs/anchors.md). ``vtm`` is
CompressAI's VTM, labelled "VTM (CompressAI; version unrecorded)": CompressAI's JSONs name no VTM
version (its issue #166 asks, unanswered), so its BD numbers are not the paper's.

Caution (measured with ``hpcm anchors bd``): on Kodak the CompressAI curves reproduce
the BD-rates of orchestration.md §4.3 and HPCM-Base/Large come out at -16.0 % / -20.0 % vs
CompressAI's VTM (paper: -15.31 % / -19.19 % vs VTM-22.0). On CLIC the CompressAI curves are
clearly not on HPCM's image set (CompressAI's VTM reaches 34.2 dB at 0.14 bpp, HPCM-Base 32.5 dB
at 0.13 bpp, i.e. +49 % "BD-rate" against a paper figure of -14.23 %): never mix the two
families in one CLIC BD number.

Dataset names: ``kodak``, ``clic2020-professional``, ``tecnick``; evaluate with the same
``--dataset-name`` so that every BD table can use any anchor of that dataset.

CLI::

    hpcm anchors list [--measured CSV ...]             # anchors per dataset with point counts
    hpcm anchors bd --dataset kodak --reference vtm [--method pchip] [--metric psnr]
        BD-rate/BD-PSNR of every other anchor of the dataset against the reference anchor.
    hpcm anchors add-compressai --json FILE --dataset kodak --anchor NAME --label TEXT
        --family classical|learned|hpcm --repo OWNER/NAME --commit SHA --file PATH [--note TEXT]
        [--transcribed]
        Append the points of a CompressAI-format JSON (``psnr-rgb``/``psnr``, ``ms-ssim-rgb``/
        ``ms-ssim``, ``ms-ssim-db-rgb``) with its git blob SHA-1 to the table (atomically).
    hpcm anchors assemble --points-dir DIR --dataset kodak --anchor vtm-22.0
        --label TEXT --images 24 --qualities 22 27 ... [--provenance-json FILE] [--output-dir D]
        Ship a measured anchor (``hpcm.analysis.measured.assemble``): the complete point files of
        a workflow run -> hpcm/analysis/measured/<anchor>/<dataset>.{csv,json}.

Measured anchors (``hpcm.analysis.measured``): the mean curves of the anchors shipped in
``hpcm/analysis/measured/`` are part of the table that ``load_anchors`` returns, and those of a
workflow's per-image CSVs with ``--measured`` / ``load_anchors(measured=...)``; ``list`` shows
how many (image, quality) pairs each holds. See docs/anchors.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import warnings
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from hpcm.analysis.bd import METHODS, bd_row
from hpcm.analysis.measured import assemble, mean_rows, shipped_csvs
from hpcm.analysis.points import read_table
from hpcm.evaluate.metrics import ms_ssim_to_db
from hpcm.util.cli import run_command
from hpcm.util.io import atomic_write_text

ANCHOR_TABLE = Path(__file__).with_name("anchors.csv")
COLUMNS = (
    "dataset",
    "anchor",
    "label",
    "family",
    "point",
    "bpp",
    "psnr",
    "ms_ssim",
    "ms_ssim_db",
    "source_repo",
    "commit",
    "file",
    "blob_sha1",
    "note",
)
METRICS = ("psnr", "ms_ssim_db")
# Where published VTM-22.0 points were looked for (at the commits in anchors.csv) and why none is
# in anchors.csv; printed by ``list`` for a dataset without a measured one.
VTM_22_STATUS = (
    "No published VTM-22.0 R-D points found. Searched: lyq133/LIC-HPCM "
    "R-D_Data.md and README.md (HPCM-Base/Large curves only; the paper's BD-rates vs VTM-22.0 come "
    "without the VTM points), InterDigitalInc/CompressAI results/image (VTM curves with no "
    "version: JSON 'description' is just 'VTM'; CompressAI issue #166 asks which version, "
    "unanswered). 'vtm' (above) is CompressAI's curve: BD numbers against it are not the paper's "
    "vs VTM-22.0. To add VTM-22.0, encode the test set with VTM-22.0 (compressai.utils.bench vtm) "
    "and append the JSON with add-compressai, recording repository, commit and file."
)


def load_anchors(
    path: str | Path = ANCHOR_TABLE, measured: Sequence[str | Path] = (), shipped: bool = True
):
    """The anchor table as a pandas DataFrame; a missing column is an error naming it.

    With ``shipped`` the mean curves of the measured anchors shipped in
    ``hpcm/analysis/measured/`` are appended, and those of the per-image CSVs in ``measured``
    (a workflow's ``results/anchors/<dataset>/<anchor>.csv``), so that every reader of the table
    sees a measured anchor like a published one (``hpcm.analysis.measured.mean_rows``).
    """
    import pandas as pd  # why: slow to import (~0.5 s); the commands that need it load it

    table = read_table(path, COLUMNS, "anchor table")
    rows = [r for csv in [*(shipped_csvs() if shipped else []), *measured] for r in mean_rows(csv)]
    if not rows:
        return table
    extra = pd.DataFrame(rows, columns=list(COLUMNS))
    per_file = extra.groupby(["dataset", "anchor"])["file"].nunique()
    twice = [key for key, n in per_file.items() if n > 1]
    if twice:
        raise ValueError(
            f"measured anchor {twice[0]} given twice (files "
            f"{sorted(set(extra.loc[extra['anchor'] == twice[0][1], 'file']))})"
        )
    clash = set(zip(extra["dataset"], extra["anchor"])) & set(
        zip(table["dataset"], table["anchor"])
    )
    if clash:
        raise ValueError(f"measured anchor(s) {sorted(clash)} also in {path}: rename one")
    return pd.concat([table, extra], ignore_index=True)


def anchor_names(dataset: str | None = None, table=None) -> list[str]:
    table = load_anchors() if table is None else table
    if dataset is not None:
        table = table[table["dataset"] == dataset]
    return sorted(table["anchor"].unique())


def anchor_curve(
    dataset: str, anchor: str, metric: str = "psnr", table=None
) -> tuple[np.ndarray, np.ndarray]:
    """(bpp, metric) of one published curve, sorted by rate."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    table = load_anchors() if table is None else table
    rows = table[(table["dataset"] == dataset) & (table["anchor"] == anchor)]
    if rows.empty:
        raise ValueError(
            f"no anchor {anchor!r} for dataset {dataset!r}; available: "
            f"{anchor_names(dataset, table) or 'none'}"
        )
    rows = rows.dropna(subset=[metric]).sort_values("bpp")
    if rows.empty:
        raise ValueError(f"anchor {anchor!r} on {dataset!r} has no {metric} values")
    return rows["bpp"].to_numpy(float), rows[metric].to_numpy(float)


def anchor_curves_by_dataset(
    anchor: str, metric: str = "psnr", table=None, datasets: Iterable[str] = ()
) -> dict[str, tuple[np.ndarray, np.ndarray] | str]:
    """Every dataset's curve of ``anchor``, or the reason it has none, as a string.

    Covers the datasets the anchor is published on plus ``datasets`` (those being compared), so a
    BD table can show an n/a row with the reason instead of silently dropping a dataset.
    """
    table = load_anchors() if table is None else table
    published = set(table.loc[table["anchor"] == anchor, "dataset"].unique())
    if not published:
        raise ValueError(f"unknown anchor {anchor!r}; available: {anchor_names(None, table)}")
    curves: dict[str, tuple[np.ndarray, np.ndarray] | str] = {}
    for dataset in sorted(published | set(datasets)):
        try:
            curves[dataset] = anchor_curve(dataset, anchor, metric, table)
        except ValueError as err:  # not on this dataset, or e.g. MS-SSIM only and PSNR asked
            curves[dataset] = str(err)
    return curves


def git_blob_sha1(data: bytes) -> str:
    """The SHA-1 git gives a file's content (``git hash-object``), to pin a source file."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _pick(results: dict, *keys: str) -> list | None:
    for key in keys:
        if key in results:
            return results[key]
    return None


def rows_from_compressai_json(
    path: str | Path,
    dataset: str,
    anchor: str,
    label: str,
    family: str,
    repo: str,
    commit: str,
    file: str,
    note: str = "",
    transcribed: bool = False,
) -> list[dict]:
    """Anchor rows from a CompressAI results JSON (any of its key spellings).

    ``transcribed``: the JSON is our transcription of the source, so its blob hash would pin
    nothing; ``blob_sha1`` is left empty and the commit + file are the provenance.
    """
    path = Path(path)
    data = path.read_bytes()
    doc = json.loads(data)
    results = doc.get("results", doc)
    bpp = _pick(results, "bpp")
    if bpp is None:
        raise ValueError(f"{path}: no 'bpp' list in results")
    psnr = _pick(results, "psnr-rgb", "psnr")
    ms_ssim = _pick(results, "ms-ssim-rgb", "ms-ssim")
    ms_ssim_db = _pick(results, "ms-ssim-db-rgb")  # already in dB: never convert twice
    for key, values in (("psnr", psnr), ("ms-ssim", ms_ssim), ("ms-ssim-db", ms_ssim_db)):
        if values is not None and len(values) != len(bpp):
            raise ValueError(f"{path}: {len(values)} {key} values but {len(bpp)} bpp values")
    rows = []
    for i, rate in enumerate(bpp):
        lin = float(ms_ssim[i]) if ms_ssim is not None else math.nan
        db = float(ms_ssim_db[i]) if ms_ssim_db is not None else (ms_ssim_to_db(lin))
        rows.append(
            {
                "dataset": dataset,
                "anchor": anchor,
                "label": label,
                "family": family,
                "point": i,
                "bpp": float(rate),
                "psnr": float(psnr[i]) if psnr is not None else math.nan,
                "ms_ssim": lin,
                "ms_ssim_db": db,
                "source_repo": repo,
                "commit": commit,
                "file": file,
                "blob_sha1": "" if transcribed else git_blob_sha1(data),
                "note": note,
            }
        )
    return rows


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def _cmd_list(args: argparse.Namespace) -> None:
    table = load_anchors(args.table, args.measured)
    summary = (
        table.groupby(["dataset", "anchor", "label"], sort=True)
        .agg(
            points=("bpp", "size"),
            source=("source_repo", "first"),
            commit=("commit", "first"),
            file=("file", "first"),
        )
        .reset_index()
    )
    print(summary.to_string(index=False))
    measured = table[table["note"].astype(str).str.startswith("measured by this project")]
    if len(measured):
        print("\nmeasured anchors (per-image data; BD intervals paired on images):")
        for (dataset, anchor), group in measured.groupby(["dataset", "anchor"], sort=True):
            print(f"  {dataset}/{anchor}: {group['note'].iloc[0]}")
    print()
    is_vtm22 = table["anchor"].astype(str).str.startswith("vtm-22.0")
    with_vtm22 = sorted(set(table.loc[is_vtm22, "dataset"]))
    without = sorted(set(table["dataset"]) - set(with_vtm22))
    if with_vtm22:
        print(
            f"VTM-22.0: measured by this project on {', '.join(with_vtm22)} (see above); 'vtm' "
            "is CompressAI's curve, version unrecorded."
        )
    if without:
        print(
            f"VTM-22.0 on {', '.join(without)}: none. {VTM_22_STATUS} Or measure it with the "
            "workflow's anchor rule (datasets.<name>.anchors, docs/anchors.md)."
        )


def _cmd_bd(args: argparse.Namespace) -> None:
    table = load_anchors(args.table, args.measured)
    ref = anchor_curve(args.dataset, args.reference, args.metric, table)
    rows = []
    for name in anchor_names(args.dataset, table):
        if name == args.reference:
            continue
        try:
            test = anchor_curve(args.dataset, name, args.metric, table)
        except ValueError:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            row = bd_row(args.dataset, name, args.reference, ref, test, args.metric, args.method)
        rows.append(row)
    for row in rows:
        print(
            f"{row.dataset:24s} {row.variant:28s} vs {row.reference}: BD-rate "
            f"{row.bd_rate:+8.2f} %  BD-{args.metric} {row.bd_psnr:+7.3f}  overlap "
            f"{row.overlap_rate * 100:5.1f} % {row.error}"
        )


def _cmd_add(args: argparse.Namespace) -> None:
    import pandas as pd  # why: slow to import (~0.5 s); the commands that need it load it

    table = (
        load_anchors(args.table, shipped=False)
        if Path(args.table).exists()
        else pd.DataFrame(columns=list(COLUMNS))
    )
    if ((table["dataset"] == args.dataset) & (table["anchor"] == args.anchor)).any():
        raise ValueError(
            f"anchor {args.anchor!r} already exists for {args.dataset!r} in {args.table}"
        )
    new = pd.DataFrame(
        rows_from_compressai_json(
            args.json,
            args.dataset,
            args.anchor,
            args.label,
            args.family,
            args.repo,
            args.commit,
            args.file,
            args.note,
            args.transcribed,
        ),
        columns=list(COLUMNS),
    )
    table = pd.concat([table, new], ignore_index=True) if len(table) else new
    atomic_write_text(args.table, table.to_csv(index=False))
    print(f"added {len(new)} point(s) of {args.dataset}/{args.anchor} to {args.table}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hpcm anchors",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--table", default=str(ANCHOR_TABLE), help="anchor table CSV")
    sub = parser.add_subparsers(dest="command", required=True)
    lister = sub.add_parser("list", help="list anchors")
    lister.set_defaults(func=_cmd_list)
    b = sub.add_parser("bd", help="BD of every anchor against a reference anchor")
    for p in (lister, b):
        p.add_argument(
            "--measured",
            nargs="*",
            default=[],
            help="per-image CSVs of measured anchors (results/anchors/D/A.csv) to "
            "add to the shipped ones",
        )
    b.add_argument("--dataset", required=True)
    b.add_argument("--reference", default="vtm")
    b.add_argument("--metric", default="psnr", choices=METRICS)
    b.add_argument("--method", default="pchip", choices=METHODS)
    b.set_defaults(func=_cmd_bd)
    a = sub.add_parser("add-compressai", help="append a CompressAI-format JSON curve")
    for flag in ("--json", "--dataset", "--anchor", "--label", "--repo", "--commit", "--file"):
        a.add_argument(flag, required=True)
    a.add_argument("--family", required=True, choices=("classical", "learned", "hpcm"))
    a.add_argument("--note", default="")
    a.add_argument(
        "--transcribed",
        action="store_true",
        help="the JSON transcribes the source file: record no blob hash",
    )
    a.set_defaults(func=_cmd_add)
    m = sub.add_parser(
        "assemble",
        help="ship a measured anchor from a workflow run's point "
        "files (only complete (image, quality) pairs)",
    )
    m.add_argument(
        "--points-dir",
        required=True,
        help="results/anchors/<dataset>/<anchor> (the point files, any depth)",
    )
    m.add_argument("--dataset", required=True)
    m.add_argument("--anchor", required=True)
    m.add_argument("--label", required=True)
    m.add_argument("--images", type=int, required=True, help="images of the full anchor")
    m.add_argument(
        "--qualities", type=int, nargs="+", required=True, help="qualities / QPs of the full anchor"
    )
    m.add_argument(
        "--provenance-json",
        help="JSON object merged into meta.provenance (tag, "
        "commit, source_repo, build commands, ...)",
    )
    m.add_argument("--output-dir", help="default: hpcm/analysis/measured/<anchor>")
    m.set_defaults(func=_cmd_assemble)
    return parser


def _cmd_assemble(args: argparse.Namespace) -> list[Path]:
    extra = json.loads(Path(args.provenance_json).read_text()) if args.provenance_json else {}
    if not isinstance(extra, dict):
        raise ValueError(f"{args.provenance_json}: expected a JSON object")
    output = args.output_dir or str(Path(ANCHOR_TABLE).with_name("measured") / args.anchor)
    return assemble(
        args.points_dir,
        args.dataset,
        args.anchor,
        output,
        args.images,
        args.qualities,
        args.label,
        extra,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(lambda: args.func(args))


if __name__ == "__main__":
    sys.exit(main())
