"""hpcm.analysis.summary: BD-rates vs the reference and an anchor from closed-form rate shifts,
hours, complexity."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from hpcm.analysis import summary
from hpcm.analysis.anchors import anchor_curve
from hpcm.analysis.tables import TableError

LAMBDAS = (0.0018, 0.0035, 0.0067, 0.013, 0.025, 0.0483)
# variant -> rate factor against the published HPCM-Base Kodak curve (same PSNRs at bpp * factor):
# BD-rate vs the anchor = (factor - 1) * 100 and vs baseline = (factor / 1.1 - 1) * 100, exactly.
FACTORS = {"baseline": 1.1, "phase1": 1.045, "phase2": 0.99}


def _points():
    bpp, psnr = anchor_curve("kodak", "hpcm-base", "psnr")
    rows = []
    for variant, factor in FACTORS.items():
        for lmbda, b, p in zip(LAMBDAS, bpp, psnr):
            rows.append(
                {
                    "dataset": "kodak",
                    "variant": variant,
                    "lmbda": lmbda,
                    "bpp": b * factor,
                    "psnr": p,
                    "ms_ssim_db": np.nan,
                }
            )
    return pd.DataFrame(rows)


def _runs(root, device="cpu"):
    for variant in FACTORS:
        for lmbda in LAMBDAS[:2]:
            run = root / variant / f"lmbda{lmbda}"
            run.mkdir(parents=True)
            (run / "run.yaml").write_text(
                f"variant: {variant}\nlmbda: {lmbda}\nmodel: HPCM_Tiny\n"
                f"device: auto\nmeta:\n  device: {device}\n"
            )
            # 3 logged windows of 10 steps at 0.5 s, 2 s, 1 s per step + a validation-only row: 35 s
            (run / "metrics.csv").write_text(
                "step,epoch,lr,loss,val_loss,step_time,loss_steps\n"
                "10,1,1e-4,5,,0.5,10\n20,1,1e-4,4,,2.0,10\n20,1,,,3.9,,\n30,2,1e-4,3,,1.0,10\n"
            )
    return root


COMPLEXITY = {"HPCM_Tiny": {"encoder": 15.0, "decoder": 14.0, "total": 19.0}}


def test_bd_columns_hours_and_complexity(tmp_path):
    costs = summary.run_costs(_runs(tmp_path))
    assert costs["hours"].tolist() == pytest.approx([35 / 3600] * 6)
    numeric, table = summary.summary_tables(
        _points(),
        costs,
        {"reference": "baseline", "anchors": ["hpcm-base"], "gains": {"phase1": "phase1"}},
        complexity=COMPLEXITY,
    )
    frame = numeric.set_index("variant")
    assert list(numeric["variant"]) == [
        "baseline",
        "phase1",
        "phase2",
    ]  # reference, gains, the rest
    for variant, factor in FACTORS.items():
        assert frame.loc[variant, "PSNR BD-rate vs hpcm-base (%)"] == pytest.approx(
            (factor - 1) * 100, abs=1e-9
        )
        assert frame.loc[variant, "PSNR BD-rate vs baseline (%)"] == pytest.approx(
            (factor / 1.1 - 1) * 100, abs=1e-9
        )
    assert frame.loc["phase1", "train hours"] == pytest.approx(2 * 35 / 3600)
    assert (
        frame.loc["phase1", "train device"] == "CPU"
        and frame.loc["phase1", "kMACs/px total"] == 19.0
    )
    assert math.isnan(frame.loc["phase1", "PSNR BD-rate vs baseline (%) low"])  # no bootstrap here
    shown = table.frame.set_index("variant")
    assert shown.loc["phase2", "PSNR vs hpcm-base"] == "-1.00"
    assert shown.loc["phase2", "training"] == "0.0194 CPU-h"  # 2 x 35 s
    assert shown.loc["phase2", "kMACs/px enc/dec/total"] == "15.0/14.0/19.0"
    assert any("MS-SSIM" in n and "not measured" in n for n in table.notes)


def test_gpu_hours_and_step_difference_without_loss_steps(tmp_path):
    root = _runs(tmp_path, device="cuda:0")
    for path in root.rglob("metrics.csv"):
        path.write_text(
            "step,epoch,loss,val_loss,step_time\n10,1,5,,0.5\n30,1,4,,2.0\n"
        )  # 5 s + 40 s
    costs = summary.run_costs(root)
    assert set(costs["device"]) == {"GPU"} and costs["hours"].tolist() == pytest.approx(
        [45 / 3600] * 6
    )


def test_missing_device_and_unknown_variant_fail_clearly(tmp_path):
    run = tmp_path / "r" / "baseline" / "lmbda0.1"
    run.mkdir(parents=True)
    (run / "run.yaml").write_text("variant: baseline\nlmbda: 0.1\ndevice: auto\n")
    with pytest.raises(TableError, match="meta.device"):
        summary.run_costs(tmp_path / "r")
    costs = summary.run_costs(_runs(tmp_path / "ok"))
    with pytest.raises(TableError, match="no R-D points"):
        summary.summary_tables(
            _points(), costs, {"reference": "baseline"}, variants=["phase9"], complexity=COMPLEXITY
        )


def test_cli_writes_the_three_files_with_the_counted_complexity(tmp_path):
    _points().to_csv(tmp_path / "points.csv", index=False)
    (tmp_path / "analysis.yaml").write_text(
        "analysis:\n  reference: baseline\n  anchors: [hpcm-base, vtm]\n"
    )
    assert (
        summary.main(
            [
                "--points",
                str(tmp_path / "points.csv"),
                "--runs",
                str(_runs(tmp_path / "train")),
                "--config",
                str(tmp_path / "analysis.yaml"),
                "--output-dir",
                str(tmp_path / "t"),
                "--size",
                "64",
            ]
        )
        == 0
    )
    numeric = pd.read_csv(tmp_path / "t" / "summary.csv")
    assert numeric["kMACs/px total"].iloc[0] > numeric["kMACs/px decoder"].iloc[0] > 0
    md = (tmp_path / "t" / "summary.md").read_text()
    assert (
        "PSNR vs vtm" in md and "\\begin{tabular}" in (tmp_path / "t" / "summary.tex").read_text()
    )
