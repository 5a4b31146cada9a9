"""Optimizers of the study: Cautious Adam, Balanced (FAMO / QP weighting), HierarchicalBalanced.

Every optimizer a run config may name has an ``OptimizerSpec`` (``hpcm.config.optimizers``) and a
builder registered under the same name (``hpcm.optim.registry.register_optimizer``);
``build_optimizer`` builds one from its name, and ``backward_and_step`` (``hpcm.optim.step``) is
the one training update (backward, clip, skip, step) of all of them. Importing this package
imports every optimizer module, which registers its builders.
"""

from __future__ import annotations

from hpcm.config.optimizers import OPTIMIZER_SPECS, UPDATE_MODES, OptimizerSpec, optimizer_spec
from hpcm.config.run_config import OPTIMIZERS as OPTIMIZER_NAMES  # the run config's choices
from hpcm.optim.balanced import LOG_EPS, WEIGHTINGS, Balanced
from hpcm.optim.cautious_adam import CautiousAdam
from hpcm.optim.hierarchical import HIERARCHICAL_TASKS, SEED_TASK_NAMES, HierarchicalBalanced
from hpcm.optim.qp import qp_task_weights
from hpcm.optim.registry import build_optimizer, register_optimizer
from hpcm.optim.step import backward_and_step

__all__ = [
    "Balanced",
    "CautiousAdam",
    "HierarchicalBalanced",
    "build_optimizer",
    "backward_and_step",
    "register_optimizer",
    "qp_task_weights",
    "OPTIMIZER_NAMES",
    "OPTIMIZER_SPECS",
    "OptimizerSpec",
    "optimizer_spec",
    "UPDATE_MODES",
    "WEIGHTINGS",
    "HIERARCHICAL_TASKS",
    "SEED_TASK_NAMES",
    "LOG_EPS",
]
