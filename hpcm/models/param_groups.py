"""Phase 4 parameter groups of HPCM: every parameter name -> (group, the scales it serves).

The groups (``hpcm.config.tasks.PARAMETER_GROUPS``), by the module that owns the parameter:

* ``transforms``: ``g_a``, ``g_s`` (analysis and synthesis transforms);
* ``hyperprior``: ``h_a``, ``h_s`` and the learned prior of z, ``means_hyper`` / ``scales_hyper``
  (HPCM has no EntropyBottleneck; its ``entropy_estimation`` GGM holds only the buffer beta, so
  the "entropy model" with parameters is this z prior);
* ``context``: the progressive context model that turns the hyperprior's output into the entropy
  parameters of y, step by step: the spatial-prior adaptors, the two spatial priors, the per-step
  quantisation vectors ``adaptive_params_list``, the cross-attention cells and ``context_net``.

Which scale each context parameter serves (for per-scale early stopping) follows the coding
schedule of ``HPCM._progressive``: a parameter serves scale s when a coding step of s runs it.

* ``y_spatial_prior_adaptor_list_s{k}``, ``attn_s{k}``: scale k only;
* ``adaptive_params_list[i]``: the scale whose steps use vector i (``QUANT_VECTOR_ORDER``: 0 for
  s1, 1-3 for s2, 4-9 for s3);
* ``context_net[0]`` merges s1's context into s2's grid, ``context_net[1]`` s2's into s3's: s2
  and s3;
* ``y_spatial_prior_s1_s2`` is run by the steps of s1 AND s2 (shared), ``y_spatial_prior_s3`` by s3.

A shared parameter stops (early stopping) only when every scale it serves has stopped. Transforms
and hyperprior serve every scale and are not subject to per-scale early stopping.

A parameter name no rule knows is an error (``UnknownParameterError``), never put in a group by
default: a model with an extra module must be added here first.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from hpcm.config.tasks import PARAMETER_GROUPS, SCALES
from hpcm.models.hpcm import QUANT_VECTOR_ORDER


class UnknownParameterError(ValueError):
    """A model parameter that no Phase 4 group rule covers."""


@dataclass(frozen=True)
class GroupOf:
    group: str  # one of PARAMETER_GROUPS
    scales: tuple[str, ...]  # the scales a context parameter serves; every scale for the others


# Top-level module (the first part of a parameter name) -> its group, and for context modules the
# scales served. adaptive_params_list is resolved per index below.
_MODULE_RULES: dict[str, GroupOf] = {
    "g_a": GroupOf("transforms", SCALES),
    "g_s": GroupOf("transforms", SCALES),
    "h_a": GroupOf("hyperprior", SCALES),
    "h_s": GroupOf("hyperprior", SCALES),
    "means_hyper": GroupOf("hyperprior", SCALES),
    "scales_hyper": GroupOf("hyperprior", SCALES),
    "y_spatial_prior_adaptor_list_s1": GroupOf("context", ("s1",)),
    "y_spatial_prior_adaptor_list_s2": GroupOf("context", ("s2",)),
    "y_spatial_prior_adaptor_list_s3": GroupOf("context", ("s3",)),
    "y_spatial_prior_s1_s2": GroupOf("context", ("s1", "s2")),
    "y_spatial_prior_s3": GroupOf("context", ("s3",)),
    "attn_s1": GroupOf("context", ("s1",)),
    "attn_s2": GroupOf("context", ("s2",)),
    "attn_s3": GroupOf("context", ("s3",)),
}
_CONTEXT_NET_SCALES = {"0": ("s2",), "1": ("s3",)}  # merge into s2's grid, into s3's grid
_QUANT_VECTOR_SCALE = {
    str(index): (SCALES[scale],)
    for scale, indices in enumerate(QUANT_VECTOR_ORDER)
    for index in indices
}
assert set(rule.group for rule in _MODULE_RULES.values()) <= set(PARAMETER_GROUPS)


def group_of(name: str) -> GroupOf:
    """The group (and served scales) of the parameter ``name`` of ``model.named_parameters()``."""
    head, _, rest = name.partition(".")
    index = rest.partition(".")[0]
    if head in _MODULE_RULES:
        return _MODULE_RULES[head]
    if head == "context_net" and index in _CONTEXT_NET_SCALES:
        return GroupOf("context", _CONTEXT_NET_SCALES[index])
    if head == "adaptive_params_list" and index in _QUANT_VECTOR_SCALE:
        return GroupOf("context", _QUANT_VECTOR_SCALE[index])
    raise UnknownParameterError(
        f"parameter {name!r} belongs to no Phase 4 parameter group "
        f"({', '.join(PARAMETER_GROUPS)}); add its module to hpcm/models/param_groups.py"
    )


def assign(named_parameters: Iterable[tuple[str, torch.nn.Parameter]]) -> dict[str, GroupOf]:
    """name -> GroupOf for every parameter (raises UnknownParameterError on the first unknown
    name)."""
    return {name: group_of(name) for name, _ in named_parameters}


def partition(model: torch.nn.Module) -> dict[str, list[tuple[str, torch.nn.Parameter]]]:
    """group -> [(name, parameter)] in ``named_parameters`` order; every group present (maybe
    empty)."""
    groups: dict[str, list[tuple[str, torch.nn.Parameter]]] = {g: [] for g in PARAMETER_GROUPS}
    for name, param in model.named_parameters():
        groups[group_of(name).group].append((name, param))
    return groups
