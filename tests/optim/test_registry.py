"""The optimizer registry: every spec of hpcm.config.optimizers has one builder, each built
optimizer has the traits its spec claims, the run config takes its names and defaults from the
specs, and no module outside hpcm.optim branches on an optimizer's name."""

from __future__ import annotations

import ast
import inspect

import pytest
import torch

from hpcm.config import run_config
from hpcm.config.optimizers import (
    BASELINE_OPTIMIZER,
    GAMMA,
    OPTIMIZER_SPECS,
    W_LR,
    OptimizerSpec,
    hyperparameter_default,
)
from hpcm.optim import Balanced, build_optimizer, register_optimizer
from hpcm.optim.registry import BUILDERS
from tests.paths import REPO

COMMON_OPTIONS = {"max_norm", "min_losses", "sync_free"}  # every builder takes these


def small_params() -> list[torch.Tensor]:
    torch.manual_seed(0)
    return [torch.randn(4, 3, requires_grad=True), torch.randn(5, requires_grad=True)]


def test_every_spec_has_exactly_one_builder():
    assert sorted(BUILDERS) == sorted(OPTIMIZER_SPECS)
    assert not OPTIMIZER_SPECS[BASELINE_OPTIMIZER].task_weights  # the plain baseline


@pytest.mark.parametrize("name", list(OPTIMIZER_SPECS))
def test_builder_takes_exactly_its_specs_hyperparameters(name):
    parameters = inspect.signature(BUILDERS[name]).parameters
    keyword_only = {k for k, p in parameters.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}
    assert keyword_only == COMMON_OPTIONS | set(OPTIMIZER_SPECS[name].hyperparameters)


@pytest.mark.parametrize("name", list(OPTIMIZER_SPECS))
def test_built_optimizer_has_the_traits_of_its_spec(name):
    spec = OPTIMIZER_SPECS[name]
    optimizer = build_optimizer(name, small_params(), 1e-3)
    assert isinstance(optimizer, torch.optim.Optimizer)
    # task weights <=> the Balanced protocol that backward_and_step and the loop use
    assert isinstance(optimizer, Balanced) == spec.task_weights
    if spec.task_weights:
        assert optimizer.task_names == list(spec.task_names)
        assert sorted(optimizer.get_task_weights()) == sorted(spec.task_names)
    if spec.gamma_schedule == "single":  # GammaSchedule.apply sets optimizer.gamma
        optimizer.gamma = 0.5
        assert optimizer.gamma == pytest.approx(0.5)
    if spec.gamma_schedule == "per_scale":  # ScaleGammaManager's values go to set_scale_gammas
        optimizer.set_scale_gammas(0.1, 0.2, 0.3)
        assert list(optimizer.scale_gammas.values()) == pytest.approx([0.1, 0.2, 0.3])
    else:
        assert not hasattr(optimizer, "set_scale_gammas")
    if spec.gamma_schedule is None:
        assert not hasattr(optimizer, "gamma")


def test_hyperparameters_reach_the_optimizer_and_default_to_the_spec():
    default = build_optimizer("balanced", small_params(), 1e-3)
    assert default.gamma == pytest.approx(GAMMA) and default.w_opt.defaults["lr"] == W_LR
    assert default.update_mode == "same_batch"
    # gammas: not balanced's, ignored (the loop passes them all)
    tuned = build_optimizer(
        "balanced",
        small_params(),
        1e-3,
        gamma=0.01,
        w_lr=0.5,
        update_mode="next_batch",
        gammas=(1.0, 2.0, 3.0),
    )
    assert tuned.gamma == pytest.approx(0.01) and tuned.w_opt.defaults["lr"] == 0.5
    assert tuned.update_mode == "next_batch"
    hierarchical = build_optimizer(
        "hierarchical_balanced",
        small_params(),
        1e-3,
        gammas=[0.1, 0.2, 0.3],
        scale_weights=[1.0, 2.0, 3.0],
    )
    assert list(hierarchical.scale_gammas.values()) == pytest.approx([0.1, 0.2, 0.3])
    assert hierarchical.scale_weights == [1.0, 2.0, 3.0]


def test_run_config_names_and_defaults_come_from_the_specs():
    assert run_config.OPTIMIZERS == tuple(OPTIMIZER_SPECS)
    assert run_config.KEYS["optimizer"].choices == tuple(OPTIMIZER_SPECS)
    assert run_config.BALANCED_OPTIMIZERS == tuple(
        name for name, spec in OPTIMIZER_SPECS.items() if spec.task_weights
    )
    for spec in OPTIMIZER_SPECS.values():
        for key, default in spec.hyperparameters.items():
            assert key in run_config.KEYS, f"{spec.name}: {key!r} is not a run-config key"
            value = run_config.KEYS[key].default
            assert (list(value) if isinstance(value, (list, tuple)) else value) == (
                list(default) if isinstance(default, (list, tuple)) else default
            ), (spec.name, key)


def test_two_specs_with_different_defaults_for_one_key_are_refused(monkeypatch):
    monkeypatch.setitem(
        OPTIMIZER_SPECS,
        "other",
        OptimizerSpec(
            "other",
            "test",
            task_names=("a", "b"),
            gamma_schedule="single",
            hyperparameters={"gamma": 0.5},
        ),
    )
    with pytest.raises(ValueError, match="'gamma': the specs give 2 defaults"):
        hyperparameter_default("gamma")


def test_bad_specs_and_registrations_are_refused(monkeypatch):
    with pytest.raises(ValueError, match="no OptimizerSpec of that name"):
        register_optimizer("not_an_optimizer")
    with pytest.raises(ValueError, match="registered by hpcm.optim.balanced.build_balanced"):
        register_optimizer("balanced")(lambda *a, **k: None)
    with pytest.raises(ValueError, match="gamma schedule needs task weights"):
        OptimizerSpec("x", "test", gamma_schedule="single")
    with pytest.raises(ValueError, match="gamma_schedule 'cosine' is not one of"):
        OptimizerSpec("x", "test", task_names=("a",), gamma_schedule="cosine")
    monkeypatch.setitem(OPTIMIZER_SPECS, "unbuilt", OptimizerSpec("unbuilt", "test"))
    with pytest.raises(
        ValueError,
        match=r"no builder: decorate one with "
        r"@register_optimizer\('unbuilt'\)",
    ):
        build_optimizer("unbuilt", small_params(), 1e-3)


def test_build_optimizer_errors_name_the_choices():
    with pytest.raises(ValueError, match="unknown optimizer 'sgd'; valid names: adam, "):
        build_optimizer("sgd", small_params(), 1e-3)
    with pytest.raises(TypeError, match=r"unknown hyperparameters \['gama'\]"):
        build_optimizer("balanced", small_params(), 1e-3, gama=0.1)


def _name_comparisons(source: str, label: str) -> list[str]:
    """Comparisons (==, !=, in, not in) of anything with a registered optimizer name literal."""
    names = set(OPTIMIZER_SPECS)
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Compare):
            continue
        operands = [node.left, *node.comparators]
        literals = [
            e
            for o in operands
            for e in ([o] if isinstance(o, ast.Constant) else getattr(o, "elts", []))
        ]
        hits = [c.value for c in literals if isinstance(c, ast.Constant) and c.value in names]
        if hits:
            found.append(f"{label}:{node.lineno}: compares with {hits}")
    return found


def test_no_module_outside_the_optimizers_branches_on_an_optimizer_name():
    """The loop, the tables, the study checks ... read traits (hpcm.optim itself may name a
    Balanced weighting "qp", which is not the optimizer name)."""
    modules = [
        p for p in sorted((REPO / "hpcm").rglob("*.py")) if "optim" not in p.relative_to(REPO).parts
    ]
    problems = [
        p
        for path in modules
        for p in _name_comparisons(path.read_text(), str(path.relative_to(REPO)))
    ]
    assert not problems, "\n".join(problems)


def test_the_name_comparison_check_finds_one():
    source = (
        'x = cfg["optimizer"] in ("balanced", "qp")\n'
        'y = name == "hierarchical_balanced"\nz = a == "b"\n'
    )
    assert len(_name_comparisons(source, "probe.py")) == 2
