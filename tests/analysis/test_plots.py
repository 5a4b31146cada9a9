"""Figures: files written, axes labelled with units, anchors dashed, one colour per variant."""

from __future__ import annotations

import csv
import itertools
from pathlib import Path

import numpy as np
import pytest

from hpcm.analysis import plots
from hpcm.analysis import runs as run_discovery
from tests.paths import REPO


def _points(path: Path) -> Path:
    rows = [
        ("kodak", "baseline", 0.0035, 0.20, 29.0),
        ("kodak", "baseline", 0.013, 0.45, 32.0),
        ("kodak", "phase3", 0.0035, 0.18, 29.4),
        ("kodak", "phase3", 0.013, 0.42, 32.5),
    ]
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
        cols += [
            f"task_weight_{t}"
            for t in ("s1_distortion", "s1_bpp", "s2_distortion", "s2_bpp", "s3_bpp")
        ]
        cols += ["scale_contribution_s1", "scale_contribution_s2", "scale_contribution_s3"]
    with open(run / "metrics.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(cols)
        for step in range(1, 21):
            values = {
                "step": step,
                "loss": 3.0 / step,
                "val_loss": 3.1 / step if step % 5 == 0 else "",
                "task_weight_distortion": 0.5,
                "task_weight_bpp": 0.5,
            }
            values.update({c: 0.2 for c in cols if c.startswith("task_weight_s")})
            values.update({c: 1 / 3 for c in cols if c.startswith("scale_contribution")})
            writer.writerow([values.get(c, "") for c in cols])


@pytest.fixture()
def captured(monkeypatch):
    figures = {}
    original = plots.save_figure

    def capture(fig, output_dir, stem):
        figures[stem] = [
            (
                ax.get_xlabel(),
                ax.get_ylabel(),
                [
                    (line.get_label(), line.get_color(), line.get_linestyle(), line.get_marker())
                    for line in ax.get_lines()
                ],
            )
            for ax in fig.axes
        ]
        figures[stem + ":suptitle"] = fig._suptitle.get_text() if fig._suptitle else ""
        return original(fig, output_dir, stem)

    monkeypatch.setattr(plots, "save_figure", capture)
    return figures


def test_all_figures_written_with_units_and_consistent_colours(tmp_path, captured):
    runs = tmp_path / "train"
    _run(runs, "baseline", 0.0035, False)
    _run(runs, "phase3", 0.0035, True)
    out = tmp_path / "plots"
    code = plots.main(
        [
            "all",
            "--points",
            str(_points(tmp_path / "points.csv")),
            "--runs",
            str(runs),
            "--output-dir",
            str(out),
            "--anchors",
            "vtm",
            "hpcm-base",
            "--total-epochs",
            "300",
        ]
    )
    assert code == 0
    for stem in (
        "rd_kodak_psnr",
        "training_lmbda0.0035",
        "task_weights_baseline_lmbda0.0035",
        "task_weights_scales_phase3_lmbda0.0035",
        "scale_contributions_phase3_lmbda0.0035",
        "gamma_schedules",
    ):
        for ext in ("png", "pdf"):
            assert (out / f"{stem}.{ext}").stat().st_size > 1000, stem
    assert not (out / "scale_contributions_baseline_lmbda0.0035.png").exists()
    scale_labels = [label for label, *_ in captured["task_weights_scales_phase3_lmbda0.0035"][0][2]]
    assert scale_labels == ["s1 distortion", "s1 bpp", "s2 distortion", "s2 bpp", "s3 bpp"]

    xlabel, ylabel, lines = captured["rd_kodak_psnr"][0]
    assert (xlabel, ylabel) == ("Rate (bpp, log scale)", "PSNR (dB)")
    styles = {label: (color, style, marker) for label, color, style, marker in lines}
    vtm, hpcm_base = (
        styles["VTM (CompressAI; version unrecorded) (published)"],
        styles["HPCM-Base (paper) (published)"],
    )
    assert vtm[1] != "-" and hpcm_base[1] != "-"  # anchors are never solid
    assert vtm[1:] != hpcm_base[1:]  # and each has its own dash pattern / marker
    assert styles["phase3"][1] == "-"
    training = {label: color for label, color, _, _ in captured["training_lmbda0.0035"][0][2]}
    assert styles["baseline"][0] != styles["phase3"][0]
    for variant in ("baseline", "phase3"):
        assert styles[variant][0] == training[f"{variant} train"]


def test_all_reads_every_run_once(tmp_path, monkeypatch):
    runs = tmp_path / "train"
    _run(runs, "baseline", 0.0035, False)
    _run(runs, "phase3", 0.0035, True)
    reads = []
    original = run_discovery.read_run_yaml
    monkeypatch.setattr(
        run_discovery, "read_run_yaml", lambda folder: reads.append(folder) or original(folder)
    )
    assert (
        plots.main(
            [
                "all",
                "--points",
                str(_points(tmp_path / "points.csv")),
                "--runs",
                str(runs),
                "--output-dir",
                str(tmp_path / "plots"),
                "--total-epochs",
                "20",
            ]
        )
        == 0
    )
    assert sorted(reads) == [runs / "baseline" / "lmbda0.0035", runs / "phase3" / "lmbda0.0035"]


def _config_variants() -> list[str]:
    import yaml

    config = yaml.safe_load((REPO / "config.yaml").read_text())
    names = list(config["variants"])
    for grid, spec in (config.get("grids") or {}).items():
        axes = spec["axes"]
        for values in itertools.product(*axes.values()):
            names.append(grid + "".join(f"-{k}{v:g}" for k, v in zip(axes, values)))
    return names


def test_no_two_config_variants_share_a_colour():
    names = _config_variants()
    assert {"phase3", "study1_s1", "study2_increasing"} <= set(names) and len(names) >= 12
    colors = plots.variant_colors(names)
    assert set(colors) == set(names)
    assert len(set(colors.values())) == len(names)
    assert not {"#7f7f7f", "#c7c7c7"} & set(colors.values())  # grey is the anchors' colour
    # Many more variants than the curated palette: still pairwise distinct.
    many = plots.variant_colors([f"v{i}" for i in range(60)])
    assert len(set(many.values())) == 60


def test_separate_calls_with_the_variant_list_colour_a_variant_alike(tmp_path, captured):
    runs = tmp_path / "train"
    _run(runs, "warmup", 0.0035, False)  # trained but never evaluated: only in the runs figures
    _run(runs, "phase3", 0.0035, True)
    order = ["warmup", "baseline", "phase3"]
    assert (
        plots.main(
            [
                "rd",
                "--points",
                str(_points(tmp_path / "points.csv")),
                "--output-dir",
                str(tmp_path / "a"),
                "--variants",
                *order,
            ]
        )
        == 0
    )
    assert (
        plots.main(
            ["runs", "--runs", str(runs), "--output-dir", str(tmp_path / "b"), "--variants", *order]
        )
        == 0
    )
    rd_colors = {label: color for label, color, _, _ in captured["rd_kodak_psnr"][0][2]}
    train = {label: color for label, color, _, _ in captured["training_lmbda0.0035"][0][2]}
    assert train["phase3 train"] == rd_colors["phase3"] == plots.variant_colors(order)["phase3"]
    assert train["warmup train"] not in (rd_colors["phase3"], rd_colors["baseline"])
    code = plots.main(
        ["runs", "--runs", str(runs), "--output-dir", str(tmp_path / "c"), "--variants", "baseline"]
    )
    assert code == 2  # a variant missing from the list would get no fixed colour


def test_gamma_figure_title_states_the_managers_initial_gammas(tmp_path, captured):
    plots.plot_gammas(tmp_path, total_epochs=20, initial_gammas=(0.01, 0.02, 0.03))
    assert "0.01 / 0.02 / 0.03" in captured["gamma_schedules:suptitle"]
    assert "0.008" not in captured["gamma_schedules:suptitle"]


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
