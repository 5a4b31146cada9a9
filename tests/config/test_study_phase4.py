"""The Phase 4 variants of the shipped study configs resolve into valid run configs."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import yaml

from hpcm.config import run_config, study
from hpcm.config.tasks import PARAMETER_GROUPS
from hpcm.data.datasets import dataset_options
from hpcm.models.presets import preset_config
from tests.paths import REPO

SCHEMA = REPO / "workflow" / "schemas" / "config.schema.yaml"
CONFIGS = [
    REPO / "config.yaml",
    *(
        REPO / "workflow" / "configs" / f"{n}.yaml"
        for n in ("paper", "finetune", "finetune_msssim")
    ),
]
PHASE4 = (
    "phase4_context_lr",
    "phase4_freeze_entropy",
    "phase4_progressive",
    "phase4_scale_early_stop",
)


def load(path) -> study.Study:
    cfg = yaml.safe_load(path.read_text())
    return study.load(
        copy.deepcopy(cfg),
        SCHEMA,
        lambda name: preset_config(name).pad_multiple,
        dataset_kinds=dataset_options(),
    )


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_study_has_the_four_phase4_variants_and_their_rows(path):
    s = load(path)
    assert set(PHASE4) <= set(s.variants)
    analysis = s.config["analysis"]
    assert analysis["gains"]["phase4"] == "phase4_context_lr"
    assert set(PHASE4) <= set(analysis["studies"]["phase4"]["rows"].values())
    lmbda = next(iter(s.lambdas))
    resolved = {}
    for variant in PHASE4:
        run = s.run_config(
            variant, lmbda, 0, ["init.pth"] if s.variants[variant].get("init_from") else []
        )
        run["init_checkpoint"] = None  # the file does not exist here
        run.update(train_data="samples", val_data="samples")
        settings = s.runtime_settings(variant)
        resolved[variant] = run_config.resolve({**run, **settings})
    # the keys arrive in the run config (data, not code branches); the optimizer composes with them
    assert resolved["phase4_context_lr"].group_lr == {
        "transforms": 1.0,
        "hyperprior": 0.5,
        "context": 0.1,
    }
    assert resolved["phase4_freeze_entropy"].freeze == ["transforms", "hyperprior"]
    assert resolved["phase4_progressive"].unfreeze_schedule == {"hyperprior": 0.2, "context": 0.4}
    assert resolved["phase4_scale_early_stop"].scale_early_stop_patience >= 1
    assert all(
        cfg.optimizer == resolved["phase4_context_lr"].optimizer for cfg in resolved.values()
    )


def test_a_variant_val_every_replaces_the_studys_and_only_there():
    demo = load(REPO / "config.yaml")
    assert demo.runtime_settings("phase4_scale_early_stop")["val_every"] == 10
    assert (
        demo.runtime_settings("phase1")["val_every"] == demo.config["training"]["val_every"] == 20
    )


def test_the_schema_names_the_parameter_groups_of_the_code():
    keys = yaml.safe_load(SCHEMA.read_text())["$defs"]["variant_keys"]
    assert keys["freeze"]["items"]["enum"] == list(PARAMETER_GROUPS)
    for key in ("group_lr", "unfreeze_schedule"):
        assert keys[key]["propertyNames"]["enum"] == list(PARAMETER_GROUPS)


def test_changing_val_every_on_resume_is_refused_only_with_early_stopping():
    saved = run_config.resolve({"steps": 4, "val_every": 2, "scale_early_stop_patience": 1})
    changed = dataclasses.replace(saved, val_every=3)
    assert "val_every" in run_config.resume_mismatch(saved.as_dict(), changed)
    plain = run_config.resolve({"steps": 4, "val_every": 2})
    assert (
        run_config.resume_mismatch(plain.as_dict(), dataclasses.replace(plain, val_every=3)) is None
    )
