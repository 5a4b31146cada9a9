"""hpcm.config.study: the study's distortion, its analysis metric, the MS-SSIM crop limit, the
printed training cost (recomputed here by hand) and the official-checkpoint checks of the DAG."""

from __future__ import annotations

import pytest

from hpcm.config import run_config, study
from tests.config.test_study import load, small


def test_distortion_reaches_every_run_and_sets_the_metric():
    mse = load(small())
    assert mse.config["distortion"] == "mse" and mse.metric == "psnr"
    assert mse.run_config("phase1", "0.0067", 0, [])["distortion"] == "mse"
    ssim = load(small(distortion="ms_ssim", lambdas=[2.4, 8.73], training={"patch_size": 192}))
    assert ssim.metric == "ms_ssim_db"
    run = ssim.run_config("baseline", "8.73", 0, [])
    assert (
        run["distortion"] == "ms_ssim"
        and run_config.resolve({**run, "train_data": "samples", "val_data": "samples"}).distortion
        == "ms_ssim"
    )
    explicit = load(
        small(
            distortion="ms_ssim",
            training={"patch_size": 192},
            analysis={"gains": {}, "metric": "psnr"},
        )
    )
    assert explicit.metric == "psnr"  # the user's choice wins over the default


def test_ms_ssim_studies_refuse_crops_below_161_px():
    with pytest.raises(
        study.StudyConfigError,
        match="config key 'training.patch_size': 128 is too small for distortion ms_ssim",
    ):
        load(small(distortion="ms_ssim", training={"patch_size": 128}))
    variants = {"baseline": {"optimizer": "adam", "patch_size": 64}}
    with pytest.raises(study.StudyConfigError, match="config key 'variants.baseline.patch_size'"):
        load(small(distortion="ms_ssim", training={"patch_size": 256}, variants=variants))
    with pytest.raises(study.StudyConfigError, match="config key 'distortion'"):
        load(small(distortion="ssim"))


def test_the_price_is_runs_times_steps_over_the_rate():
    cfg = small(
        seeds=[0, 1],
        training={"steps": 36000},
        compute={"train": {"steps_per_s": {"adam": 10.0, "balanced": 5.0}}},
    )
    rows = {r["variant"]: r for r in load(cfg).training_cost()}
    # 2 lambdas x 2 seeds = 4 runs of 36,000 steps: adam 4 * 3600 s = 4 h, balanced 8 h
    assert rows["baseline"]["hours"] == pytest.approx(4.0) and rows["phase1"][
        "hours"
    ] == pytest.approx(8.0)
    assert rows["phase1"]["source"] == "compute.train.steps_per_s.balanced"
    report = load(cfg).cost_report()
    assert "total: 8 runs, 288000 steps, 12.0 CPU-hours (0.5 device-days)" in report
    assert "the default is a GPU rate" not in report
    one = load(small(device="cuda", compute={"train": {"steps_per_s": 2.0}}))
    assert {r["steps_per_s"] for r in one.training_cost()} == {
        2.0
    } and "GPU-hours" in one.cost_report()
    # a job on 4 GPUs at 2 steps/s (its own rate, all GPUs together) costs 4x its wall time
    four = load(small(device="cuda", compute={"train": {"steps_per_s": 2.0, "gpus": 4}}))
    assert [r["hours"] for r in four.training_cost()] == pytest.approx(
        [4 * h["hours"] for h in one.training_cost()]
    )
    default = load(small())
    assert {r["steps_per_s"] for r in default.training_cost()} == {study.DEFAULT_STEPS_PER_S}
    assert (
        "the default is a GPU rate" in default.cost_report()
    )  # a CPU study priced at a GPU rate says so


def test_a_per_optimizer_rate_must_cover_every_optimizer():
    with pytest.raises(
        study.StudyConfigError,
        match="config key 'compute.train.steps_per_s': no entry for "
        "optimizer 'balanced' \\(variant phase1\\)",
    ):
        load(small(compute={"train": {"steps_per_s": {"adam": 10.0}}}))
    with pytest.raises(study.StudyConfigError, match="compute.train.steps_per_s"):
        load(small(compute={"train": {"steps_per_s": {"sgd": 1.0}}}))
    with pytest.raises(study.StudyConfigError, match="compute.train.steps_per_s"):
        load(small(compute={"train": {"steps_per_s": 0}}))


def test_runs_from_official_checkpoints_wait_for_their_check(tmp_path):
    weights = tmp_path / "w.pt"
    cfg = small(
        variants={
            "baseline": {"optimizer": "adam", "init_from": "official"},
            "phase1": {"optimizer": "balanced", "init_from": "baseline"},
        },
        official_checkpoints=[
            {"lmbda": 0.0018, "path": str(weights)},
            {"lmbda": 0.0067, "path": str(weights)},
        ],
    )
    s = load(cfg)
    assert s.checked_init("baseline", "0.0067") == ["results/checks/official/lmbda0.0067.json"]
    assert (
        s.checked_init("phase1", "0.0067") == []
    )  # starts from the baseline run, not a released file
