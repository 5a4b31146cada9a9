"""The shipped VTM-22.0 Kodak anchors (hpcm/analysis/measured/<anchor>/kodak.*) and HPCM's
published BD-rates reproduced against them.

Each anchor's facts are checked against independent sources: every row's image is the Kodak file
of the pinned SHA-256 (hpcm.data.datasets.KODAK_SHA256), its bpp is its bitstream's bytes over the
image's pixels, its cfg hash is the one the VTM-22.0 tag ships, its colour conversion is the one
its name says, and the CompressAI-style JSON's means equal the CSV's. The reproduced BD-rates are
pinned and equal the ``bjontegaard`` package (FAU-LMS) on the same mean curve."""

from __future__ import annotations

import json
import warnings

import bjontegaard  # the test extra pins it (pyproject.toml)
import numpy as np
import pandas as pd
import pytest

from hpcm.analysis import anchors, measured, reproduce
from hpcm.data.datasets import KODAK_SHA256

QPS = [22, 27, 32, 37, 42, 47]
# cfg/encoder_intra_vtm.cfg of the VTM-22.0 tag (redchenjs/VVCSoftware_VTM, commit 463b869)
CFG_SHA256 = "5647353c1d7a5a64c4180afee1f7f5f902ada9198c08839baa972395a3dc1e34"
# anchor -> its colour conversion and the BD-rates (%) of the README's Kodak points against it:
# pchip, RGB PSNR, all six QPs, per-image averaging (docs/models.md). Paper: -15.31 / -19.19.
SHIPPED = {
    "vtm-22.0": {
        "colour": "round",
        "bd": {"hpcm-base": -15.4407, "hpcm-large": -19.4003},
    },
    "vtm-22.0-truncated": {
        "colour": "truncate",
        "bd": {"hpcm-base": -20.3349, "hpcm-large": -23.9285},
    },
}


@pytest.fixture(scope="module")
def table() -> pd.DataFrame:
    return anchors.load_anchors()


@pytest.fixture(scope="module", params=sorted(SHIPPED))
def anchor(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def rows(anchor) -> pd.DataFrame:
    return pd.read_csv(measured.MEASURED_DIR / anchor / "kodak.csv")


def test_every_kodak_image_at_every_qp_with_its_provenance(anchor, rows):
    assert sorted(rows["image"].unique()) == sorted(KODAK_SHA256)
    assert sorted(rows["quality"].unique()) == QPS
    assert len(rows) == 24 * 6 and not rows.duplicated(["image", "quality"]).any()
    assert (rows["anchor"] == anchor).all()
    assert (rows["image_sha256"] == rows["image"].map(KODAK_SHA256)).all()
    assert (rows["cfg_sha256"] == CFG_SHA256).all()
    assert (rows["version"] == "VTM 22.0").all()
    assert (rows["colour"] == SHIPPED[anchor]["colour"]).all()
    for flag in ("encoder_intra_vtm.cfg", "--InputChromaFormat=444", "--InputBitDepth=8"):
        assert rows["encode_cmd"].str.contains(flag, regex=False).all()
    assert (rows["encode_cmd"].str.extract(r" -q (\d+) ")[0].astype(int) == rows["quality"]).all()
    numeric = ["bytes", "bpp", "psnr", "ms_ssim", "psnr_y", "psnr_u", "psnr_v", "enc_time"]
    assert np.isfinite(rows[numeric].to_numpy(float)).all()


def test_bpp_is_the_bitstream_over_the_pixels(rows):
    np.testing.assert_allclose(
        rows["bpp"], rows["bytes"] * 8 / (rows["width"] * rows["height"]), rtol=1e-12
    )


def test_the_curve_spans_the_issue_range_and_rises_with_rate(rows):
    means = rows.groupby("quality")[["bpp", "psnr"]].mean().sort_values("bpp")
    assert means["bpp"].min() < 0.09 and means["bpp"].max() > 1.0
    assert list(means.index) == sorted(QPS, reverse=True)  # lower QP, more bits
    assert (np.diff(means["psnr"]) > 0).all()
    for _, image in rows.sort_values("quality", ascending=False).groupby("image"):
        assert (np.diff(image["bpp"]) > 0).all() and (np.diff(image["psnr"]) > 0).all()


def test_json_is_compressai_style_with_the_csv_means(anchor, rows):
    doc = json.loads((measured.MEASURED_DIR / anchor / "kodak.json").read_text())
    results = doc["results"]
    means = rows.groupby("quality")[["bpp", "psnr"]].mean().sort_values("bpp")
    np.testing.assert_allclose(results["bpp"], means["bpp"], rtol=1e-12)
    np.testing.assert_allclose(results["psnr-rgb"], means["psnr"], rtol=1e-12)
    provenance = doc["meta"]["provenance"]
    assert provenance["tag"] == "VTM-22.0" and provenance["source_repo"].endswith("VTM")
    wording = {"round": "values rounded to 8 bits", "truncate": "values truncated to 8 bits"}
    assert wording[SHIPPED[anchor]["colour"]] in provenance["colour"]
    assert doc["meta"]["complete"]["pairs"] == doc["meta"]["complete"]["expected_pairs"] == 144


def test_listed_as_an_anchor_of_kodak(anchor, table):
    assert anchor in anchors.anchor_names("kodak", table)
    bpp, _ = anchors.anchor_curve("kodak", anchor, "psnr", table)
    assert len(bpp) == 6


@pytest.fixture(scope="module")
def reproduced(anchor, table) -> pd.DataFrame:
    return reproduce.reproduce("kodak", anchor, table=table)


def test_default_pins_the_reproduced_bd_rates(anchor, reproduced):
    default = reproduced[reproduced["choice"] == "default"]
    for model, value in SHIPPED[anchor]["bd"].items():
        row = default[default["model"] == model].iloc[0]
        assert row["BD-rate (%)"] == pytest.approx(value, abs=5e-5)
        assert row["points"] == 6


@pytest.mark.parametrize("method", ["pchip", "akima"])
def test_equals_the_bjontegaard_package(anchor, table, reproduced, method):
    ref = anchors.anchor_curve("kodak", anchor, "psnr", table)
    choice = "default" if method == "pchip" else f"method={method}"
    for model in SHIPPED[anchor]["bd"]:
        test = anchors.anchor_curve("kodak", model, "psnr", table)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            expected = bjontegaard.bd_rate(
                *ref, *test, method=method, min_overlap=0, require_matching_points=False
            )
        got = reproduced[(reproduced["choice"] == choice) & (reproduced["model"] == model)]
        assert got["BD-rate (%)"].iloc[0] == pytest.approx(expected, abs=1e-9)
