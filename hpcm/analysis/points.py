"""R-D points: one point per (dataset, variant, lambda) from the per-image evaluation CSVs.

Means follow CompressAI: per-image PSNR averaged in dB, bpp and linear MS-SSIM averaged over
images (``ms_ssim_db = -10 log10(1 - mean)``), with ``n_images`` and provenance (source CSV, its
SHA-256, checkpoint). ``curve`` reads one (dataset, variant) curve back; ``curve_documents`` turns
the table into CompressAI-format JSON curves.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable

import numpy as np

from hpcm.evaluate.metrics import ms_ssim_to_db
from hpcm.util.io import sha256_file

POINT_KEYS = ("dataset", "variant", "lmbda")
REQUIRED_EVAL_COLUMNS = ("variant", "lmbda", "dataset", "image", "bpp", "psnr", "ms_ssim")
POINT_COLUMNS = (
    "dataset", "variant", "lmbda", "bpp", "psnr", "ms_ssim", "ms_ssim_db", "bpp_est",
    "n_images", "encoding_time", "decoding_time", "decode_ok", "source_csv", "source_sha256",
    "checkpoint",
)


def rd_points(eval_csvs: Iterable[str | Path]):
    """One R-D point per (dataset, variant, lmbda) from per-image evaluation CSVs.

    Returns a pandas DataFrame with ``POINT_COLUMNS``. Means follow CompressAI: per-image PSNR
    averaged in dB, bpp and linear MS-SSIM averaged over images.
    """
    import pandas as pd  # why: slow to import (~0.5 s); the commands that need it load it

    rows = []
    seen: dict[tuple, str] = {}
    for csv_path in map(Path, eval_csvs):
        if not csv_path.is_file():
            raise FileNotFoundError(f"evaluation CSV not found: {csv_path}")
        frame = pd.read_csv(csv_path, float_precision="round_trip")
        missing = [c for c in REQUIRED_EVAL_COLUMNS if c not in frame.columns]
        if missing:
            raise ValueError(f"{csv_path}: missing column(s) {missing}; is it an hpcm.evaluate CSV?")
        if frame.empty:
            raise ValueError(f"{csv_path}: no image rows")
        digest = sha256_file(csv_path)
        for key, group in frame.groupby(list(POINT_KEYS), sort=True, dropna=False):
            key = (str(key[0]), str(key[1]), float(key[2]))
            if math.isnan(key[2]):
                raise ValueError(f"{csv_path}: empty lmbda for variant {key[1]!r} on {key[0]!r} "
                                 "(evaluated without a run.yaml beside the checkpoint?); an R-D "
                                 "point needs its lambda")
            if key in seen:
                raise ValueError(f"point (dataset={key[0]}, variant={key[1]}, lmbda={key[2]}) "
                                 f"appears in both {seen[key]} and {csv_path}")
            seen[key] = str(csv_path)
            refuse_nonfinite(csv_path, key, group)
            ms_ssim = float(group["ms_ssim"].mean())
            rows.append({
                "dataset": key[0], "variant": key[1], "lmbda": key[2],
                "bpp": float(group["bpp"].mean()),
                "psnr": float(group["psnr"].mean()),
                "ms_ssim": ms_ssim,
                "ms_ssim_db": ms_ssim_to_db(ms_ssim),
                "bpp_est": float(group["bpp_est"].mean()) if "bpp_est" in group else math.nan,
                "n_images": int(group["image"].nunique()),
                "encoding_time": _optional_mean(group, "enc_time"),
                "decoding_time": _optional_mean(group, "dec_time"),
                "decode_ok": bool(group["decode_ok"].astype(bool).all())
                if "decode_ok" in group else math.nan,
                "source_csv": str(csv_path),
                "source_sha256": digest,
                "checkpoint": str(group["checkpoint"].iloc[0]) if "checkpoint" in group else "",
            })
    if not rows:
        raise ValueError("no evaluation CSVs given")
    table = pd.DataFrame(rows, columns=list(POINT_COLUMNS))
    return table.sort_values(list(POINT_KEYS), kind="stable").reset_index(drop=True)


def refuse_nonfinite(csv_path: Path, key: tuple, group) -> None:
    """No silent averages over missing values: every image of a point has a finite bpp and PSNR
    (and bpp_est when present); MS-SSIM is finite for all images or for none (images under 161 px
    have none, and the point then has none)."""
    for column in ("bpp", "psnr", "bpp_est", "ms_ssim"):
        if column not in group:
            continue
        values = group[column].to_numpy(dtype=float)
        bad = ~np.isfinite(values)
        if column == "ms_ssim" and bad.all():
            continue
        if bad.any():
            image = group["image"].iloc[int(np.argmax(bad))]
            raise ValueError(f"{csv_path}: image {image!r} has {column} = {values[bad][0]!r} in the point "
                             f"(dataset={key[0]}, variant={key[1]}, lmbda={key[2]}); a mean over the other "
                             f"{int((~bad).sum())} of {len(values)} image(s) would not be this point. Re-evaluate "
                             "the checkpoint or remove the image from the dataset")


def _optional_mean(group, column: str) -> float:
    return float(group[column].mean()) if column in group else math.nan


def read_points(path: str | Path):
    """Read a points table written by ``rd_points``/the ``points`` CLI, checking its columns."""
    import pandas as pd  # why: slow to import (~0.5 s); the commands that need it load it

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"R-D points file not found: {path}")
    table = pd.read_csv(path, float_precision="round_trip")
    missing = [c for c in ("dataset", "variant", "lmbda", "bpp", "psnr") if c not in table.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}")
    return table


def curve(points, dataset: str, variant: str, metric: str = "psnr") -> tuple[np.ndarray, np.ndarray]:
    """(bpp, metric) of one (dataset, variant), sorted by rate."""
    sel = points[(points["dataset"] == dataset) & (points["variant"] == variant)]
    sel = sel.sort_values("bpp")
    return sel["bpp"].to_numpy(float), sel[metric].to_numpy(float)


def curve_documents(points) -> dict[tuple[str, str], dict]:
    """(dataset, variant) -> CompressAI-format JSON document of that curve, sorted by rate.

    Strict JSON: a metric with any unmeasured (NaN) point is left out of ``results`` and named in
    ``meta.not_measured`` (CompressAI's plot reads neither NaN nor null in a curve).
    """
    docs = {}
    for (dataset, variant), group in points.groupby(["dataset", "variant"], sort=True):
        group = group.sort_values("bpp")
        results = {"bpp": group["bpp"], "psnr-rgb": group["psnr"], "ms-ssim-rgb": group["ms_ssim"],
                   "encoding_time": group["encoding_time"],
                   "decoding_time": group["decoding_time"]}
        docs[(dataset, variant)] = {
            "name": variant,
            "description": f"hpcm.evaluate on {dataset} (real bitstreams)",
            "results": {k: v.tolist() for k, v in results.items() if not v.isna().any()},
            "meta": {"dataset": dataset, "lmbda": group["lmbda"].tolist(),
                     "n_images": group["n_images"].tolist(),
                     "not_measured": [k for k, v in results.items() if v.isna().any()]},
        }
    return docs
