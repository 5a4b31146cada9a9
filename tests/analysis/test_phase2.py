"""hpcm.analysis.phase2: BD-rates over gamma x w_lr against closed-form rate shifts, best point,
overlap marks."""

from __future__ import annotations

import pandas as pd
import pytest

from hpcm.analysis import phase2
from hpcm.analysis.tables import TableError

REFERENCE = [(0.20, 29.0), (0.45, 32.0), (0.90, 35.0), (1.50, 37.5)]
LAMBDAS = (0.0035, 0.013, 0.0483, 0.1)
# (gamma, w_lr) -> rate factor: the same PSNRs at bpp * factor, so BD-rate = (factor - 1) * 100
# exactly
GRID = {(0.001, 0.01): 0.97, (0.001, 0.05): 1.01, (0.01, 0.01): 0.95, (0.01, 0.05): 0.96}
INCLUDED = ("phase1", (0.003, 0.025), 0.99)


def _name(gamma, w_lr):
    return f"phase2grid-gamma{gamma:g}-w_lr{w_lr:g}"


def _points():
    rows = []
    curves = {"baseline": 1.0, INCLUDED[0]: INCLUDED[2], **{_name(*k): f for k, f in GRID.items()}}
    for dataset in ("kodak", "clic2020-professional"):
        for variant, factor in curves.items():
            for lmbda, (bpp, psnr) in zip(LAMBDAS, REFERENCE):
                rows.append(
                    {
                        "dataset": dataset,
                        "variant": variant,
                        "lmbda": lmbda,
                        "bpp": bpp * factor,
                        "psnr": psnr,
                    }
                )
    return pd.DataFrame(rows)


def _runs(root, extra=()):
    for gamma, w_lr in [*GRID, *extra]:
        _run_yaml(root, _name(gamma, w_lr), gamma, w_lr)
    _run_yaml(root, INCLUDED[0], *INCLUDED[1])
    return root


def _run_yaml(root, variant, gamma, w_lr):
    for lmbda in LAMBDAS:
        run = root / variant / f"lmbda{lmbda}"
        run.mkdir(parents=True, exist_ok=True)
        (run / "run.yaml").write_text(
            f"variant: {variant}\nlmbda: {lmbda}\ngamma: {gamma}\nw_lr: {w_lr}\n"
        )


def test_bd_rates_ranks_and_best_without_intervals(tmp_path):
    variants, notes = phase2.grid_points(_runs(tmp_path), "phase2grid", include=["phase1"])
    assert variants[_name(0.01, 0.01)] == (0.01, 0.01) and variants["phase1"] == (0.003, 0.025)
    table = phase2.phase2_table(_points(), variants, "baseline", "pchip", "psnr")
    frame = table.frame[table.frame["dataset"] == "kodak"].set_index("variant")
    for (gamma, w_lr), factor in GRID.items():
        assert frame.loc[_name(gamma, w_lr), "BD-rate (%)"] == pytest.approx(
            (factor - 1) * 100, abs=1e-9
        )
    assert frame.loc["phase1", "BD-rate (%)"] == pytest.approx(-1.0, abs=1e-9)
    assert frame.loc[_name(0.01, 0.01), "rank"] == 1 and frame.loc[_name(0.01, 0.05), "rank"] == 2
    assert frame.loc[_name(0.01, 0.01), "best"] == "best (no interval)"
    assert (frame["best"] != "").sum() == 1
    assert any("kodak: best gamma=0.01, w_lr=0.01, BD-rate -5.00 %" in n for n in table.notes)


def _intervals(best_high, second_low):
    rows = []
    for dataset in ("kodak", "clic2020-professional"):
        rows.append(
            {
                "dataset": dataset,
                "variant": _name(0.01, 0.01),
                "rate_low": -7.0,
                "rate_high": best_high,
            }
        )
        rows.append(
            {
                "dataset": dataset,
                "variant": _name(0.01, 0.05),
                "rate_low": second_low,
                "rate_high": -1.0,
            }
        )
    return pd.DataFrame(rows)


@pytest.mark.parametrize(
    "best_high, second_low, mark",
    [
        (-3.5, -6.0, "best (interval overlaps runner-up)"),  # [-7, -3.5] meets [-6, -1]
        (-4.5, -4.0, "best (separated from runner-up)"),  # [-7, -4.5] below [-4, -1]
    ],
)
def test_overlap_of_best_and_runner_up_intervals(tmp_path, best_high, second_low, mark):
    variants, _ = phase2.grid_points(_runs(tmp_path), "phase2grid")
    table = phase2.phase2_table(
        _points(), variants, "baseline", "pchip", "psnr", _intervals(best_high, second_low)
    )
    best = table.frame[(table.frame["dataset"] == "kodak") & (table.frame["rank"] == 1)].iloc[0]
    assert best["best"] == mark
    assert best["BD-rate low (%)"] == -7.0 and best["BD-rate high (%)"] == best_high


def test_included_variant_at_a_grid_point_is_left_out_with_a_note(tmp_path):
    root = _runs(tmp_path, extra=[(0.003, 0.025)])
    variants, notes = phase2.grid_points(root, "phase2grid", include=["phase1", "phase9"])
    assert "phase1" not in variants and _name(0.003, 0.025) in variants
    assert any("phase1 is the grid point" in n for n in notes) and any(
        "phase9: no run" in n for n in notes
    )


def test_inconsistent_or_missing_grid_fails_clearly(tmp_path):
    with pytest.raises(TableError, match="no run of grid 'other'"):
        phase2.grid_points(_runs(tmp_path / "a"), "other")
    root = _runs(tmp_path / "b")
    (root / _name(0.001, 0.01) / "lmbda0.1" / "run.yaml").write_text(
        f"variant: {_name(0.001, 0.01)}\nlmbda: 0.1\ngamma: 0.002\nw_lr: 0.01\n"
    )
    with pytest.raises(TableError, match="has runs at"):
        phase2.grid_points(root, "phase2grid")


def test_cli_writes_table_and_heatmap(tmp_path):
    _points().to_csv(tmp_path / "points.csv", index=False)
    runs = _runs(tmp_path / "train")
    assert (
        phase2.main(
            [
                "--points",
                str(tmp_path / "points.csv"),
                "--runs",
                str(runs),
                "--grid",
                "phase2grid",
                "--include",
                "phase1",
                "--output-dir",
                str(tmp_path / "tables"),
                "--plots-dir",
                str(tmp_path / "plots"),
            ]
        )
        == 0
    )
    for ext in ("csv", "md", "tex"):
        assert (tmp_path / "tables" / f"phase2grid.{ext}").stat().st_size > 0
    assert (tmp_path / "plots" / "phase2grid.png").read_bytes()[:4] == b"\x89PNG"
    assert "no bootstrap intervals" in (tmp_path / "tables" / "phase2grid.md").read_text()
