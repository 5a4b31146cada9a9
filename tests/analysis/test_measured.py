"""Measured anchors: shipping from point files (complete pairs only), mean curves (per-image and
pooled), the anchor table, BD intervals paired on images, and the BD table against one.

Synthetic per-image points with closed-form answers: a variant that needs exactly 10 % less rate
than the anchor at every image's PSNR has BD-rate -10 % on every bootstrap resample."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from hpcm.analysis import anchors, measured
from hpcm.analysis.tables import anchor_uncertainty, bd_vs
from hpcm.evaluate.codec_anchor import POINT_FORMAT, write_point

IMAGES = ["kodim01.png", "kodim02.png", "kodim03.png"]
QPS = [27, 32, 37, 42]


def image_rate(i: int, qp: int) -> float:
    return (1.0 + 0.3 * i) * 2.0 ** ((32 - qp) / 6.0)


def image_psnr(i: int, qp: int) -> float:
    return 30.0 + i + 5.0 * math.log2(image_rate(i, qp))  # strictly rising with rate


def point(i: int, qp: int, anchor: str = "vtm-test") -> dict:
    rate = image_rate(i, qp)
    return {
        "format": POINT_FORMAT,
        "dataset": "kodak",
        "anchor": anchor,
        "codec": "vtm",
        "image": IMAGES[i],
        "quality": qp,
        "width": 768,
        "height": 512,
        "bytes": int(rate * 768 * 512 / 8),
        "bpp": rate,
        "psnr": image_psnr(i, qp),
        "ms_ssim": 0.99,
        "psnr_y": image_psnr(i, qp) - 1,
        "psnr_u": 40.0,
        "psnr_v": 41.0,
        "psnr_yuv_vtm": image_psnr(i, qp) + 0.5,
        "enc_time": 30.0,
        "dec_time": 0.2,
        "version": "VTM 22.0",
        "cfg_sha256": "ab" * 32,
        "encode_cmd": f"EncoderAppStatic -q {qp}",
        "decode_cmd": "DecoderAppStatic",
    }


@pytest.fixture()
def shipped(tmp_path) -> Path:
    """Point files of a run where kodim03 at QP 27 never finished and one file is truncated."""
    points = tmp_path / "points"
    for qp in QPS:
        for i in range(len(IMAGES)):
            if (i, qp) != (2, 27):
                write_point(point(i, qp), points / f"q{qp}" / f"{IMAGES[i]}.json")
    (points / "q27" / "kodim03.png.json").write_text('{"format": "hpcm-codec-')  # killed mid-write
    out = tmp_path / "measured" / "vtm-test"
    measured.assemble(
        points,
        "kodak",
        "vtm-test",
        out,
        n_images=3,
        qualities=QPS,
        label="VTM test",
        provenance={"tag": "VTM-22.0", "source_repo": "x/y"},
    )
    return out / "kodak.csv"


def test_assemble_keeps_complete_pairs_and_says_how_many(shipped):
    doc = json.loads(shipped.with_suffix(".json").read_text())
    rows = pd.read_csv(shipped)
    assert len(rows) == 11
    complete = doc["meta"]["complete"]
    assert complete["pairs"] == 11 and complete["expected_pairs"] == 12
    assert len(doc["meta"]["complete"]["skipped"]) == 1
    assert doc["meta"]["incomplete_qualities"] == {"27": 2}
    assert sorted(doc["meta"]["quality"]) == [32, 37, 42]  # QP 27 lacks an image: not averaged
    expected = [np.mean([image_rate(i, qp) for i in range(3)]) for qp in (42, 37, 32)]
    assert doc["results"]["bpp"] == pytest.approx(expected)
    provenance = doc["meta"]["provenance"]
    assert provenance["tag"] == "VTM-22.0" and provenance["version"] == "VTM 22.0"
    assert provenance["cfg_sha256"] == "ab" * 32 and provenance["label"] == "VTM test"


def test_assemble_refuses_points_of_another_run(tmp_path):
    write_point(point(0, 22), tmp_path / "p.json")
    with pytest.raises(ValueError, match="quality 22 is not one of"):
        measured.assemble(tmp_path, "kodak", "vtm-test", tmp_path / "o", 3, QPS, "x")
    with pytest.raises(ValueError, match="not kodak/other"):
        measured.assemble(tmp_path, "kodak", "other", tmp_path / "o", 3, [22], "x")


def test_mean_rows_enter_the_anchor_table(shipped):
    table = anchors.load_anchors(measured=[shipped])
    bpp, psnr = anchors.anchor_curve("kodak", "vtm-test", "psnr", table)
    qps = [42, 37, 32]
    assert bpp == pytest.approx([np.mean([image_rate(i, q) for i in range(3)]) for q in qps])
    assert psnr == pytest.approx([np.mean([image_psnr(i, q) for i in range(3)]) for q in qps])
    row = table[table["anchor"] == "vtm-test"].iloc[0]
    assert row["label"] == "VTM test" and row["source_repo"] == "x/y"
    assert "11 of 12 (image, quality) pairs complete" in row["note"]
    copy = shipped.with_name("copy.csv")
    copy.write_bytes(shipped.read_bytes())
    with pytest.raises(ValueError, match=r"\('kodak', 'vtm-test'\) given twice"):
        anchors.load_anchors(measured=[shipped, copy])
    # the shipped table itself is untouched by add-compressai's reader
    assert "vtm-test" not in set(anchors.load_anchors(shipped=False)["anchor"])


def test_pooled_averaging_is_psnr_of_the_mean_mse(shipped):
    rows = measured.read_measured(shipped)
    _, pooled = measured.mean_curve(rows, averaging="pooled")
    qp = 42  # the lowest rate comes first
    mse = [255.0**2 / 10 ** (image_psnr(i, qp) / 10) for i in range(3)]
    assert pooled[0] == pytest.approx(10 * math.log10(255.0**2 / np.mean(mse)))
    _, per_image = measured.mean_curve(rows)
    assert pooled[0] < per_image[0]  # Jensen: the mean of PSNRs exceeds the PSNR of the mean MSE
    _, yuv = measured.mean_curve(rows, distortion="psnr_yuv")
    expected = np.mean([(6 * (image_psnr(i, qp) - 1) + 81) / 8 for i in range(3)])
    assert yuv[0] == pytest.approx(expected)
    with pytest.raises(ValueError, match=r"qualities \[27\] are not complete"):
        measured.mean_curve(rows, qualities=[27, 32])


def variant_images(scale: float) -> pd.DataFrame:
    """A variant at 3 lambdas: each image at the anchor's PSNR for 'scale' times the rate."""
    rows = []
    for lmbda, qp in zip((0.1, 0.2, 0.3), (41, 36, 33)):
        for i, name in enumerate(IMAGES):
            rows.append(
                {
                    "dataset": "kodak",
                    "variant": "model",
                    "lmbda": lmbda,
                    "seed": 0,
                    "image": name,
                    "bpp": scale * image_rate(i, qp),
                    "psnr": image_psnr(i, qp),
                    "ms_ssim": 0.99,
                }
            )
    return pd.DataFrame(rows)


def test_paired_intervals_against_the_anchor_have_closed_forms(shipped):
    rows = measured.read_measured(shipped)
    intervals = measured.anchor_intervals(variant_images(1.0), rows, "vtm-test", resamples=50)
    r = intervals.iloc[0]
    assert r["note"] == "" and r["n_images"] == 3
    # the per-image curves are log-linear in rate, so pchip is exact: BD-rate of a 0.9 x rate
    # variant is -10 % on every resample, of the anchor's own points 0
    assert r["rate_low"] == pytest.approx(0.0, abs=1e-9)
    assert r["rate_high"] == pytest.approx(0.0, abs=1e-9)
    shifted = measured.anchor_intervals(variant_images(0.9), rows, "vtm-test", resamples=50).iloc[0]
    assert shifted["rate_low"] == pytest.approx(-10.0)
    assert shifted["rate_high"] == pytest.approx(-10.0)


def test_intervals_need_the_same_images(shipped):
    rows = measured.read_measured(shipped)
    other = variant_images(1.0)
    other["image"] = other["image"].str.replace("kodim03", "kodim24")
    r = measured.anchor_intervals(other, rows, "vtm-test", resamples=20).iloc[0]
    assert math.isnan(r["rate_low"]) and "different images" in r["note"]


def test_bd_table_against_a_measured_anchor_has_intervals(shipped):
    images = variant_images(0.9)
    points = (
        images.groupby(["dataset", "variant", "lmbda"])[["bpp", "psnr", "ms_ssim"]]
        .mean()
        .reset_index()
    )
    table = anchors.load_anchors(measured=[shipped])
    unc = anchor_uncertainty(
        images, measured.read_measured(shipped), "vtm-test", "psnr", "pchip", resamples=50
    )
    result = bd_vs(
        points, "baseline", "pchip", "psnr", anchor="vtm-test", unc=unc, anchor_table=table
    )
    row = result.frame.iloc[0]
    assert result.name == "bd_vs_anchor-vtm-test"
    assert row["BD-rate CI low (%)"] == pytest.approx(-10.0)
    assert row["BD-rate CI excludes 0"] == "yes"
    # the point estimate is the BD of the mean curves (not exactly -10 %: means of log-linear
    # curves are not log-linear), inside [-11, -9]
    assert -11 < row["BD-rate (%)"] < -9
    # a published curve (no per-image data) gets no interval
    rows = measured.read_measured(shipped)
    assert anchor_uncertainty(images, rows, "vtm", "psnr", "pchip") is None


def test_list_and_bd_commands_show_a_measured_anchor(shipped, capsys):
    assert anchors.main(["list", "--measured", str(shipped)]) == 0
    out = capsys.readouterr().out
    assert "vtm-test" in out and "kodak/vtm-test: measured by this project: VTM 22.0" in out
    assert "11 of 12 (image, quality) pairs complete" in out
    assert (
        anchors.main(
            ["bd", "--dataset", "kodak", "--reference", "vtm-test", "--measured", str(shipped)]
        )
        == 0
    )
    assert "hpcm-base" in capsys.readouterr().out
