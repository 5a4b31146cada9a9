"""The study keys of the pilot (issue 23): `convergence` (snapshot evaluations), `control` (the warm
starts evaluated untrained), `training.settings` / snapshot keys, and the seed table's name."""

from __future__ import annotations

import pytest
import yaml

from hpcm.analysis.tables import analysis_section, table_names
from hpcm.config import study
from tests.config.test_study import DEMO, load, small
from tests.paths import REPO

PILOT = yaml.safe_load((REPO / "workflow" / "configs" / "pilot.yaml").read_text())


def with_training(cfg: dict, **keys) -> dict:
    cfg.setdefault("training", {}).update(keys)
    return cfg


def test_pilot_config_loads_from_scratch_with_its_grid():
    s = load(PILOT)
    assert list(s.variants) == ["baseline", "phase1", "phase3"]
    assert len(s.lambdas) >= 4 and len(s.seeds) >= 3
    assert all(s.init_checkpoint(v, lmbda, 0) == [] for v in s.variants for lmbda in s.lambdas)
    steps = PILOT["training"]["steps"]
    assert s.convergence_steps() == [steps // 4, steps // 2, 3 * steps // 4]
    assert f"bd_seeds_vs_{PILOT['analysis']['reference']}" in table_names(analysis_section(PILOT))
    assert "CPU-hours" in s.cost_report()


def test_snapshot_paths_one_per_step():
    cfg = small(seeds=[0, 1], convergence={"dataset": "samples", "images": 2})
    cfg = with_training(cfg, steps=8, snapshot_every=2)
    s = load(cfg)
    assert s.convergence_steps() == [2, 4, 6]
    assert s.snapshot_csvs("phase1", "0.0018", 1) == [
        f"results/eval_snapshots/samples/phase1/lmbda0.0018/seed1/step{k}.csv" for k in (2, 4, 6)
    ]
    assert len(s.all_snapshot_csvs()) == 2 * 2 * 2 * 3
    assert study.PATHS["snapshot_eval_csv"].startswith("results/eval_snapshots/")


@pytest.mark.parametrize(
    "changes, key, words",
    [
        ({"training": {"steps": 8}}, "training.snapshot_every", "snapshots before the last step"),
        (
            {"training": {"steps": 8, "snapshot_every": 8}},
            "training.snapshot_every",
            "before the last step",
        ),
        (
            {"training": {"steps": 8, "snapshot_every": 2, "snapshot_keep": 1}},
            "training.snapshot_keep",
            "keep all",
        ),
        (
            {"training": {"steps": 8, "snapshot_every": 2}, "convergence": {"dataset": "kodak"}},
            "convergence.dataset",
            "not a configured dataset",
        ),
    ],
)
def test_convergence_errors_name_the_key(changes, key, words):
    cfg = small(convergence={"dataset": "samples"})
    cfg.update(changes)
    with pytest.raises(study.StudyConfigError, match=words) as err:
        load(cfg)
    assert err.value.key == key


def test_convergence_needs_one_step_count():
    cfg = with_training(small(convergence={"dataset": "samples"}), steps=8, snapshot_every=2)
    cfg["variants"]["phase1"]["steps"] = 4
    with pytest.raises(study.StudyConfigError) as err:
        load(cfg)
    assert err.value.key == "variants.phase1.steps"


def test_control_rows_of_the_demo():
    s = load(DEMO)
    assert DEMO["control"] is True
    controls = s.control_csvs()
    assert controls == [
        f"results/eval/samples/{study.CONTROL_VARIANT}/lmbda{lmbda}/seed0.csv"
        for lmbda in s.lambdas
    ]
    assert set(controls) <= set(s.eval_csvs())


def test_control_needs_an_official_checkpoint_per_lambda():
    with pytest.raises(
        study.StudyConfigError, match="official_checkpoints entry for lambda 0.0018"
    ) as err:
        load(small(control=True))
    assert err.value.key == "control"


def test_control_name_cannot_be_a_variant():
    cfg = small(
        control=True,
        official_checkpoints=[{"lmbda": 0.0018, "path": "a.pt"}, {"lmbda": 0.0067, "path": "b.pt"}],
    )
    cfg["variants"][study.CONTROL_VARIANT] = {"optimizer": "adam"}
    with pytest.raises(study.StudyConfigError) as err:
        load(cfg)
    assert err.value.key == f"variants.{study.CONTROL_VARIANT}"


def test_training_settings_reach_every_run_and_are_checked():
    s = load(with_training(small(), settings={"compile": False}, snapshot_every=5, snapshot_keep=2))
    settings = s.runtime_settings("phase1")
    assert settings["compile"] is False
    assert settings["snapshot_every"] == 5 and settings["snapshot_keep"] == 2
    with pytest.raises(study.StudyConfigError, match="no_such_key"):
        load(with_training(small(), settings={"no_such_key": 1}))
    with pytest.raises(study.StudyConfigError) as err:  # what to train stays in the run YAML
        load(with_training(small(), settings={"lr": 1.0}))
    assert err.value.key == "training.settings.lr"


def test_one_seed_has_no_seed_table():
    names = table_names(analysis_section(small()))
    assert names and not any(name.startswith("bd_seeds_vs_") for name in names)
