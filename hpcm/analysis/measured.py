"""Measured codec anchors: per-image R-D data, shipped (``hpcm/analysis/measured/``) or made by
the workflow (``results/anchors/<dataset>/<anchor>.csv``).

A measured anchor is the per-image CSV of :mod:`hpcm.evaluate.codec_anchor` (one row per
(image, quality)) plus its CompressAI-style JSON, whose ``meta.provenance`` says who measured it,
with which codec build and which commands. Shipped anchors live in
``hpcm/analysis/measured/<anchor>/<dataset>.{csv,json}``; :func:`assemble` writes them from the
point files a workflow run left (only complete (image, quality) pairs; it says how many).

What this module gives the rest of the analysis:

- :func:`mean_rows`: the anchor's mean curve as rows of the anchor table (``anchors.csv``
  columns), so ``hpcm anchors list`` / ``bd``, the BD tables and the R-D plots see a
  measured anchor like a published one. A quality enters the curve only when every image of the
  anchor has it. ``averaging="image"`` (default, CompressAI and most LIC papers) averages the
  per-image PSNR in dB; ``"pooled"`` is the PSNR of the mean MSE over images.
- :func:`anchor_intervals`: 95 % paired-bootstrap intervals of BD against the anchor as the
  reference, pairing the anchor's and a variant's per-image rows on image names
  (``hpcm.analysis.bootstrap``: same resampling scheme as the variant tables).

CLI (through ``hpcm anchors``)::

    hpcm anchors assemble --points-dir results/anchors/kodak/vtm-22.0 --dataset kodak
        --anchor vtm-22.0 --label "VTM-22.0 (measured)" --images 24 --qualities 22 27 32 37 42 47
        [--provenance-json FILE] [--output-dir hpcm/analysis/measured/vtm-22.0]
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from hpcm.analysis.bootstrap import Curve, bd_interval, resample_indices
from hpcm.evaluate.codec_anchor import (
    IMAGE_COLUMNS,
    curve_document,
    image_frame,
    provenance_of,
    read_point,
)
from hpcm.evaluate.metrics import ms_ssim_to_db
from hpcm.util.io import atomic_write_text

MEASURED_DIR = Path(__file__).with_name("measured")
AVERAGING = ("image", "pooled")
DISTORTIONS = {
    "psnr": "RGB PSNR",
    "psnr_yuv": "(6 Y + U + V) / 8 of VTM's Y, U, V PSNR",
    "psnr_yuv_vtm": "VTM's own YUV-PSNR (its totals line)",
    "psnr_y": "Y PSNR, VTM's own",
}


def read_measured(path: str | Path):
    """A per-image anchor CSV, its columns checked."""
    from hpcm.analysis.points import read_table  # why late: points imports pandas lazily too

    return read_table(
        path,
        IMAGE_COLUMNS,
        "measured anchor CSV",
        "; write it with `python -m hpcm.evaluate.codec_anchor collect`",
    )


def shipped_csvs(root: str | Path = MEASURED_DIR) -> list[Path]:
    return sorted(Path(root).glob("*/*.csv"))


def complete_qualities(rows, n_images: int | None = None) -> list[int]:
    """Qualities measured on every image of the anchor (``n_images``, default: every image in
    the rows); the others cannot give a fair mean."""
    n_images = n_images or rows["image"].nunique()
    counts = rows.groupby("quality")["image"].nunique()
    return sorted(int(q) for q, n in counts.items() if n == n_images)


def pooled_psnr(psnr_db: np.ndarray) -> float:
    """PSNR of the mean MSE of images given their PSNRs (8-bit peak): 10 log10(255^2 / mean)."""
    mse = 255.0**2 / 10.0 ** (np.asarray(psnr_db, dtype=float) / 10.0)
    return float(10.0 * np.log10(255.0**2 / mse.mean()))


def mean_curve(
    rows,
    distortion: str = "psnr",
    averaging: str = "image",
    qualities: Iterable[int] | None = None,
    n_images: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(bpp, distortion) of the complete qualities (or the given subset of them), by rate."""
    if averaging not in AVERAGING:
        raise ValueError(f"averaging must be one of {AVERAGING}, got {averaging!r}")
    if distortion not in DISTORTIONS:
        raise ValueError(f"distortion must be one of {tuple(DISTORTIONS)}, got {distortion!r}")
    keep = complete_qualities(rows, n_images)
    if qualities is not None:
        wanted = [int(q) for q in qualities]
        missing = sorted(set(wanted) - set(keep))
        if missing:
            raise ValueError(
                f"qualities {missing} are not complete in this anchor (complete: {keep})"
            )
        keep = wanted
    bpp, dist = [], []
    for quality in keep:
        group = rows[rows["quality"] == quality]
        values = group[distortion].to_numpy(float)
        if not np.all(np.isfinite(values)):
            raise ValueError(f"{distortion} is not measured for every image at quality {quality}")
        bpp.append(float(group["bpp"].mean()))
        dist.append(float(values.mean()) if averaging == "image" else pooled_psnr(values))
    order = np.argsort(bpp)
    return np.asarray(bpp)[order], np.asarray(dist)[order]


def _git_blob_sha1(data: bytes) -> str:
    import hashlib  # why late: only the shipped rows are hashed

    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def mean_rows(csv: str | Path, label: str | None = None) -> list[dict[str, Any]]:
    """The anchor-table rows (``hpcm.analysis.anchors.COLUMNS``) of one measured anchor CSV;
    its JSON beside it (same stem) gives the label and the provenance."""
    csv = Path(csv)
    rows = read_measured(csv)
    if rows.empty:
        return []
    doc_path = csv.with_suffix(".json")
    meta = json.loads(doc_path.read_text()).get("meta", {}) if doc_path.is_file() else {}
    provenance = meta.get("provenance", {})
    complete = meta.get("complete", {})
    n_expected = complete.get("expected_images")
    keep = complete_qualities(rows, n_expected)
    n_images = int(n_expected or rows["image"].nunique())
    pairs = f"{complete.get('pairs', len(rows))} of {complete.get('expected_pairs') or '?'}"
    note = (
        f"measured by this project: {provenance.get('version', '?')}; per-image CSV "
        f"{csv.name}; {pairs} (image, quality) pairs complete; {n_images} images; "
        f"qualities in the curve {keep}"
    )
    out = []
    blob = _git_blob_sha1(csv.read_bytes())
    for quality in complete_qualities(rows, n_expected):
        group = rows[rows["quality"] == quality]
        ms_ssim = float(group["ms_ssim"].mean())
        out.append(
            {
                "dataset": str(rows["dataset"].iloc[0]),
                "anchor": str(rows["anchor"].iloc[0]),
                "label": label or provenance.get("label") or str(rows["anchor"].iloc[0]),
                "family": "classical",
                "point": 0,
                "bpp": float(group["bpp"].mean()),
                "psnr": float(group["psnr"].mean()),
                "ms_ssim": ms_ssim,
                "ms_ssim_db": ms_ssim_to_db(ms_ssim),
                "source_repo": provenance.get("source_repo", "this project"),
                "commit": provenance.get("commit", ""),
                "file": str(csv),
                "blob_sha1": blob,
                "note": note,
            }
        )
    out.sort(key=lambda r: r["bpp"])
    for point, row in enumerate(out):
        row["point"] = point
    return out


def measured_image_rows(csvs: Sequence[str | Path]):
    """The per-image rows of several anchor CSVs in one frame (empty frame for none)."""
    import pandas as pd  # why: slow to import (~0.5 s); the commands that need it load it

    frames = [read_measured(c) for c in csvs]
    return (
        pd.concat(frames, ignore_index=True)
        if frames
        else pd.DataFrame(columns=list(IMAGE_COLUMNS))
    )


# --------------------------------------------------------------------------------------------
# Bootstrap intervals with the anchor as the reference
# --------------------------------------------------------------------------------------------


def anchor_curve_matrix(rows, order: list[str], metric: str) -> Curve:
    """(complete qualities, images in ``order``) per-image matrices of an anchor."""
    keep = complete_qualities(rows)
    rows = rows[rows["quality"].isin(keep)]
    column, linear = ("psnr", False) if metric == "psnr" else ("ms_ssim", True)
    bpp = rows.pivot_table(index="quality", columns="image", values="bpp")
    dist = rows.pivot_table(index="quality", columns="image", values=column)
    return Curve(bpp[order].to_numpy(float), dist[order].to_numpy(float), linear)


def anchor_intervals(
    images,
    anchor_rows,
    anchor: str,
    metric: str = "psnr",
    method: str = "pchip",
    resamples: int = 1000,
    seed: int = 0,
):
    """Interval rows (dataset, variant, n_images, rate_low, ..., invalid, note) of every variant
    of ``images`` (``hpcm rd points --images``) against the measured ``anchor``, paired on image
    names; a dataset whose image set differs from the anchor's gets NaN and a note saying so."""
    import pandas as pd  # why: slow to import (~0.5 s); the commands that need it load it

    from hpcm.analysis.bootstrap import image_curve  # why late: a sibling only this needs

    rows = []
    mine = anchor_rows[anchor_rows["anchor"] == anchor]
    for dataset in sorted(images["dataset"].unique()):
        on = images[images["dataset"] == dataset]
        ref_rows = mine[mine["dataset"] == dataset]
        names = sorted(on["image"].unique())
        note = ""
        if ref_rows.empty:
            note = f"no per-image data of anchor {anchor!r} on {dataset!r}"
        elif sorted(ref_rows["image"].unique()) != names:
            only_anchor = sorted(set(ref_rows["image"]) - set(names))
            only_test = sorted(set(names) - set(ref_rows["image"]))
            note = (
                f"anchor {anchor!r} and the variants were measured on different images "
                f"(anchor only: {only_anchor[:3]}, variants only: {only_test[:3]}); no "
                "paired interval"
            )
        for variant in sorted(on["variant"].unique()):
            row = {
                "dataset": dataset,
                "variant": variant,
                "n_images": len(names),
                "rate_low": math.nan,
                "rate_high": math.nan,
                "psnr_low": math.nan,
                "psnr_high": math.nan,
                "resamples": resamples,
                "invalid": 0,
                "note": note,
            }
            if not note:
                indices = resample_indices(len(names), resamples, seed)
                ref = anchor_curve_matrix(ref_rows, names, metric)
                test = image_curve(on, dataset, variant, metric, names)
                row.update(bd_interval(ref, test, indices, method).__dict__)
            rows.append(row)
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------------------
# Shipping a measured anchor from a workflow run's point files
# --------------------------------------------------------------------------------------------


def assemble(
    points_dir: str | Path,
    dataset: str,
    anchor: str,
    output_dir: str | Path,
    n_images: int,
    qualities: Sequence[int],
    label: str,
    provenance: dict[str, Any] | None = None,
) -> list[Path]:
    """Every complete point file under ``points_dir`` -> ``<output_dir>/<dataset>.{csv,json}``.

    ``n_images`` x ``qualities`` is what the full anchor holds: the JSON says how many of those
    pairs are complete, and a point file of another quality or dataset is an error (it would
    mix two runs).
    """
    files = sorted(Path(points_dir).rglob("*.json"))
    records, skipped = [], []
    for path in files:
        record, why = read_point(path)
        if record is None:
            skipped.append(why)
            continue
        if record["dataset"] != dataset or record["anchor"] != anchor:
            raise ValueError(
                f"{path}: point of {record['dataset']}/{record['anchor']}, not {dataset}/{anchor}"
            )
        if int(record["quality"]) not in set(map(int, qualities)):
            raise ValueError(f"{path}: quality {record['quality']} is not one of {list(qualities)}")
        records.append(record)
    if not records:
        raise ValueError(f"no complete point files under {points_dir} ({len(skipped)} skipped)")
    frame = image_frame(records)
    if frame["image"].nunique() > n_images:
        raise ValueError(
            f"{frame['image'].nunique()} images under {points_dir}, more than --images {n_images}"
        )
    expected = n_images * len(qualities)
    extra = {"label": label, **(provenance or {})}
    doc = curve_document(frame, provenance_of(frame, extra), expected, skipped, n_images)
    output_dir = Path(output_dir)
    csv, json_path = output_dir / f"{dataset}.csv", output_dir / f"{dataset}.json"
    atomic_write_text(csv, frame.to_csv(index=False))
    atomic_write_text(json_path, json.dumps(doc, indent=2) + "\n")
    print(
        f"{dataset}/{anchor}: {len(frame)} of {expected} (image, quality) pairs complete; "
        f"qualities with all {n_images} images: {doc['meta']['quality']}; incomplete: "
        f"{doc['meta']['incomplete_qualities'] or 'none'}; skipped files: {len(skipped)}"
    )
    return [csv, json_path]
