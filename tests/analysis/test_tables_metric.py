"""hpcm tables takes its quality axis from the analysis YAML (`analysis.metric`, written by the
workflow from the study's distortion): MS-SSIM dB BD numbers equal the bjontegaard package's on
-10 log10(1 - MS-SSIM), and every BD table says which metric it measured."""

from __future__ import annotations

import csv
import math
import warnings

import bjontegaard
import pytest
import yaml

from hpcm.analysis import rd, tables
from tests.analysis.test_tables import _write_run

LAMBDAS = (2.4, 8.73, 31.73)
# (bpp, linear MS-SSIM) per lambda; both images of a point carry these exact values
CURVES = {
    "baseline": [(0.10, 0.950), (0.21, 0.975), (0.41, 0.988)],
    "phase1": [(0.10, 0.953), (0.20, 0.976), (0.40, 0.989)],
}


def to_db(value: float) -> float:
    return -10 * math.log10(1 - value)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    root = tmp_path_factory.mktemp("msssim")
    evals = []
    for seed, (variant, points) in enumerate(CURVES.items()):
        for i, (lmbda, (bpp, ms_ssim)) in enumerate(zip(LAMBDAS, points)):
            _write_run(root / "train", variant, lmbda, seed * 10 + i)
            path = root / "eval" / variant / f"lmbda{lmbda}.csv"
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "w", newline="") as handle:
                writer = csv.writer(handle)
                writer.writerow(
                    ["image", "variant", "lmbda", "dataset", "bpp", "psnr", "ms_ssim", "decode_ok"]
                )
                for k in range(2):
                    writer.writerow(
                        [
                            f"img{k}.png",
                            variant,
                            lmbda,
                            "kodak",
                            bpp,
                            30.0 + 3 * i + 0.1 * seed,
                            ms_ssim,
                            True,
                        ]
                    )
            evals.append(path)
    assert (
        rd.main(["points", "--eval-csv", *map(str, evals), "--output", str(root / "points.csv")])
        == 0
    )
    config = root / "analysis.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "analysis": {
                    "reference": "baseline",
                    "metric": "ms_ssim_db",
                    "anchors": [],
                    "gains": {"phase1": "phase1"},
                    "studies": {},
                }
            }
        )
    )
    out = root / "tables"
    assert (
        tables.main(
            [
                "--points",
                str(root / "points.csv"),
                "--runs",
                str(root / "train"),
                "--config",
                str(config),
                "--output-dir",
                str(out),
            ]
        )
        == 0
    )
    return out


def test_bd_is_measured_on_ms_ssim_db(written):
    ref, test = CURVES["baseline"], CURVES["phase1"]
    args = (
        [p[0] for p in ref],
        [to_db(p[1]) for p in ref],
        [p[0] for p in test],
        [to_db(p[1]) for p in test],
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rate = bjontegaard.bd_rate(*args, method="pchip", require_matching_points=False)
        quality = bjontegaard.bd_psnr(*args, method="pchip", require_matching_points=False)
    with open(written / "bd_vs_baseline.csv") as handle:
        row = next(r for r in csv.DictReader(handle) if r["variant"] == "phase1")
    assert float(row["BD-rate (%)"]) == pytest.approx(rate, abs=1e-6)
    assert float(row["BD-PSNR (dB)"]) == pytest.approx(quality, abs=1e-6)


def test_every_bd_table_names_the_metric(written):
    for name in ("bd_vs_baseline", "expected_gains"):
        text = (written / f"{name}.md").read_text()
        assert "MS-SSIM in dB" in text and "BD-MS-SSIM (dB)" in text, name
    assert "MS-SSIM (dB)" in (written / "bd_vs_baseline.md").read_text().splitlines()[0]
