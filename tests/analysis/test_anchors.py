"""Anchor table: provenance, fidelity to the published files, and BD regression numbers."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from hpcm.analysis import anchors, bd
from tests.paths import SHARED

SHARED_ANCHORS = SHARED / "data" / "anchors" / "compressai"


@pytest.fixture(scope="module")
def table():
    return anchors.load_anchors()


def test_every_row_has_provenance(table):
    for column in ("source_repo", "commit", "file"):
        assert table[column].notna().all() and (table[column].astype(str).str.len() > 0).all()
    # Each anchor is one file at one commit.
    per_curve = table.groupby(["dataset", "anchor"])[["commit", "file"]].nunique()
    assert (per_curve == 1).all().all()


def test_required_anchors_present(table):
    for dataset in ("kodak", "clic2020-professional"):
        names = anchors.anchor_names(dataset, table)
        for name in (
            "vtm",
            "hm",
            "bpg444",
            "bmshj2018-hyperprior",
            "mbt2018",
            "cheng2020-anchor",
            "hpcm-base",
            "hpcm-large",
        ):
            assert name in names, (dataset, name)


# Git blob SHA-1 prefixes of CompressAI commit 869a9f5, as listed in orchestration.md §1.7.
BLOB_PREFIXES = {
    ("kodak", "vtm"): "a760c0cb466b",
    ("kodak", "bpg444"): "1e60de14418d",
    ("kodak", "hm"): "c3045c2eb07c",
    ("clic2020-professional", "vtm"): "bcc193aabeb3",
    ("kodak", "bmshj2018-hyperprior"): "7b1d24d92b61",
    ("kodak", "mbt2018"): "83b98bb19e80",
    ("kodak", "cheng2020-anchor"): "7d065b6775f7",
}


@pytest.mark.parametrize("key", sorted(BLOB_PREFIXES))
def test_blob_hashes_match_published_files(table, key):
    rows = table[(table["dataset"] == key[0]) & (table["anchor"] == key[1])]
    assert rows["blob_sha1"].str.startswith(BLOB_PREFIXES[key]).all()


@pytest.mark.skipif(
    not SHARED_ANCHORS.is_dir(),
    reason=f"needs the published anchor JSON files' exact bytes (not at {SHARED_ANCHORS})",
)
def test_values_equal_the_shared_json_files(table):
    files = {
        ("kodak", "vtm"): "kodak/vtm.json",
        ("kodak", "hm"): "kodak/hm.json",
        ("kodak", "mbt2018"): "kodak/compressai-mbt2018_mse_ans_cuda.json",
        ("clic2020-professional", "vtm"): "clic2020-professional/vtm.json",
    }
    for (dataset, name), rel in files.items():
        data = (SHARED_ANCHORS / rel).read_bytes()
        assert anchors.git_blob_sha1(data).startswith(BLOB_PREFIXES[(dataset, name)])
        results = json.loads(data)["results"]
        bpp, psnr = anchors.anchor_curve(dataset, name, "psnr", table)
        order = np.argsort(results["bpp"])
        np.testing.assert_array_equal(bpp, np.asarray(results["bpp"])[order])
        np.testing.assert_array_equal(psnr, np.asarray(results["psnr-rgb"])[order])


def test_hpcm_points_match_the_research_notes(table):
    # hpcm.md §4: HPCM-Base Kodak lowest and highest λ; HPCM-Large CLIC MS-SSIM highest λ.
    bpp, psnr = anchors.anchor_curve("kodak", "hpcm-base", "psnr", table)
    assert (bpp[0], psnr[0], bpp[-1], psnr[-1]) == (0.1211, 29.4022, 0.8209, 37.7525)
    bpp, db = anchors.anchor_curve(
        "clic2020-professional", "hpcm-large-msssim", "ms_ssim_db", table
    )
    assert (bpp[-1], db[-1]) == (0.4755, 21.4103)
    with pytest.raises(ValueError, match="no psnr values"):
        anchors.anchor_curve("kodak", "hpcm-base-msssim", "psnr", table)


# BD-rates computed independently with bjontegaard 1.3.0 (orchestration.md §4.3), pchip, vs VTM.
REGRESSION = [
    ("kodak", "bmshj2018-hyperprior", 31.03),
    ("kodak", "mbt2018", 11.47),
    ("kodak", "cheng2020-anchor", 3.96),
    ("kodak", "bpg444", 21.99),
    ("kodak", "hm", 23.31),
    ("clic2020-professional", "bmshj2018-hyperprior", 44.67),
    ("clic2020-professional", "mbt2018", 11.03),
    ("clic2020-professional", "cheng2020-anchor", 4.08),
]


@pytest.mark.parametrize("dataset,name,expected", REGRESSION)
def test_bd_rate_vs_vtm_matches_published_regression_numbers(table, dataset, name, expected):
    ref = anchors.anchor_curve(dataset, "vtm", "psnr", table)
    test = anchors.anchor_curve(dataset, name, "psnr", table)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        value = bd.bd_rate(*ref, *test, method="pchip")
    assert round(value, 2) == pytest.approx(expected, abs=0.005)


def test_unknown_anchor_lists_the_available_ones(table):
    with pytest.raises(ValueError, match="available: .*vtm"):
        anchors.anchor_curve("kodak", "vvc", "psnr", table)


def test_list_says_where_vtm_22_is_measured_and_labels_compressai_vtm_unversioned(table, capsys):
    assert anchors.main(["list"]) == 0
    out = capsys.readouterr().out
    # Kodak has measured VTM-22.0 anchors shipped (hpcm/analysis/measured/); the others have none
    assert "VTM-22.0: measured by this project on kodak" in out
    assert "VTM-22.0 on clic2020-professional, tecnick: none" in out
    assert "No published VTM-22.0 R-D points found" in out and "issue #166" in out
    vtm = table[table["anchor"] == "vtm"]
    assert set(vtm["label"]) == {"VTM (CompressAI; version unrecorded)"}
    assert set(vtm["source_repo"]) == {"InterDigitalInc/CompressAI"}
    # only this project's measured curves claim to be VTM-22.0, and they say so
    claims = table[table["label"].str.contains("22.0")]
    assert claims["note"].str.startswith("measured by this project").all()
    assert claims["label"].str.contains("(measured)", regex=False).all()
