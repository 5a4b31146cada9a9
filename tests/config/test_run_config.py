"""Run config: defaults, presets, --set parsing, types and impossible values; metrics/wandb
logging."""

from __future__ import annotations

import csv
import dataclasses

import pytest
import yaml

from hpcm.config import presets, run_config
from hpcm.config.optimizers import OPTIMIZER_SPECS
from hpcm.config.run_config import ConfigError
from hpcm.train import logs as logging_utils
from tests.paths import REPO


def resolve(**user):
    return run_config.resolve({"steps": 10, **user})


def test_defaults_follow_the_official_recipe():
    cfg = resolve()
    assert cfg.optimizer == "adam" and cfg.lr == 1e-4 and cfg.clip_max_norm == 1.0
    assert cfg.lr_milestones == [2750 / 3000, 2850 / 3000, 2950 / 3000]
    assert cfg.lr_values == [3e-5, 1e-5, 1e-6]
    assert cfg.patch_size == 256 and cfg.batch_size == 32 and cfg.wandb_mode == "offline"


def test_variant_presets_sit_under_user_values():
    assert resolve(variant="phase1").optimizer == "balanced"
    phase2 = resolve(variant="phase2")
    assert phase2.gamma_schedule == "cosine" and phase2.gamma_final == 0.001
    assert resolve(variant="phase3").optimizer == "hierarchical_balanced"
    assert resolve(variant="phase1", gamma=0.006).gamma == 0.006
    ablation = resolve(
        variant="study1_s1", optimizer="hierarchical_balanced", scale_weights=[0.5, 0.3, 0.2]
    )
    assert ablation.variant == "study1_s1" and ablation.scale_weights == [0.5, 0.3, 0.2]


def test_scale_weights_and_gammas_may_name_the_ablation_presets():
    # the seed's Study 1 / Study 2 values (issue 3), also the defaults (s2 emphasis, decreasing)
    cfg = run_config.load(None, ["steps=3", "scale_weights=s3_emphasis", "gammas=uniform"])
    assert cfg.scale_weights == [0.2, 0.3, 0.5] and cfg.gammas == [0.006, 0.006, 0.006]
    assert resolve().scale_weights == [0.3, 0.4, 0.3] and resolve().gammas == [0.008, 0.006, 0.004]
    assert (
        "or a Study 1 preset: equal, s1_emphasis, s2_emphasis, s3_emphasis"
        in run_config.help_text()
    )


def test_set_values_are_yaml_and_numbers_in_exponent_form_work(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("lmbda: 0.0067\nsteps: 5\nlr: 1e-4\n")
    cfg = run_config.load(
        config,
        [
            "gammas=[0.004, 0.006, 0.008]",
            "lr=2e-4",
            "bf16=true",
            "init_checkpoint=null",
            "lr_milestones=[0.5]",
            "lr_values=[1e-5]",
        ],
    )
    assert cfg.lmbda == 0.0067 and cfg.lr == 2e-4 and cfg.bf16 is True
    assert cfg.gammas == [0.004, 0.006, 0.008] and cfg.init_checkpoint is None
    assert isinstance(cfg.steps, int)


@pytest.mark.parametrize(
    "user, fragments",
    [
        ({"bogus": 1}, ["unknown key 'bogus'", "1"]),
        ({"lmbda": "a lot"}, ["'lmbda'", "'a lot'", "number"]),
        ({"batch_size": 2.5}, ["'batch_size'", "2.5", "integer"]),
        ({"batch_size": True}, ["'batch_size'", "True"]),
        ({"lmbda": 0.0}, ["'lmbda'", "0.0", "> 0"]),
        ({"gammas": [0.1, 0.2]}, ["'gammas'", "[0.1, 0.2]", "3 values"]),
        ({"gammas": "flat"}, ["'gammas'", "'flat'", "uniform, increasing, decreasing"]),
        ({"scale_weights": "equal", "gammas": "equal"}, ["'gammas'", "'equal'", "study2_gammas"]),
        ({"update_mode": "later"}, ["'update_mode'", "'later'", "same_batch"]),
        ({"lr_milestones": [0.9, 0.5], "lr_values": [1, 2]}, ["'lr_milestones'", "increasing"]),
        ({"lr_values": [1e-5]}, ["'lr_milestones'", "'lr_values'", "same length"]),
        (
            {"lr": 1e-5},
            ["'lr_values' = [3e-05, 1e-05, 1e-06]", "above 'lr' = 1e-05", "[0.3, 0.1, 0.01] x lr"],
        ),
        (
            {"lr_milestones": [0.5, 0.8], "lr_values": [1e-5, 5e-5]},
            ["'lr_values' = [1e-05, 5e-05]", "(to 5e-05)"],
        ),
        (
            {"scale_early_stop_patience": 2, "freeze": ["context"]},
            ["'scale_early_stop_patience' = 2", "'freeze'"],
        ),
        (
            {"scale_early_stop_patience": 2, "unfreeze_schedule": {"context": 0.5}},
            ["'scale_early_stop_patience' = 2"],
        ),
        ({"gamma_schedule": "cosine"}, ["'gamma_schedule'", "'gamma_final'"]),
        ({"device": "tpu"}, ["'device'", "'tpu'"]),
        (
            {"train_data": "/no/such/folder"},
            ["'train_data'", "'/no/such/folder'", "does not exist"],
        ),
        ({"quiet": "maybe"}, ["'quiet'", "'maybe'"]),
        ({"lmbda": float("nan")}, ["'lmbda'", "nan", "finite"]),
    ],
)
def test_bad_values_name_key_and_value(user, fragments):
    with pytest.raises(ConfigError) as error:
        resolve(**user)
    for fragment in fragments:
        assert fragment in str(error.value), (fragment, str(error.value))


def test_run_length_needs_exactly_one_of_steps_and_epochs():
    with pytest.raises(ConfigError, match="'steps'.*'epochs'"):
        run_config.resolve({})
    with pytest.raises(ConfigError, match="'steps'.*'epochs'"):
        run_config.resolve({"steps": 3, "epochs": 1})
    assert run_config.resolve({"epochs": 2}).epochs == 2


def test_bad_set_syntax_and_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="key=value"):
        run_config.parse_set(["lmbda"])
    config = tmp_path / "run.yaml"
    config.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        run_config.load(config)
    with pytest.raises(ConfigError, match="cannot read"):
        run_config.load(tmp_path / "missing.yaml")


def test_yaml_1_1_booleans_stay_the_text_typed_for_choice_keys(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("steps: 5\nupdate_mode: on\nbf16: on\nquiet: yes\nskip_bad_images: off\n")
    with pytest.raises(ConfigError) as error:
        run_config.load(config)
    assert "'update_mode' = 'on'" in str(error.value) and "True" not in str(error.value)
    with pytest.raises(ConfigError, match="'decomposition' = 'off': must be one of"):
        run_config.load(None, ["steps=5", "decomposition=off"])
    config.write_text("steps: 5\nbf16: on\nquiet: yes\nskip_bad_images: off\n")
    cfg = run_config.load(config, ["wandb_mode=disabled"])
    assert (cfg.bf16, cfg.quiet, cfg.skip_bad_images) == (True, True, False)
    assert run_config.load(None, ["steps=5", "bf16=True"]).bf16 is True


def test_resume_mismatch_ignores_bookkeeping_keys_only():
    saved = resolve()
    safe = dataclasses.replace(saved, num_workers=0, quiet=True, device="cpu")
    assert run_config.resume_mismatch(saved.as_dict(), safe) is None
    changed = dataclasses.replace(saved, lmbda=0.025)
    assert "'lmbda'" in run_config.resume_mismatch(saved.as_dict(), changed)


def test_metrics_csv_drops_rows_after_the_checkpoint_and_crash_cut_lines(tmp_path):
    path = tmp_path / "metrics.csv"
    table = logging_utils.MetricsCSV(path)
    for step in (1, 2, 3):
        table.write({"step": step, "loss": 1.0 / step})
    table.close()
    with open(path, "a") as handle:
        handle.write("4,0,0.0001,0.2")  # a line cut short by a crash
    table = logging_utils.MetricsCSV(path, resume_step=2)
    table.write({"step": 3, "loss": 0.5, "val_loss": 0.7})
    table.close()
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["step"] for r in rows] == ["1", "2", "3"]
    assert rows[-1]["loss"] == "0.5" and rows[-1]["val_loss"] == "0.7" and rows[0]["val_loss"] == ""
    with pytest.raises(KeyError, match="bogus"):
        logging_utils.MetricsCSV(path, resume_step=3).write({"step": 4, "bogus": 1})


# ----------------------------------------------------------------------------- the Snakemake schema
# The schema's `training` keys and every variant's keys are run-config keys: their types, choices,
# bounds and defaults must be those of run_config.KEYS (the one home of these facts).
SCHEMA = REPO / "workflow" / "schemas" / "config.schema.yaml"
JSON_TYPES = {
    "str": {"string"},
    "float": {"number"},
    "int": {"integer"},
    "bool": {"boolean"},
    "floats3": {"array"},
    "floats": {"array"},
    "groups": {"array"},
    "group_floats": {"object"},
}
# `training` defaults that deliberately differ from hpcm.train's: the demo study trains a tiny model
# on the embedded samples in minutes (docs/workflow.md); every other default must be KEYS' default.
STUDY_DEFAULTS = {
    "steps",
    "patch_size",
    "batch_size",
    "num_workers",
    "log_every",
    "val_every",
    "checkpoint_every",
    "wandb_mode",
    "quiet",
}


def _schema() -> dict:
    return yaml.safe_load(SCHEMA.read_text())


def _resolve_ref(schema: dict, node: dict) -> dict:
    if "$ref" not in node:
        return node
    target = schema
    for part in node["$ref"].removeprefix("#/").split("/"):
        target = target[part]
    return _resolve_ref(schema, target)


def _alternatives(schema: dict, node: dict) -> list[dict]:
    """The node's alternatives (anyOf), references resolved, one per JSON type."""
    node = _resolve_ref(schema, node)
    if "anyOf" in node:
        return [alt for option in node["anyOf"] for alt in _alternatives(schema, option)]
    types = node.get("type", [])
    return [{**node, "type": t} for t in ([types] if isinstance(types, str) else types)]


def _bounds_agree(key: str, spec, node: dict) -> list[str]:
    """Probe KEYS' check at the schema's bounds (and far outside them where the schema has none)."""
    bounds = (
        node.get("items", node)
        if node["type"] == "array"
        else node.get("additionalProperties", node)
        if node["type"] == "object"
        else node
    )
    step = 1 if spec.kind == "int" else 1e-9

    def accepts(value):
        wrapped = (
            [value] * 3
            if spec.kind == "floats3"
            else [value]
            if spec.kind == "floats"
            else {"context": value}
            if spec.kind == "group_floats"
            else value
        )
        return spec.check is None or bool(spec.check(wrapped))

    probes = []  # (value, schema accepts it)
    for name, sign, inclusive in (
        ("minimum", -1, True),
        ("exclusiveMinimum", -1, False),
        ("maximum", 1, True),
        ("exclusiveMaximum", 1, False),
    ):
        if name in bounds:
            b = bounds[name]
            probes += [(b, inclusive), (b + sign * step, False), (b - sign * step, True)]
    if not any(n in bounds for n in ("minimum", "exclusiveMinimum")):
        probes.append((-1000 * step if spec.kind == "int" else -1.0, True))
    if not any(n in bounds for n in ("maximum", "exclusiveMaximum")):
        probes.append((1000, True))
    return [
        f"{key}: schema {'accepts' if ok else 'rejects'} {value!r}, KEYS "
        f"{'accepts' if accepts(value) else 'rejects'} it"
        for value, ok in probes
        if accepts(value) != ok
    ]


def _disagreements(schema: dict, key: str, node: dict, inherits: bool) -> list[str]:
    if key not in run_config.KEYS:
        return [f"{key}: in the schema, not a run-config key"]
    spec = run_config.KEYS[key]
    problems = []
    alternatives = _alternatives(schema, node)
    types = {alt["type"] for alt in alternatives}
    expected = JSON_TYPES[spec.kind] | ({"string"} if key in presets.NAMED_KEYS else set())
    if types - {"null"} != expected:
        problems.append(f"{key}: schema types {sorted(types - {'null'})}, KEYS kind {spec.kind!r}")
    if "null" in types and not (
        inherits or spec.optional
    ):  # a study may require what KEYS leaves optional
        problems.append(f"{key}: schema allows null, KEYS optional={spec.optional}")
    node = _resolve_ref(schema, node)
    enum = node.get("enum")
    if (enum is None) != (spec.choices is None) or (
        enum and [c for c in enum if c is not None] != list(spec.choices)
    ):
        problems.append(f"{key}: schema enum {enum}, KEYS choices {spec.choices}")
    for alt in alternatives:
        if alt["type"] in JSON_TYPES[spec.kind] - {"string"} or alt["type"] in ("array", "object"):
            problems += _bounds_agree(key, spec, alt)
    if "default" in node:
        wanted = None if inherits else spec.default
        if node["default"] != wanted and not (not inherits and key in STUDY_DEFAULTS):
            problems.append(f"{key}: schema default {node['default']!r}, expected {wanted!r}")
    return problems


def test_schema_training_and_variant_keys_agree_with_the_run_config_table():
    schema = _schema()
    training = schema["properties"]["training"]["properties"]
    variant_keys = schema["$defs"]["variant_keys"]
    problems = [
        p
        for key, node in training.items()
        if key != "settings"  # further run keys for every run, checked by study.check_settings
        for p in _disagreements(schema, key, node, inherits=False)
    ]
    problems += [
        p
        for key, node in variant_keys.items()
        for p in _disagreements(schema, key, node, inherits=True)
    ]
    assert not problems, "\n".join(problems)
    # every variant key is a property of a variant, and the study defaults that differ are named
    assert set(variant_keys) <= set(schema["$defs"]["variant"]["properties"])
    assert STUDY_DEFAULTS <= set(training)


def test_schema_check_finds_a_disagreement():
    schema = _schema()
    node = {"type": "number", "minimum": 0, "default": 0.5}  # KEYS: lr > 0, default 1e-4
    problems = _disagreements(schema, "lr", node, inherits=False)
    assert any("schema accepts 0" in p for p in problems) and any(
        "default 0.5" in p for p in problems
    )
    assert _disagreements(
        schema, "update_mode", {"type": "string", "enum": ["same_batch"]}, inherits=False
    )


def test_schema_study_keys_name_the_package_facts():
    """The study keys that are not run-config keys but name package facts use the same lists."""
    from hpcm.analysis.bd import (
        METHODS,  # why: a later stage than config, needed by this check only
    )
    from hpcm.models.presets import PRESETS  # why: imports torch, needed by this check only

    full = _schema()
    schema = full["properties"]
    assert schema["analysis"]["properties"]["bd_method"]["enum"] == list(METHODS)
    # the optimizer registry (hpcm.config.optimizers): a variant's optimizer, and the names a
    # per-optimizer steps_per_s may use
    names = list(OPTIMIZER_SPECS)
    assert full["$defs"]["variant_keys"]["optimizer"]["enum"] == [*names, None]
    per_optimizer = full["$defs"]["job_resources"]["properties"]["steps_per_s"]["oneOf"][1]
    assert per_optimizer["propertyNames"]["enum"] == [*names, "default"]
    assert sorted(schema["model"]["enum"]) == sorted(PRESETS)
    assert schema["device"]["pattern"] == run_config.DEVICE_PATTERN


def test_a_checkpoint_older_than_a_key_resumes_when_the_key_keeps_its_default():
    current = run_config.resolve({"steps": 10, "variant": "phase2"})
    newer_keys = ("gamma_warmup", "gamma_step_factor")
    older = {k: v for k, v in current.as_dict().items() if k not in newer_keys}
    assert run_config.resume_mismatch(older, current) is None
    changed = run_config.resolve({"steps": 10, "variant": "phase2", "gamma_warmup": 0.1})
    assert "gamma_warmup" in run_config.resume_mismatch(older, changed)


def test_run_config_has_one_typed_field_per_key_with_the_key_default():
    fields = {f.name: f for f in dataclasses.fields(run_config.RunConfig)}
    assert list(fields) == list(run_config.KEYS)
    assert fields["lmbda"].type is float and fields["steps"].type == int | None
    assert fields["gammas"].type == list[float] and fields["group_lr"].type == dict[str, float]
    bare = run_config.RunConfig()  # every field has the key's default
    assert all(getattr(bare, key) == spec.default for key, spec in run_config.KEYS.items())
    assert bare.gammas is not run_config.KEYS["gammas"].default  # a copy: the table stays as it is


def test_run_config_is_frozen_and_its_dict_is_what_run_yaml_stores():
    cfg = resolve(variant="phase1", lmbda=0.0067)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.lmbda = 0.013
    saved = cfg.as_dict()
    assert list(saved) == list(run_config.KEYS) and saved["lmbda"] == 0.0067
    assert yaml.safe_load(yaml.safe_dump(saved, sort_keys=False)) == saved  # plain YAML types only
    assert run_config.from_saved(saved, "run.yaml") == cfg


def test_from_saved_fills_newer_keys_and_names_the_file_on_bad_values():
    older = {k: v for k, v in resolve().as_dict().items() if k != "ema_decay"}
    assert run_config.from_saved(older, "old/run.yaml").ema_decay == 0.0
    with pytest.raises(ConfigError, match=r"old/run.yaml: .*'lmbda'"):
        run_config.from_saved({**older, "lmbda": "much"}, "old/run.yaml")
    with pytest.raises(ConfigError, match=r"old/run.yaml: unknown run-config key 'lambda'"):
        run_config.from_saved({**older, "lambda": 0.1}, "old/run.yaml")
