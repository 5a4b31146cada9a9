"""The pilot study's DAG in miniature (workflow/configs/pilot.yaml with 2 variants, 2 seeds, 4
lambdas, 4 steps with a snapshot at step 2, 2 small test images): every run is trained from
scratch, its snapshot and final weights are evaluated with real bitstreams, and the seed-aware
BD table and the convergence table have a row for every variant (and step). Runs
`snakemake --cores 2` in a temporary directory with wandb disabled; the statistics themselves are
tested in tests/analysis/test_seed_interval.py."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests.workflow.test_dag import ROOT, snakemake
from tests.workflow.test_e2e import write_eval_crops

PILOT = ROOT / "workflow" / "configs" / "pilot.yaml"
VARIANTS = ["baseline", "phase1"]
SEEDS = [0, 1]
# wide apart, so that 4 steps from scratch already order the curves (rate and PSNR rise with lambda)
LAMBDAS = [0.0001, 0.01, 1.0, 100.0]


def mini_pilot(crops: Path) -> dict:
    cfg = yaml.safe_load(PILOT.read_text())
    cfg["lambdas"], cfg["seeds"] = LAMBDAS, SEEDS
    cfg["variants"] = {name: cfg["variants"][name] for name in VARIANTS}
    # the dataset keeps its name, so that convergence.dataset still points at it
    cfg["datasets"] = {cfg["convergence"]["dataset"]: {"kind": "folder", "source": str(crops)}}
    cfg["convergence"]["images"] = 2
    cfg["training"].update(
        steps=4, batch_size=2, snapshot_every=2, val_every=4, checkpoint_every=4, log_every=1
    )
    cfg["analysis"]["gains"] = {"phase1": "phase1"}
    return cfg


@pytest.fixture(scope="module")
def finished_pilot(tmp_path_factory) -> Path:
    workdir = tmp_path_factory.mktemp("pilot")
    write_eval_crops(workdir / "all_crops")
    (workdir / "crops").mkdir()
    for name in sorted(p.name for p in (workdir / "all_crops").iterdir())[:2]:  # 2 test images
        (workdir / "all_crops" / name).rename(workdir / "crops" / name)
    config = yaml.safe_dump(mini_pilot(workdir / "crops"), sort_keys=False)
    (workdir / "pilot.yaml").write_text(config)
    # a hang guard, not a speed check: 5.5 min on a quiet 2-core machine, 14.5 min measured with
    # two VTM encodes running beside the suite
    result = snakemake("--cores", "2", "--configfile", "pilot.yaml", cwd=workdir, timeout=1800)
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-5000:]
    assert "CPU-hours" in result.stderr, "the study's price is printed before it starts"
    return workdir


def test_every_run_trains_from_scratch_and_keeps_its_snapshot(finished_pilot):
    for variant in VARIANTS:
        for lmbda in LAMBDAS:
            for seed in SEEDS:
                name = f"{variant}/lmbda{lmbda:g}"
                run = finished_pilot / "results" / "train" / name / f"seed{seed}"
                assert (run / "done").is_file() and (run / "epoch_2.pth.tar").is_file()
                run_yaml = finished_pilot / "results" / "configs" / name / f"seed{seed}.yaml"
                config = yaml.safe_load(run_yaml.read_text())
                assert config["init_checkpoint"] is None


def test_seed_table_has_every_variant_with_both_seeds(finished_pilot):
    table = pd.read_csv(  # "n/a" is a value of the table, not a missing one
        finished_pilot / "results" / "tables" / "bd_seeds_vs_baseline.csv", keep_default_na=False
    )
    assert list(table["variant"]) == ["phase1"]
    row = table.iloc[0]
    assert row["n_seeds"] == 2 and row["n_images"] == 2
    per_seed = row["per-seed BD-rate (%)"]
    assert per_seed.startswith("s0: ") and ", s1: " in per_seed
    for column in ("BD-rate (%)", "CI low (%)", "CI high (%)", "seed SD (%)", "dof"):
        assert column in table.columns
    assert row["CI excludes 0"] in ("yes", "no", "")  # empty: no BD yet (the notes say why)
    markdown = (finished_pilot / "results" / "tables" / "bd_seeds_vs_baseline.md").read_text()
    assert "Welch-Satterthwaite" in markdown


def test_convergence_table_has_every_step_and_plot(finished_pilot):
    table = pd.read_csv(finished_pilot / "results" / "tables" / "convergence.csv")
    # step 2 (snapshot, subset), step 4 on the subset and step 4 on every image
    assert sorted(zip(table["step"], table["images"])) == [
        (2, "first 2 images"),
        (4, "all 2 images"),
        (4, "first 2 images"),
    ]
    assert set(table["variant"]) == {"phase1"} and set(table["n_seeds"]) == {2}
    assert set(table["interval"]) == {"seeds and images"}
    assert (finished_pilot / "results" / "plots" / "convergence.png").stat().st_size > 0
    snapshot = (
        finished_pilot
        / "results"
        / "eval_snapshots"
        / "kodak"
        / "phase1"
        / "lmbda1"
        / "seed1"
        / "step2.csv"
    )
    assert len(pd.read_csv(snapshot)) == 2
