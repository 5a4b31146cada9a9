"""R-D points: one point per (dataset, variant, lambda) from the per-image evaluation CSVs.

Training seeds: an evaluation CSV may carry a ``seed`` column (one CSV per training seed); a CSV
without one counts as a single seed. Points average each image over the seeds first.

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
    "dataset",
    "variant",
    "lmbda",
    "bpp",
    "psnr",
    "ms_ssim",
    "ms_ssim_db",
    "bpp_est",
    "n_images",
    "n_seeds",
    "encoding_time",
    "decoding_time",
    "decode_ok",
    "source_csv",
    "source_sha256",
    "checkpoint",
)
# The per-image table (one row per image and training seed) that the bootstrap resamples.
IMAGE_COLUMNS = ("dataset", "variant", "lmbda", "seed", "image", "bpp", "psnr", "ms_ssim")
SINGLE_SEED = 0  # the seed of an evaluation CSV without a `seed` column (one seed)


def eval_rows(eval_csvs: Iterable[str | Path]):
    """All per-image rows of the evaluation CSVs, with ``seed`` (``SINGLE_SEED`` where the CSV
    has none), ``source_csv`` and ``source_sha256``; one (dataset, variant, lmbda, seed) per CSV."""
    import pandas as pd  # why: slow to import (~0.5 s); the commands that need it load it

    frames = []
    seen: dict[tuple, str] = {}
    for csv_path in map(Path, eval_csvs):
        if not csv_path.is_file():
            raise FileNotFoundError(f"evaluation CSV not found: {csv_path}")
        frame = pd.read_csv(csv_path, float_precision="round_trip")
        missing = [c for c in REQUIRED_EVAL_COLUMNS if c not in frame.columns]
        if missing:
            raise ValueError(
                f"{csv_path}: missing column(s) {missing}; is it an hpcm.evaluate CSV?"
            )
        if frame.empty:
            raise ValueError(f"{csv_path}: no image rows")
        if "seed" not in frame.columns:
            frame["seed"] = SINGLE_SEED
        if frame["seed"].isna().any():
            raise ValueError(
                f"{csv_path}: empty `seed` in some rows (every row names its training seed)"
            )
        if frame["lmbda"].isna().any():
            variant = frame.loc[frame["lmbda"].isna(), "variant"].iloc[0]
            dataset = frame.loc[frame["lmbda"].isna(), "dataset"].iloc[0]
            raise ValueError(
                f"{csv_path}: empty lmbda for variant {variant!r} on {dataset!r}; an "
                "R-D point needs its lambda: evaluate again with hpcm.evaluate, which "
                "takes it from the checkpoint's labels or from --lmbda"
            )
        frame["dataset"] = frame["dataset"].astype(str)
        frame["variant"] = frame["variant"].astype(str)
        frame["lmbda"] = frame["lmbda"].astype(float)
        frame["seed"] = frame["seed"].astype(int)
        for key, group in frame.groupby([*POINT_KEYS, "seed"], sort=True):
            refuse_nonfinite(csv_path, key, group)
            if key in seen:
                raise ValueError(
                    f"point (dataset={key[0]}, variant={key[1]}, lmbda={key[2]}, "
                    f"seed={key[3]}) appears in both {seen[key]} and {csv_path}"
                )
            seen[key] = str(csv_path)
        frame["source_csv"] = str(csv_path)
        frame["source_sha256"] = sha256_file(csv_path)
        frames.append(frame)
    if not frames:
        raise ValueError("no evaluation CSVs given")
    return pd.concat(frames, ignore_index=True)


def image_table(rows):
    """Per-image rows (``IMAGE_COLUMNS``) of ``eval_rows``; an image evaluated twice for the same
    seed is an error."""
    table = rows[list(IMAGE_COLUMNS)]
    dup = table.duplicated(subset=[*POINT_KEYS, "seed", "image"])
    if dup.any():
        r = table[dup].iloc[0]
        raise ValueError(
            f"image {r['image']!r} appears twice for (dataset={r['dataset']}, "
            f"variant={r['variant']}, lmbda={r['lmbda']}, seed={r['seed']})"
        )
    return table.sort_values([*POINT_KEYS, "seed", "image"], kind="stable").reset_index(drop=True)


def rd_points(eval_csvs: Iterable[str | Path]):
    """One R-D point per (dataset, variant, lmbda) from per-image evaluation CSVs.

    Returns a pandas DataFrame with ``POINT_COLUMNS``. Means follow CompressAI: per-image PSNR
    averaged in dB, bpp and linear MS-SSIM averaged over images. With several training seeds
    (a ``seed`` column; one CSV per seed), each image's values are first averaged over the
    seeds, which must all have been evaluated on the same images; ``n_seeds`` counts them.
    """
    import pandas as pd  # why: slow to import (~0.5 s); the commands that need it load it

    rows = eval_rows(eval_csvs)
    image_table(rows)  # duplicate check
    points = []
    for key, group in rows.groupby(list(POINT_KEYS), sort=True):
        key = (str(key[0]), str(key[1]), float(key[2]))
        image_sets = {seed: frozenset(g["image"]) for seed, g in group.groupby("seed")}
        if len(set(image_sets.values())) > 1:
            raise ValueError(
                f"point (dataset={key[0]}, variant={key[1]}, lmbda={key[2]}): the seeds were "
                f"evaluated on different images ({ {s: len(v) for s, v in image_sets.items()} } "
                "images per seed); evaluate every seed on the same set"
            )
        per_image = group.groupby("image").mean(numeric_only=True)
        ms_ssim = float(per_image["ms_ssim"].mean())
        points.append(
            {
                "dataset": key[0],
                "variant": key[1],
                "lmbda": key[2],
                "bpp": float(per_image["bpp"].mean()),
                "psnr": float(per_image["psnr"].mean()),
                "ms_ssim": ms_ssim,
                "ms_ssim_db": ms_ssim_to_db(ms_ssim),
                "bpp_est": float(per_image["bpp_est"].mean())
                if "bpp_est" in per_image
                else math.nan,
                "n_images": int(len(per_image)),
                "n_seeds": int(len(image_sets)),
                "encoding_time": _optional_mean(group, "enc_time"),
                "decoding_time": _optional_mean(group, "dec_time"),
                "decode_ok": bool(group["decode_ok"].astype(bool).all())
                if "decode_ok" in group
                else math.nan,
                "source_csv": ";".join(dict.fromkeys(group["source_csv"])),
                "source_sha256": ";".join(dict.fromkeys(group["source_sha256"])),
                "checkpoint": ";".join(dict.fromkeys(group["checkpoint"].astype(str)))
                if "checkpoint" in group
                else "",
            }
        )
    table = pd.DataFrame(points, columns=list(POINT_COLUMNS))
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
            raise ValueError(
                f"{csv_path}: image {image!r} has {column} = {values[bad][0]!r} in the point "
                f"(dataset={key[0]}, variant={key[1]}, lmbda={key[2]}); a mean over the other "
                f"{int((~bad).sum())} of {len(values)} image(s) would not be this point. "
                "Re-evaluate the checkpoint or remove the image from the dataset"
            )


def seed_points(rows):
    """One R-D point per (dataset, variant, lmbda, seed): the means over images of each seed
    alone (for the seed-to-seed spread of BD)."""
    return (
        rows.groupby([*POINT_KEYS, "seed"], sort=True)[["bpp", "psnr", "ms_ssim"]]
        .mean()
        .reset_index()
        .assign(ms_ssim_db=lambda f: f["ms_ssim"].map(ms_ssim_to_db))
    )


def _optional_mean(group, column: str) -> float:
    return float(group[column].mean()) if column in group else math.nan


def read_table(
    path: str | Path, columns, what: str, hint: str = "", error: type[Exception] = ValueError
):
    """A CSV table of the analysis (floats read back exactly), checking it exists and has
    ``columns``;
    ``what`` names the table and ``hint`` says how to write it in the error."""
    import pandas as pd  # why: slow to import (~0.5 s); the commands that need it load it

    path = Path(path)
    if not path.is_file():
        raise (FileNotFoundError if error is ValueError else error)(f"{what} not found: {path}")
    table = pd.read_csv(path, float_precision="round_trip")
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise error(f"{path}: missing column(s) {missing}{hint}")
    return table


def read_points(path: str | Path):
    """Read a points table written by ``rd_points``/the ``points`` CLI, checking its columns."""
    return read_table(path, ("dataset", "variant", "lmbda", "bpp", "psnr"), "R-D points file")


def curve(
    points, dataset: str, variant: str, metric: str = "psnr"
) -> tuple[np.ndarray, np.ndarray]:
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
        results = {
            "bpp": group["bpp"],
            "psnr-rgb": group["psnr"],
            "ms-ssim-rgb": group["ms_ssim"],
            "encoding_time": group["encoding_time"],
            "decoding_time": group["decoding_time"],
        }
        docs[(dataset, variant)] = {
            "name": variant,
            "description": f"hpcm.evaluate on {dataset} (real bitstreams)",
            "results": {k: v.tolist() for k, v in results.items() if not v.isna().any()},
            "meta": {
                "dataset": dataset,
                "lmbda": group["lmbda"].tolist(),
                "n_images": group["n_images"].tolist(),
                "not_measured": [k for k, v in results.items() if v.isna().any()],
            },
        }
    return docs
