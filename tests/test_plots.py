"""Figures: files written, axes labelled with units, anchors dashed, one colour per variant."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from hpcm import plots


def _points(path: Path) -> Path:
    rows = [("kodak", "baseline", 0.0035, 0.20, 29.0), ("kodak", "baseline", 0.013, 0.45, 32.0),
            ("kodak", "phase3", 0.0035, 0.18, 29.4), ("kodak", "phase3", 0.013, 0.42, 32.5)]
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["dataset", "variant", "lmbda", "bpp", "psnr", "ms_ssim_db"])
        for row in rows:
            writer.writerow([*row, 12.0])
    return path


def _run(root: Path, variant: str, lmbda: float, phase3: bool) -> None:
    run = root / variant / f"lmbda{lmbda}"
    run.mkdir(parents=True)
    (run / "run.yaml").write_text(f"variant: {variant}\nlmbda: {lmbda}\n")
    cols = ["step", "loss", "val_loss", "task_weight_distortion", "task_weight_bpp"]
    if phase3:
        cols += [f"task_weight_{t}" for t in ("s1_distortion", "s1_bpp", "s2_distortion",
                                               "s2_bpp", "s3_bpp")]
        cols += ["scale_contribution_s1", "scale_contribution_s2", "scale_contribution_s3"]
    with open(run / "metrics.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(cols)
        for step in range(1, 21):
            values = {"step": step, "loss": 3.0 / step, "val_loss": 3.1 / step if step % 5 == 0
                      else "", "task_weight_distortion": 0.5, "task_weight_bpp": 0.5}
            values.update({c: 0.2 for c in cols if c.startswith("task_weight_s")})
            values.update({c: 1 / 3 for c in cols if c.startswith("scale_contribution")})
            writer.writerow([values.get(c, "") for c in cols])


@pytest.fixture()
def captured(monkeypatch):
    figures = {}
    original = plots.save_figure

    def capture(fig, output_dir, stem):
        figures[stem] = [(ax.get_xlabel(), ax.get_ylabel(),
                          [(line.get_label(), line.get_color(), line.get_linestyle())
                           for line in ax.get_lines()]) for ax in fig.axes]
        return original(fig, output_dir, stem)

    monkeypatch.setattr(plots, "save_figure", capture)
    return figures


def test_all_figures_written_with_units_and_consistent_colours(tmp_path, captured):
    runs = tmp_path / "train"
    _run(runs, "baseline", 0.0035, False)
    _run(runs, "phase3", 0.0035, True)
    out = tmp_path / "plots"
    code = plots.main(["all", "--points", str(_points(tmp_path / "points.csv")), "--runs",
                       str(runs), "--output-dir", str(out), "--anchors", "vtm", "hpcm-base",
                       "--total-epochs", "300"])
    assert code == 0
    for stem in ("rd_kodak_psnr", "training_lmbda0.0035", "task_weights_baseline_lmbda0.0035",
                 "task_weights_scales_phase3_lmbda0.0035",
                 "scale_contributions_phase3_lmbda0.0035", "gamma_schedules"):
        for ext in ("png", "pdf"):
            assert (out / f"{stem}.{ext}").stat().st_size > 1000, stem
    assert not (out / "scale_contributions_baseline_lmbda0.0035.png").exists()

    xlabel, ylabel, lines = captured["rd_kodak_psnr"][0]
    assert (xlabel, ylabel) == ("Rate (bpp)", "PSNR (dB)")
    styles = {label: (color, style) for label, color, style in lines}
    assert styles["VTM (published)"][1] == "--" and styles["HPCM-Base (paper) (published)"][1] == "--"
    assert styles["phase3"][1] == "-"
    training = {label: color for label, color, _ in captured["training_lmbda0.0035"][0][2]}
    for variant in ("baseline", "phase3"):
        assert styles[variant][0] == training[f"{variant} train"] == plots.variant_color(variant)
    assert plots.variant_color("study1_equal") == plots.variant_color("study1_equal")
    assert plots.variant_color("baseline") != plots.variant_color("phase3")


def test_gamma_trajectories_follow_the_manager():
    traj = plots.gamma_trajectories(total_epochs=100)
    assert set(traj) == {"fixed", "linear", "cosine", "adaptive", "hierarchical"}
    np.testing.assert_allclose(traj["fixed"], np.tile([0.008, 0.006, 0.004], (101, 1)))
    # linear and cosine end at the default final gammas (half the initial ones).
    np.testing.assert_allclose(traj["linear"][-1], [0.004, 0.003, 0.002])
    np.testing.assert_allclose(traj["cosine"][-1], [0.004, 0.003, 0.002])
    assert np.all(traj["adaptive"] > 0)


def test_missing_runs_is_a_clear_error(tmp_path, capsys):
    assert plots.main(["runs", "--runs", str(tmp_path), "--output-dir", str(tmp_path)]) == 2
    assert f"no metrics.csv under {tmp_path}" in capsys.readouterr().err
