"""hpcm.config.study on its own (no Snakemake): variants, paths, run YAMLs and every config
check."""

from __future__ import annotations

import copy

import pytest
import yaml

from hpcm.config import run_config, study
from hpcm.data.datasets import dataset_options
from hpcm.models.presets import preset_config
from tests.paths import REPO

SCHEMA = REPO / "workflow" / "schemas" / "config.schema.yaml"
DEMO = yaml.safe_load((REPO / "config.yaml").read_text())
PAPER = yaml.safe_load((REPO / "workflow" / "configs" / "paper.yaml").read_text())


def pad_multiple_of(name: str) -> int:
    return preset_config(name).pad_multiple


def load(cfg: dict) -> study.Study:
    return study.load(copy.deepcopy(cfg), SCHEMA, pad_multiple_of, dataset_kinds=dataset_options())


def small(**changes) -> dict:
    """A minimal valid config (schema defaults fill in the rest)."""
    cfg = {
        "model": "HPCM_Tiny",
        "lambdas": [0.0018, 0.0067],
        "variants": {
            "baseline": {"optimizer": "adam"},
            "phase1": {"optimizer": "balanced", "gamma": 0.003},
        },
        "analysis": {"gains": {}},
    }
    cfg.update(changes)
    return cfg


def test_key_tables_name_run_config_keys():
    keys = (
        set(study.VARIANT_RUN_KEYS)
        | set(study.TRAINING_RUN_KEYS)
        | set(study.TRAINING_RUNTIME_KEYS)
    )
    assert keys <= set(run_config.KEYS), keys - set(run_config.KEYS)
    assert "seed" not in keys  # set per run from the study's `seeds`


def test_paper_and_demo_resolve_with_one_seed():
    paper = load(PAPER)
    assert (
        paper.seeds == [0] and len(paper.variants) == 29 and len(paper.runs()) == 29 * 6
    )  # 12 grid points, 5 Phase 4
    demo = load(DEMO)
    assert demo.seeds == [0]
    assert all(run.seed == 0 for run in demo.runs())


@pytest.mark.parametrize(
    "config_file", sorted((REPO / "workflow" / "configs").glob("*.yaml")), ids=lambda p: p.name
)
def test_every_shipped_study_config_resolves(config_file):
    """A study config that no test loads goes stale when the schema changes (pretrain.yaml still
    had training.seed after `seeds` replaced it, and failed only when a user ran it)."""
    cfg = yaml.safe_load(config_file.read_text())
    assert load(cfg).runs(), f"{config_file.name} resolves to no runs"


def test_seeds_repeat_every_variant_and_lambda_with_their_own_paths(tmp_path):
    s = load(small(seeds=[0, 1, 2], train_data=str(tmp_path), val_data=str(tmp_path)))
    assert len(s.runs()) == 2 * 2 * 3
    assert study.Run("phase1", "0.0067", 2) in s.runs()
    assert (
        study.path("run_dir", variant="phase1", lmbda="0.0067", seed=2)
        == "results/train/phase1/lmbda0.0067/seed2"
    )
    csvs = s.eval_csvs()
    assert (
        "results/eval/samples/baseline/lmbda0.0018/seed1.csv" in csvs
        and len(csvs) == len(set(csvs)) == 12
    )
    assert len(set(s.done_markers())) == 12
    cfg = s.run_config("phase1", "0.0067", "2", [])
    assert (cfg["variant"], cfg["lmbda"], cfg["seed"], cfg["gamma"], cfg["init_checkpoint"]) == (
        "phase1",
        0.0067,
        2,
        0.003,
        None,
    )
    # every key of the run YAML is a run-config key, and the trainer accepts the file as it is
    assert set(cfg) <= set(run_config.KEYS)
    assert run_config.resolve(cfg).seed == 2


def test_init_from_uses_the_same_lambda_and_seed():
    s = load(
        small(
            seeds=[0, 1],
            variants={
                "baseline": {"optimizer": "adam"},
                "tuned": {"optimizer": "balanced", "init_from": "baseline"},
            },
        )
    )
    assert s.init_checkpoint("tuned", "0.0067", 1) == [
        "results/train/baseline/lmbda0.0067/seed1/final.pth.tar"
    ]
    assert s.init_checkpoint("baseline", "0.0067", 1) == []
    official = load(
        small(
            variants={
                "baseline": {"optimizer": "adam"},
                "ft": {"optimizer": "adam", "init_from": "official"},
            },
            official_checkpoints=[
                {"lmbda": 0.0018, "path": "a.pth"},
                {"lmbda": 0.0067, "path": "b.pth"},
            ],
        )
    )
    assert official.init_checkpoint("ft", "0.0067", 0) == ["b.pth"]


def test_extends_presets_and_grids():
    s = load(
        small(
            variants={
                "baseline": {"optimizer": "adam"},
                "named": {"optimizer": "hierarchical_balanced", "scale_weights": "equal"},
                "child": {"extends": "named", "gammas": "increasing", "steps": 7},
            },
            grids={
                "g": {
                    "base": {"extends": "child"},
                    "axes": {"gamma": [0.001, 0.002], "w_lr": [0.01]},
                }
            },
        )
    )
    assert s.variants["child"] == {
        "description": "",
        "optimizer": "hierarchical_balanced",
        "scale_weights": [0.33, 0.33, 0.34],
        "gammas": [0.004, 0.006, 0.008],
        "steps": 7,
    }
    assert set(s.variants) == {
        "baseline",
        "named",
        "child",
        "g-gamma0.001-w_lr0.01",
        "g-gamma0.002-w_lr0.01",
    }
    assert (
        s.variants["g-gamma0.002-w_lr0.01"]["gamma"] == 0.002
        and s.variants["g-gamma0.002-w_lr0.01"]["steps"] == 7
    )


def test_schema_defaults_are_filled_in():
    cfg = small()
    study.validate(cfg, SCHEMA)
    assert (
        cfg["seeds"] == [0]
        and cfg["training"]["patch_size"] == 64
        and cfg["datasets"]
        == {
            "samples": {
                "kind": "samples",
                "source": None,
                "only": [],
                "description": "",
                "anchors": {},
            }
        }
    )


def error_of(cfg: dict) -> str:
    with pytest.raises(study.StudyConfigError) as info:
        load(cfg)
    return str(info.value)


def test_two_lambdas_with_one_folder_are_an_error_naming_both():
    message = error_of(small(lambdas=[0.0018, 0.0067, 0.00670000001]))
    assert message.startswith("config key 'lambdas.2'")
    assert "lambdas[1] = 0.0067" in message and "lambdas[2] = 0.00670000001" in message
    assert "lmbda0.0067" in message


def test_two_grid_points_or_a_grid_point_and_a_variant_with_one_folder_are_an_error_naming_both():
    message = error_of(
        small(
            grids={
                "g": {
                    "base": {"optimizer": "balanced"},
                    "axes": {"gamma": [0.003, 0.00300000000001]},
                }
            }
        )
    )
    assert "config key 'grids.g'" in message and "{'gamma': 0.003}" in message
    assert "{'gamma': 0.00300000000001}" in message and "'g-gamma0.003'" in message
    variants = {"baseline": {"optimizer": "adam"}, "g-gamma0.003": {"optimizer": "adam"}}
    message = error_of(
        small(
            variants=variants,
            grids={"g": {"base": {"optimizer": "balanced"}, "axes": {"gamma": [0.003]}}},
        )
    )
    assert "expands to 'g-gamma0.003', the name of variants.g-gamma0.003" in message


@pytest.mark.parametrize("model, size", [("HPCM_Tiny", 50), ("HPCM_Base", 64), ("HPCM_Small", 64)])
def test_patch_size_must_be_a_multiple_of_the_models_pad_multiple(model, size):
    message = error_of(small(model=model, training={"patch_size": size}))
    multiple = preset_config(model).pad_multiple
    assert (
        f"config key 'training.patch_size': {size} is not a multiple of {multiple}, the pad "
        f"multiple of {model}" in message
    )


def test_a_variants_patch_size_is_checked_too():
    variants = {"baseline": {"optimizer": "adam"}, "big": {"optimizer": "adam", "patch_size": 96}}
    assert "config key 'variants.big.patch_size': 96" in error_of(small(variants=variants))
    ok = {"baseline": {"optimizer": "adam"}, "big": {"optimizer": "adam", "patch_size": 128}}
    assert load(small(variants=ok)).run_config("big", "0.0018", 0, [])["patch_size"] == 128


@pytest.mark.parametrize(
    "changes, key, words",
    [
        ({"training": {"seed": 1}}, "training.seed", "`seeds`"),
        (
            {"variants": {"baseline": {"optimizer": "adam", "seed": 1}}},
            "variants.baseline.seed",
            "`seeds`",
        ),
        ({"seeds": [0, 0]}, "seeds", "non-unique"),
        ({"seeds": [-1]}, "seeds.0", "-1"),
        ({"seeds": []}, "seeds", "should be non-empty"),
        ({"training": {"stpes": 3}}, "training", "stpes"),
        ({"lambdas": [0.013, -1.0]}, "lambdas.1", "-1.0"),
        ({"variants": {"a": {"optimizer": "sgd"}}}, "variants.a.optimizer", "sgd"),
        ({"variants": {"a": {"extends": "ghost"}}}, "variants.a.extends", "ghost"),
        (
            {"variants": {"a": {"extends": "b", "optimizer": "adam"}, "b": {"extends": "a"}}},
            "variants.a.extends",
            "cycle",
        ),
        ({"variants": {"a": {"gamma": 0.1}}}, "variants.a.optimizer", "no optimizer"),
        (
            {"variants": {"baseline": {"optimizer": "adam", "init_from": "official"}}},
            "variants.baseline.init_from",
            "official_checkpoints",
        ),
        ({"analysis": {"reference": "nope"}}, "analysis.reference", "unknown variant 'nope'"),
        ({"datasets": {"mine": {"kind": "folder"}}}, "datasets.mine.source", "needs a source"),
        (
            {"datasets": {"c": {"kind": "clic2020-professional", "only": ["a.png"]}}},
            "datasets.c.only",
            "only supported for kind(s) 'kodak', not 'clic2020-professional'",
        ),
    ],
)
def test_config_errors_name_the_key(changes, key, words):
    message = error_of(small(**changes))
    assert message.startswith(f"config key '{key}'"), message
    assert words in message, message


def test_dataset_kinds_come_from_the_registry_passed_in():
    """The schema knows the names; whether a kind exists and what it takes is the registry's."""
    cfg = small(datasets={"k": {"kind": "kodak", "only": ["kodim01.png"]}})
    assert load(cfg).prepared_datasets == ["k"]
    with pytest.raises(
        study.StudyConfigError,
        match="'datasets.k.kind': unknown kind 'kodak' "
        r"\(known: samples, folder, tecnick\)",
    ):
        study.load(
            copy.deepcopy(cfg), SCHEMA, pad_multiple_of, dataset_kinds={"tecnick": ("manifest",)}
        )
    local = small(datasets={"s": {"kind": "samples"}})
    no_registry = study.load(copy.deepcopy(local), SCHEMA, pad_multiple_of, dataset_kinds={})
    assert no_registry.prepared_datasets == []


def test_a_variant_may_set_ema_decay_and_the_others_run_yaml_stays_as_before(tmp_path):
    variants = {
        "baseline": {"optimizer": "adam"},
        "phase1_ema": {"optimizer": "balanced", "ema_decay": 0.999},
    }
    s = load(small(variants=variants, train_data=str(tmp_path), val_data=str(tmp_path)))
    assert run_config.resolve(s.run_config("phase1_ema", "0.0067", 0, [])).ema_decay == 0.999
    assert "ema_decay" not in s.run_config(
        "baseline", "0.0067", 0, []
    )  # unchanged params: no Snakemake rerun
    with pytest.raises(study.StudyConfigError):
        load(small(variants={**variants, "bad": {"optimizer": "adam", "ema_decay": 1.0}}))


@pytest.mark.parametrize(
    "changes, key, words",
    [
        (
            {"device": "cpu", "compute": {"train": {"gpus": 4}}},
            "compute.train.gpus",
            "need `device: cuda` (got 'cpu')",
        ),
        (
            {"device": "cuda:1", "compute": {"train": {"gpus": 2}}},
            "compute.train.gpus",
            "(got 'cuda:1')",
        ),
        (
            {"device": "cuda", "local_gpus": 2, "compute": {"train": {"gpus": 4}}},
            "compute.train.gpus",
            "local_gpus is 2",
        ),
        (
            {"device": "cuda", "compute": {"evaluate": {"gpus": 2}}},
            "compute.evaluate.gpus",
            "one device",
        ),
        (
            {"device": "cuda", "compute": {"train": {"gpus": 0}}},
            "compute.train.gpus",
            "minimum of 1",
        ),
    ],
)
def test_gpus_per_job_that_cannot_launch_are_errors_naming_the_key(changes, key, words):
    """Issue 11 point 4: several GPUs per training job only where torchrun can use them."""
    message = error_of(small(**changes))
    assert message.startswith(f"config key '{key}'"), message
    assert words in message, message


@pytest.mark.parametrize(
    "device, gpus, local_gpus, expected_gpus, launcher",
    [
        ("cpu", 1, 0, 0, "python"),
        ("cuda", 1, 0, 1, "python"),
        ("cuda", 4, 0, 4, "torchrun --standalone --nproc-per-node 4"),  # SLURM: local_gpus unused
        ("cuda", 4, 8, 4, "torchrun --standalone --nproc-per-node 4"),
    ],
)
def test_gpus_per_training_job_choose_the_launcher(
    device, gpus, local_gpus, expected_gpus, launcher
):
    resolved = load(small(device=device, local_gpus=local_gpus, compute={"train": {"gpus": gpus}}))
    assert resolved.gpus("train") == expected_gpus and resolved.train_launcher() == launcher
    assert resolved.gpus("evaluate") == (0 if device == "cpu" else 1)
