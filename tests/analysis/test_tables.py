"""Tables from a small synthetic set of run outputs (missing lambda, non-monotonic curve)."""

from __future__ import annotations

import csv
import math
import warnings
from pathlib import Path

import bjontegaard  # the pinned reference: missing, the suite must fail rather than skip
import numpy as np
import pytest

from hpcm.analysis import points as rd_points
from hpcm.analysis import rd, tables
from tests.paths import REPO, load_script

LAMBDAS = (0.0035, 0.013, 0.0483)
# (bpp, psnr) per lambda; the image-level rows below average exactly to these values.
CURVES = {
    "baseline": [(0.20, 29.0), (0.45, 32.0), (0.90, 35.0)],
    "phase1": [(0.19, 29.2), (0.43, 32.3), (0.88, 35.2)],
    "phase2": [(0.18, 29.3), (0.42, 32.4), (0.86, 35.4)],
    "phase3": [(0.17, 29.5), None, (0.85, 35.5)],  # missing lambda 0.013
    "study1_equal": [(0.19, 29.1), (0.44, 28.0), (0.90, 35.1)],  # non-monotonic
    "study1_s1": [(0.20, 29.0), None, None],  # a single point: no curve
}
ANALYSIS = {
    "reference": "baseline",
    "bd_method": "pchip",
    "anchors": [],
    "gains": {"phase1": "phase1", "phase2": "phase2", "phase3": "phase3"},
    "studies": {
        "study1": {
            "title": "Study 1: scale weights",
            "rows": {"equal": "study1_equal", "s1_emphasis": "study1_s1", "s2_emphasis": "phase3"},
        }
    },
}
OPTIMIZERS = {"baseline": "adam", "phase1": "balanced", "phase2": "balanced"}


def _val_losses(variant: str) -> list[float]:
    # Best 2.0 at epoch 5; 2.015 (within 1 %) first reached at epoch 4 for phase runs, 5 else.
    return (
        [10.0, 5.0, 3.0, 2.015, 2.0, 2.1]
        if variant.startswith("phase")
        else [10.0, 5.0, 3.0, 2.5, 2.0, 2.3]
    )


def _write_run(root: Path, variant: str, lmbda: float, seed: int) -> np.ndarray:
    run = root / variant / f"lmbda{lmbda}"
    run.mkdir(parents=True)
    optimizer = OPTIMIZERS.get(variant, "hierarchical_balanced")
    (run / "run.yaml").write_text(
        f"variant: {variant}\nlmbda: {lmbda}\noptimizer: {optimizer}\ndecomposition: measured\n"
        "scale_weights: [0.3, 0.4, 0.3]\ngammas: [0.008, 0.006, 0.004]\n"
    )
    rng = np.random.default_rng(seed)
    losses = 5.0 + rng.normal(0, 0.1, 60)
    vals = iter(_val_losses(variant))
    with open(run / "metrics.csv", "w", newline="") as handle:
        # Optional columns (task weights, gammas, ...) left out on purpose.
        writer = csv.writer(handle)
        writer.writerow(["step", "epoch", "lr", "loss", "val_loss", "skipped_steps", "step_time"])
        for step in range(1, 61):
            writer.writerow(
                [
                    step,
                    (step - 1) // 10 + 1,
                    1e-4,
                    losses[step - 1],
                    "",
                    1 if step > 30 and variant == "phase3" else 0,
                    0.5,
                ]
            )
            if step % 10 == 0:
                writer.writerow([step, step // 10, "", "", next(vals), "", ""])
    return losses


def _write_eval_csv(root: Path, variant: str, lmbda: float, bpp: float, psnr: float) -> Path:
    path = root / "eval" / "kodak" / variant / f"lmbda{lmbda}.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            ["image", "variant", "lmbda", "dataset", "bpp", "psnr", "ms_ssim", "decode_ok"]
        )
        for k, delta in enumerate((-0.25, 0.25)):  # two images around the point
            writer.writerow(
                [
                    f"img{k}.png",
                    variant,
                    lmbda,
                    "kodak",
                    bpp + delta * 0.1,
                    psnr + delta,
                    0.95,
                    True,
                ]
            )
    return path


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    eval_csvs, losses = [], {}
    for seed, (variant, points) in enumerate(CURVES.items()):
        for i, (lmbda, point) in enumerate(zip(LAMBDAS, points)):
            losses[(variant, lmbda)] = _write_run(root / "train", variant, lmbda, seed * 10 + i)
            if point is not None:
                eval_csvs.append(_write_eval_csv(root, variant, lmbda, *point))
    assert (
        rd.main(
            [
                "points",
                "--eval-csv",
                *map(str, eval_csvs),
                "--output",
                str(root / "points.csv"),
                "--curves-dir",
                str(root / "curves"),
            ]
        )
        == 0
    )
    bench = root / "bench" / "baseline"
    bench.mkdir(parents=True)
    for lmbda in LAMBDAS:
        (bench / f"lmbda{lmbda}.tsv").write_text(
            "s\th:m:s\tmax_rss\tmax_vms\n12.5\t0:00:12\t812.5\t2000\n"
        )
    config = root / "config.yaml"
    import yaml

    config.write_text(yaml.safe_dump({"analysis": ANALYSIS}))
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
                "--benchmarks",
                str(root / "bench"),
            ]
        )
        == 0
    )
    return {"root": root, "out": out, "losses": losses}


def _read(out: Path, name: str) -> list[dict]:
    with open(out / f"{name}.csv") as handle:
        return list(csv.DictReader(handle))


def _package_bd(variant: str, reference: str = "baseline") -> tuple[float, float]:
    ref = [p for p in CURVES[reference] if p]
    test = [p for p in CURVES[variant] if p]
    args = ([p[0] for p in ref], [p[1] for p in ref], [p[0] for p in test], [p[1] for p in test])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return (
            bjontegaard.bd_rate(*args, method="pchip", require_matching_points=False),
            bjontegaard.bd_psnr(*args, method="pchip", require_matching_points=False),
        )


def test_all_formats_written(synthetic):
    names = {p.name for p in synthetic["out"].iterdir()}
    for table in ("bd_vs_baseline", "expected_gains", "study1", "overhead"):
        assert {f"{table}.csv", f"{table}.md", f"{table}.tex"} <= names
    tex = (synthetic["out"] / "expected_gains.tex").read_text()
    assert r"\begin{tabular}" in tex and "phase1" in tex
    md = (synthetic["out"] / "study1.md").read_text()
    assert "| config |" in md and "n/a" in md


def test_bd_vs_baseline_equals_package_on_the_measured_points(synthetic):
    rows = {r["variant"]: r for r in _read(synthetic["out"], "bd_vs_baseline")}
    for variant in ("phase1", "phase2", "phase3"):
        expected_rate, expected_psnr = _package_bd(variant)
        assert float(rows[variant]["BD-rate (%)"]) == pytest.approx(expected_rate, abs=1e-6)
        assert float(rows[variant]["BD-PSNR (dB)"]) == pytest.approx(expected_psnr, abs=1e-6)
    assert rows["phase3"]["n_test"] == "2"  # the missing lambda leaves two points


def test_invalid_curves_are_na_with_the_reason(synthetic):
    rows = {r["variant"]: r for r in _read(synthetic["out"], "bd_vs_baseline")}
    assert rows["study1_equal"]["BD-rate (%)"] == ""  # NaN in the CSV
    md = (synthetic["out"] / "bd_vs_baseline.md").read_text()
    assert "kodak/study1_equal" in md and "not monotonic" in md
    assert "kodak/study1_s1" in md and "needs at least 2" in md


def test_expected_gains_convergence_epoch(synthetic):
    rows = {r["phase"]: r for r in _read(synthetic["out"], "expected_gains")}
    assert float(rows["phase1"]["convergence epoch"]) == 4.0
    assert float(rows["baseline"]["convergence epoch"]) == 5.0
    # The reference row is computed like the others (its curve against itself).
    ref_rate, ref_psnr = _package_bd("baseline", "baseline")
    assert float(rows["baseline"]["BD-rate (%)"]) == pytest.approx(ref_rate, abs=1e-9)
    assert float(rows["baseline"]["BD-PSNR (dB)"]) == pytest.approx(ref_psnr, abs=1e-9)
    assert float(rows["phase1"]["BD-rate (%)"]) == pytest.approx(_package_bd("phase1")[0], abs=1e-6)
    assert float(rows["phase2"]["BD-PSNR (dB)"]) == pytest.approx(
        _package_bd("phase2")[1], abs=1e-6
    )
    assert rows["phase3"]["lambdas"] == "2"


def test_study_stability_figures(synthetic):
    rows = {r["config"]: r for r in _read(synthetic["out"], "study1")}
    # Independent CV: the last 10 % of the 60 steps -> steps >= 54.1 -> steps 55..60.
    cvs = []
    for lmbda in LAMBDAS:
        tail = synthetic["losses"][("phase3", lmbda)][54:]
        cvs.append(np.std(tail, ddof=1) / np.mean(tail))
    # The runs log no loss_std: the column says it is the CoV of the logged rows.
    assert float(rows["s2_emphasis"][tables.LOGGED_CV]) == pytest.approx(np.mean(cvs))
    assert "MEAN over log_every steps" in (synthetic["out"] / "study1.md").read_text()
    assert float(rows["s2_emphasis"]["skipped steps"]) == 3.0  # 1 per run, 3 lambdas
    assert float(rows["equal"]["skipped steps"]) == 0.0


def _windows(losses: np.ndarray, every: int, with_std: bool, with_count: bool = False):
    """metrics.csv rows as hpcm.train logs them: per-window mean (and std, ddof=0)."""
    import pandas as pd

    rows = []
    for end in range(every, losses.size + 1, every):
        window = losses[end - every : end]
        row = {"step": end, "epoch": 1, "loss": window.mean(), "val_loss": np.nan}
        if with_std:
            row["loss_std"] = window.std()
        if with_count:
            row["loss_steps"] = every
        rows.append(row)
    return pd.DataFrame(rows)


@pytest.mark.parametrize("with_count", [False, True])
def test_loss_cv_pools_per_step_statistics_exactly(with_count):
    losses = 4.0 + np.random.default_rng(3).normal(0, 0.2, 200)
    result = tables.loss_cv(_windows(losses, 5, True, with_count))
    # Windows ending at step >= 200 - 0.1 * 195 = 180.5: 185..200, i.e. steps 181..200.
    tail = losses[180:]
    assert result.per_step and result.note == ""
    assert result.value == pytest.approx(np.std(tail, ddof=1) / np.mean(tail), rel=1e-9)
    logged = tables.loss_cv(_windows(losses, 5, True), use_per_step=False)
    means = losses[180:].reshape(4, 5).mean(1)
    assert not logged.per_step
    assert logged.value == pytest.approx(np.std(means, ddof=1) / np.mean(means), rel=1e-9)
    assert logged.value < result.value  # window means hide the per-step spread


def test_loss_cv_with_too_few_tail_rows_is_nan_with_a_reason():
    losses = 4.0 + np.random.default_rng(4).normal(0, 0.2, 100)
    result = tables.loss_cv(_windows(losses, 5, False))  # tail: steps >= 90.5 -> 2 rows
    assert math.isnan(result.value) and not result.per_step
    assert "only 2 logged row(s) in the last 10% of steps (need 3)" in result.note


def test_study_column_is_per_step_only_when_every_run_logged_loss_std(tmp_path, synthetic):
    runs = tables.load_runs(synthetic["root"] / "train")
    assert not runs["loss_cv_per_step"].any()
    points = rd_points.read_points(synthetic["root"] / "points.csv")
    spec = {"s2_emphasis": "phase3", "reference": "baseline"}
    table = tables.study_table("s", "S", spec, points, runs, "baseline", "pchip", "psnr")
    assert tables.LOGGED_CV in table.frame.columns and tables.PER_STEP_CV not in table.frame
    # A study row naming the reference is measured like the others (its curve against itself).
    reference_row = table.frame[table.frame["config"] == "reference"].iloc[0]
    assert reference_row["BD-rate (%)"] == pytest.approx(
        _package_bd("baseline", "baseline")[0], abs=1e-9
    )
    # Give phase3's runs per-step statistics: the column switches to the per-step CoV.
    for lmbda in LAMBDAS:
        run = tmp_path / "train" / f"lmbda{lmbda}"
        run.mkdir(parents=True)
        (run / "run.yaml").write_text(f"variant: phase3\nlmbda: {lmbda}\n")
        frame = _windows(synthetic["losses"][("phase3", lmbda)], 2, True)
        frame.to_csv(run / "metrics.csv", index=False)
    runs = tables.load_runs(tmp_path / "train")
    table = tables.study_table("s", "S", spec, points, runs, "baseline", "pchip", "psnr")
    # Windows of 2 steps ending at >= 60 - 0.1 * 58: steps 55..60 of each run's losses.
    expected = np.mean(
        [
            np.std(synthetic["losses"][("phase3", lm)][54:], ddof=1)
            / np.mean(synthetic["losses"][("phase3", lm)][54:])
            for lm in LAMBDAS
        ]
    )
    assert table.frame[tables.PER_STEP_CV].iloc[0] == pytest.approx(expected)


def test_overhead_table(synthetic):
    rows = {r["optimizer"]: r for r in _read(synthetic["out"], "overhead")}
    assert float(rows["adam"]["time per step (s)"]) == pytest.approx(0.5)
    assert float(rows["adam"]["peak memory (MB)"]) == pytest.approx(812.5)
    assert float(rows["balanced"]["time vs adam"]) == pytest.approx(1.0)
    assert rows["hierarchical_balanced"]["decomposition"] == "measured"
    assert math.isnan(float(rows["balanced"]["peak memory (MB)"] or "nan"))


def test_missing_required_metrics_column(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    (run / "metrics.csv").write_text("step,epoch,loss\n1,1,2.0\n")
    with pytest.raises(
        tables.TableError,
        match=r"metrics.csv: missing required column\(s\) "
        r"\['val_loss'\]",
    ):
        tables.read_metrics(run / "metrics.csv")


def test_points_and_curves_follow_compressai_aggregation(synthetic):
    from compressai.utils.plot.__main__ import parse_json_file

    points = rd_points.read_points(synthetic["root"] / "points.csv")
    phase3 = points[points["variant"] == "phase3"].sort_values("bpp")
    # Two images at psnr -/+ 0.25 dB and bpp -/+ 0.025 average back to the curve's point.
    assert phase3["psnr"].tolist() == pytest.approx([29.5, 35.5])
    assert phase3["bpp"].tolist() == pytest.approx([0.17, 0.85])
    assert phase3["n_images"].tolist() == [2, 2]
    assert (phase3["source_sha256"].str.len() == 64).all()
    parsed = parse_json_file(synthetic["root"] / "curves" / "kodak" / "phase3.json", "psnr")
    assert parsed["name"] == "phase3"
    assert parsed["xs"] == pytest.approx([0.17, 0.85]) and parsed["ys"] == pytest.approx(
        [29.5, 35.5]
    )


def test_overhead_from_the_step_benchmark(tmp_path):
    """The table reads what the benchmark writes: its own json_document, not a hand-made file."""
    import argparse
    import json

    benchmark = load_script(REPO / "benchmarks" / "optimizer_overhead.py")
    table = benchmark.variants("next_batch")
    rounds = {
        "adam": [0.20, 0.40],
        "balanced next_batch": [0.21, 0.40],
        "hier measured next_batch": [0.22, 0.40],
    }
    results = {
        name: {"rounds_s": r, "median_s": sum(r) / 2, "min_s": min(r), "peak_mb": 100.0 + i}
        for i, (name, r) in enumerate(rounds.items())
    }
    args = argparse.Namespace(model="HPCM_Tiny", batch_size=2, patch_size=64, rounds=2, steps=1)
    path = tmp_path / "overhead.json"
    path.write_text(json.dumps(benchmark.json_document(results, table, {}, args, "cpu")))
    frame = tables.overhead_from_benchmark(path).frame.set_index("optimizer")
    assert frame.loc["balanced", "update mode"] == "next_batch"
    assert frame.loc["hierarchical_balanced", "decomposition"] == "measured"
    # the paired ratio: median of 0.22/0.20 and 0.40/0.40 (the ratio of the medians is 0.31/0.30)
    assert frame.loc["hierarchical_balanced", "time vs adam"] == pytest.approx((1.1 + 1.0) / 2)
    assert frame.loc["balanced", "time vs adam"] == pytest.approx((1.05 + 1.0) / 2)
    assert frame.loc["balanced", "peak memory (MB)"] == 101.0
    doc = json.loads(path.read_text())
    del doc["variants"]["adam"]["peak_mb"]
    path.write_text(json.dumps(doc))
    with pytest.raises(tables.TableError, match=r"'adam' lacks \['peak_mb'\]"):
        tables.overhead_from_benchmark(path)
    path.write_text(json.dumps({"adam": {"median_s": 0.2}}))  # the old, unlabelled layout
    with pytest.raises(tables.TableError, match="not an optimizer_overhead.py --json file"):
        tables.overhead_from_benchmark(path)


def test_phase4_keys_in_words():
    assert (
        tables.phase4_summary({"group_lr": {"transforms": 1.0, "hyperprior": 0.5, "context": 0.1}})
        == "lr x hyperprior 0.5, context 0.1"
    )
    assert (
        tables.phase4_summary(
            {
                "freeze": ["hyperprior"],
                "unfreeze_schedule": {"context": 0.4},
                "scale_early_stop_patience": 2,
            }
        )
        == "frozen: hyperprior; unfrozen at: context 0.4; scale early stop after 2 validations"
    )
    assert (
        tables.phase4_summary(
            {"group_lr": {"context": 1.0}, "freeze": [], "scale_early_stop_patience": 0}
        )
        == ""
    )


# ------------------------------------------------------------------------------ the table registry

REPORT = REPO / "workflow" / "report"


def test_the_command_writes_exactly_the_registered_names(synthetic):
    """What the workflow expects (table_names) is what the command wrote, file for file."""
    written = {p.stem for p in synthetic["out"].iterdir()}
    assert written == set(tables.table_names(ANALYSIS))
    assert tables.table_names(ANALYSIS) == [
        "bd_vs_baseline",
        "expected_gains",
        "study1",
        "overhead",
    ]


def test_table_names_follow_the_analysis_section():
    analysis = {
        "reference": "phase1",
        "anchors": ["vtm", "hpcm-base"],
        "gains": {},
        "studies": {"s1": {"rows": {}}, "s2": {"rows": {}}},
        "overhead_json": "x.json",
    }
    assert tables.table_names(analysis) == [
        "bd_vs_phase1",
        "bd_vs_anchor-vtm",
        "bd_vs_anchor-hpcm-base",
        "s1",
        "s2",
        "overhead",
        "overhead_benchmark",
    ]


def test_every_registered_caption_exists_and_every_caption_is_registered():
    captions = {kind.caption for kind in tables.TABLES.values()}
    assert all((REPORT / caption).is_file() for caption in captions), captions
    assert {p.name for p in REPORT.glob("table_*.rst")} == captions


def test_a_kind_registers_once_and_a_builder_must_match_its_names(tmp_path, synthetic, monkeypatch):
    monkeypatch.setattr(tables, "TABLES", dict(tables.TABLES))
    with pytest.raises(ValueError, match="'overhead' is registered twice"):
        tables.register_table("overhead", caption="table_overhead.rst")(lambda inputs: [])

    @tables.register_table("extra", caption="table_overhead.rst")
    def _wrong_name(inputs):
        return [tables.Table("not_extra", "t", inputs.runs.head(1), {}, [])]

    with pytest.raises(RuntimeError, match=r"'extra' built \['not_extra'\], declared \['extra'\]"):
        tables.build_all(
            synthetic["root"] / "points.csv", synthetic["root"] / "train", ANALYSIS, tmp_path
        )


def test_a_registered_table_is_written_and_named_for_the_workflow(tmp_path, synthetic, monkeypatch):
    """Adding a table is one decorated builder: the command writes it, table_names lists it."""
    monkeypatch.setattr(tables, "TABLES", dict(tables.TABLES))

    @tables.register_table("run_count", caption="table_overhead.rst")
    def _run_count(inputs):
        frame = inputs.runs.groupby("variant").size().rename("runs").reset_index()
        return [tables.Table("run_count", "Runs per variant", frame, {}, [])]

    tables.build_all(
        synthetic["root"] / "points.csv", synthetic["root"] / "train", ANALYSIS, tmp_path
    )
    assert tables.table_names(ANALYSIS)[-1] == "run_count"
    rows = {r["variant"]: int(r["runs"]) for r in _read(tmp_path, "run_count")}
    assert rows == {variant: len(LAMBDAS) for variant in CURVES}
