"""No silent averages over missing values (issue 10, point 3): a point with a non-finite image value
is refused naming the image."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from hpcm.analysis.points import rd_points


def write_eval(path, bpp, psnr, ms_ssim=(0.9, 0.95)):
    pd.DataFrame(
        {
            "image": ["a.png", "b.png"],
            "variant": "baseline",
            "lmbda": 0.0067,
            "dataset": "kodak",
            "bpp": bpp,
            "psnr": psnr,
            "ms_ssim": ms_ssim,
        }
    ).to_csv(path, index=False)
    return path


@pytest.mark.parametrize(
    "column, values",
    [("bpp", [math.nan, 0.3]), ("psnr", [30.0, math.inf]), ("ms_ssim", [math.nan, 0.95])],
)
def test_a_point_with_a_nonfinite_image_value_is_refused_naming_the_image(tmp_path, column, values):
    good = {"bpp": [0.2, 0.3], "psnr": [30.0, 31.0], "ms_ssim": [0.9, 0.95]}
    good[column] = values
    path = write_eval(tmp_path / "e.csv", **good)
    image = "a.png" if not math.isfinite(values[0]) else "b.png"
    with pytest.raises(ValueError, match=rf"image '{image}' has {column} = .*1 of 2 image"):
        rd_points([path])


def test_finite_points_average_every_image(tmp_path):
    point = rd_points([write_eval(tmp_path / "e.csv", [0.2, 0.4], [30.0, 32.0])]).iloc[0]
    assert (point["bpp"], point["psnr"], point["n_images"]) == (
        pytest.approx(0.3),
        pytest.approx(31.0),
        2,
    )


def test_ms_ssim_missing_for_every_image_is_a_point_without_ms_ssim(tmp_path):
    # images under 161 px have no 5-scale MS-SSIM: not a partial average, simply not measured
    point = rd_points(
        [write_eval(tmp_path / "e.csv", [0.2, 0.4], [30.0, 32.0], [math.nan, math.nan])]
    ).iloc[0]
    assert math.isnan(point["ms_ssim"]) and point["psnr"] == pytest.approx(31.0)
