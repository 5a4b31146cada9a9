"""R-D points over training seeds, and the tables' bootstrap-interval and seed-spread columns,
on a small synthetic study (per-image eval CSVs written here, values chosen by hand)."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from hpcm.analysis import bootstrap, points, rd, tables
from tests.analysis.test_tables import _write_run

LAMBDAS = (0.0004, 0.0932)
IMAGES = [f"im{i}.png" for i in range(6)]
RNG = np.random.default_rng(0)
# per-image (L, n) matrices of the reference; "better" saves ~20 % rate at equal PSNR
BASE_BPP = np.array([[0.10], [0.50]]) * RNG.lognormal(0, 0.2, size=(1, 6))
BASE_PSNR = np.array([[22.0], [27.0]]) + RNG.normal(0, 1.0, size=(1, 6))


def _write_eval(root: Path, variant: str, lmbda_index: int, bpp, psnr, seed: int | None) -> Path:
    name = f"lmbda{LAMBDAS[lmbda_index]}" + ("" if seed is None else f"/seed{seed}")
    path = root / "eval" / "samples" / variant / f"{name}.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            ["image", "variant", "lmbda", "dataset", "bpp", "psnr", "ms_ssim"]
            + ([] if seed is None else ["seed"])
        )
        for image, b, p in zip(IMAGES, bpp, psnr):
            writer.writerow(
                [image, variant, LAMBDAS[lmbda_index], "samples", b, p, 0.95]
                + ([] if seed is None else [seed])
            )
    return path


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("unc")
    csvs = []
    for li in range(2):
        csvs.append(_write_eval(root, "baseline", li, BASE_BPP[li], BASE_PSNR[li], None))
        for seed, factor in ((0, 0.78), (1, 0.82)):  # two seeds of a clearly better variant
            csvs.append(_write_eval(root, "better", li, BASE_BPP[li] * factor, BASE_PSNR[li], seed))
        csvs.append(
            _write_eval(
                root, "same", li, BASE_BPP[li] * (1 + 0.01 * (li - 0.5)), BASE_PSNR[li] + 0.01, None
            )
        )
    for i, lmbda in enumerate(LAMBDAS):
        for variant in ("baseline", "better", "same"):
            _write_run(root / "train", variant, lmbda, i)
    assert (
        rd.main(
            [
                "points",
                "--eval-csv",
                *map(str, csvs),
                "--output",
                str(root / "points.csv"),
                "--images",
                str(root / "images.csv"),
            ]
        )
        == 0
    )
    analysis = {
        "reference": "baseline",
        "bd_method": "pchip",
        "anchors": [],
        "gains": {"better": "better", "same": "same"},
        "studies": {"s": {"title": "S", "rows": {"b": "better", "ref": "baseline"}}},
    }
    (root / "config.yaml").write_text(yaml.safe_dump({"analysis": analysis}))
    assert (
        tables.main(
            [
                "--points",
                str(root / "points.csv"),
                "--runs",
                str(root / "train"),
                "--config",
                str(root / "config.yaml"),
                "--output-dir",
                str(root / "tables"),
                "--images",
                str(root / "images.csv"),
                "--resamples",
                "1000",
            ]
        )
        == 0
    )
    return root


def test_points_average_each_image_over_seeds(study):
    table = pd.read_csv(study / "points.csv").set_index(["variant", "lmbda"])
    better = table.loc[("better", LAMBDAS[0])]
    assert better["n_seeds"] == 2 and better["n_images"] == 6
    assert better["bpp"] == pytest.approx(np.mean(BASE_BPP[0] * 0.8), rel=1e-12)
    assert table.loc[("baseline", LAMBDAS[0]), "n_seeds"] == 1  # no seed column: one seed
    images = pd.read_csv(study / "images.csv")
    assert list(images.columns) == list(points.IMAGE_COLUMNS)
    assert len(images[(images["variant"] == "better")]) == 2 * 2 * 6


def test_seeds_on_different_images_are_an_error(tmp_path):
    a = _write_eval(tmp_path, "x", 0, BASE_BPP[0], BASE_PSNR[0], 0)
    b = tmp_path / "b.csv"
    frame = pd.read_csv(a).iloc[:5].assign(seed=1)
    frame.to_csv(b, index=False)
    with pytest.raises(ValueError, match="different images"):
        points.rd_points([a, b])


def test_bd_table_carries_intervals_and_seed_spread(study):
    bd = pd.read_csv(study / "tables" / "bd_vs_baseline.csv").set_index("variant")
    better = bd.loc["better"]
    # the plain means give BD-rate = 0.8 - 1 exactly (bpp scaled, PSNR equal)
    assert better["BD-rate (%)"] == pytest.approx(-20.0, abs=1e-9)
    assert better["BD-rate CI low (%)"] <= better["BD-rate (%)"] <= better["BD-rate CI high (%)"]
    assert better["BD-rate CI excludes 0"] == "yes"
    # seed 0: -22 %, seed 1: -18 % (each against the single-seed reference)
    assert better["n_seeds"] == 2
    assert better["BD-rate seed std (%)"] == pytest.approx(np.std([-22.0, -18.0], ddof=1), rel=1e-9)
    assert bd.loc["same", "n_seeds"] == 1 and math.isnan(bd.loc["same", "BD-rate seed std (%)"])
    # the CI columns are exactly those of the bootstrap module on the seed-averaged images
    direct = bootstrap.interval_table(pd.read_csv(study / "images.csv"), "baseline")
    row = direct.set_index("variant").loc["better"]
    assert better["BD-rate CI low (%)"] == pytest.approx(row["rate_low"], rel=1e-12)
    assert better["BD-PSNR CI high (dB)"] == pytest.approx(row["psnr_high"], rel=1e-12)


def test_reference_rows_have_the_zero_interval(study):
    gains = pd.read_csv(study / "tables" / "expected_gains.csv").set_index("phase")
    ref = gains.loc["baseline"]
    assert (ref["BD-rate CI low (%)"], ref["BD-rate CI high (%)"]) == (0.0, 0.0)
    assert ref["BD-rate CI excludes 0"] == "no"
    study_rows = pd.read_csv(study / "tables" / "s.csv").set_index("config")
    assert study_rows.loc["b", "BD-rate CI excludes 0"] == "yes"
    md = (study / "tables" / "bd_vs_baseline.md").read_text()
    assert "95 % paired bootstrap over the test images (1000 resamples" in md
