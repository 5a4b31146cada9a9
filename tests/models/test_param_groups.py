"""The Phase 4 parameter groups partition every preset's parameters, and the scales each context
parameter serves are those whose coding steps run it (observed with hooks, not read from the
table)."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from hpcm import models
from hpcm.config.tasks import PARAMETER_GROUPS, SCALES
from hpcm.models import hpcm as hpcm_module
from hpcm.models import param_groups


@pytest.mark.parametrize("name", models.MODEL_NAMES)
def test_groups_partition_the_parameters_exactly(name):
    with torch.device("meta"):  # shapes only: HPCM_Large costs no memory
        model = models.build_model(name)
    groups = param_groups.partition(model)
    assert tuple(groups) == PARAMETER_GROUPS and all(groups.values())
    grouped = Counter(n for members in groups.values() for n, _ in members)
    names = [n for n, _ in model.named_parameters()]
    assert max(grouped.values()) == 1, "a parameter in two groups"
    assert sorted(grouped) == sorted(names), "a parameter missing or invented"
    assert sum(p.numel() for members in groups.values() for _, p in members) == sum(
        p.numel() for p in model.parameters()
    )
    # the module structure: transforms are g_a/g_s, the hyperprior h_a/h_s and the z prior
    assert {n.split(".")[0] for n, _ in groups["transforms"]} == {"g_a", "g_s"}
    assert {n.split(".")[0] for n, _ in groups["hyperprior"]} == {
        "h_a",
        "h_s",
        "means_hyper",
        "scales_hyper",
    }


def test_an_unknown_module_is_an_error_naming_the_parameter():
    with torch.device("meta"):
        model = models.build_model("HPCM_Tiny")
        model.extra_head = torch.nn.Conv2d(3, 3, 1)
    with pytest.raises(param_groups.UnknownParameterError, match="'extra_head.weight'"):
        param_groups.partition(model)
    with pytest.raises(param_groups.UnknownParameterError, match="'context_net.7.weight'"):
        param_groups.group_of("context_net.7.weight")  # an index the coding schedule does not have


def observed_scales(model: models.HPCM) -> dict[str, set[str]]:
    """parameter name -> the scales whose coding steps ran its module (one forward with hooks)."""
    since_last_step: list[str] = []  # module names run since the last coded step
    served: dict[str, set[str]] = {}
    quant_names = {
        id(p): f"adaptive_params_list.{i}" for i, p in enumerate(model.adaptive_params_list)
    }
    hooks = []
    for name, module in model.named_modules():
        depth = name.count(".")
        if name and (
            depth == 0
            or (
                depth == 1
                and name.split(".")[0].endswith(("_list_s1", "_list_s2", "_list_s3", "context_net"))
            )
        ):
            hooks.append(
                module.register_forward_pre_hook(
                    lambda m, args, name=name: since_last_step.append(name)
                )
            )
    for prior in (model.y_spatial_prior_s1_s2, model.y_spatial_prior_s3):
        hooks.append(
            prior.register_forward_pre_hook(
                lambda m, args: since_last_step.append(quant_names[id(args[1])])
            )
        )
    real_call = hpcm_module._Quantizer.__call__

    def coded_step(self, scale, *args):
        for name in since_last_step:
            served.setdefault(name, set()).add(SCALES[scale])
        since_last_step.clear()
        return real_call(self, scale, *args)

    hpcm_module._Quantizer.__call__ = coded_step
    try:
        model(torch.rand(1, 3, 64, 64))
    finally:
        hpcm_module._Quantizer.__call__ = real_call
        for hook in hooks:
            hook.remove()
    out = {}
    for name, _ in model.named_parameters():
        owner = next((m for m in served if name == m or name.startswith(m + ".")), None)
        out[name] = served.get(owner, set())
    return out


def test_the_scales_of_each_context_parameter_are_those_whose_steps_run_it():
    torch.manual_seed(0)
    model = models.build_model("HPCM_Tiny")
    observed = observed_scales(model)
    context = [
        n for n, _ in model.named_parameters() if param_groups.group_of(n).group == "context"
    ]
    assert context
    for name in context:
        assert set(param_groups.group_of(name).scales) == observed[name], name
    # the shared spatial prior serves s1 and s2; every quantisation vector serves exactly one scale
    shared = [n for n in context if n.startswith("y_spatial_prior_s1_s2.")]
    assert shared and all(observed[n] == {"s1", "s2"} for n in shared)
    assert all(len(observed[f"adaptive_params_list.{i}"]) == 1 for i in range(10))
