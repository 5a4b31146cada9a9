"""Optimizers of the study: Cautious Adam, Balanced (FAMO / QP weighting), HierarchicalBalanced.

``build_optimizer`` maps the run-config name (adam | cautious_adam | balanced | qp |
hierarchical_balanced) to a constructed optimizer, so the training module stays a thin wiring;
``backward_and_step`` is the one training update (backward, clip, skip, step) of all of them.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch

from hpcm.config.run_config import (
    OPTIMIZERS as OPTIMIZER_NAMES,  # the run config's `optimizer` choices
)
from hpcm.optim.balanced import LOG_EPS, UPDATE_MODES, WEIGHTINGS, Balanced
from hpcm.optim.cautious_adam import CautiousAdam
from hpcm.optim.hierarchical import HIERARCHICAL_TASKS, SEED_TASK_NAMES, HierarchicalBalanced
from hpcm.optim.qp import qp_task_weights
from hpcm.optim.step import backward_and_step


def build_optimizer(
    name: str,
    params: Iterable,
    lr: float,
    *,
    gamma: float = 0.003,
    w_lr: float = 0.025,
    max_norm: float = 1.0,
    update_mode: str = "same_batch",
    gammas: Sequence[float] = (0.008, 0.006, 0.004),
    scale_weights: Sequence[float] = (0.3, 0.4, 0.3),
    min_losses: float = -1.0,
    sync_free: bool = False,
) -> torch.optim.Optimizer:
    """One optimizer from its run-config name; unknown names raise ValueError listing the valid ones.

    ``sync_free`` (CautiousAdam and the FAMO optimizers; QP decides on the host) keeps the skip
    decisions on the device, see ``hpcm.optim.balanced``.
    """
    if name == "adam":
        # Fused (CPU and CUDA): it honours ``found_inf``, so training skips a non-finite batch on
        # the device without a host sync (``backward_and_step`` sets it before step).
        return torch.optim.Adam(params, lr=lr, fused=True)
    if name == "cautious_adam":
        return CautiousAdam(params, lr=lr, sync_free=sync_free)
    if name in ("balanced", "qp"):
        return Balanced(params, lr=lr, n_tasks=2, gamma=gamma, w_lr=w_lr, max_norm=max_norm,
                        min_losses=min_losses, update_mode=update_mode,
                        weighting="qp" if name == "qp" else "famo", sync_free=sync_free and name != "qp")
    if name == "hierarchical_balanced":
        g1, g2, g3 = (float(g) for g in gammas)
        return HierarchicalBalanced(params, lr=lr, gamma_s1=g1, gamma_s2=g2, gamma_s3=g3,
                                    w_lr=w_lr, max_norm=max_norm, scale_weights=scale_weights,
                                    min_losses=min_losses, update_mode=update_mode, sync_free=sync_free)
    raise ValueError(f"unknown optimizer {name!r}; valid names: {', '.join(OPTIMIZER_NAMES)}")


__all__ = [
    "Balanced", "CautiousAdam", "HierarchicalBalanced", "build_optimizer", "backward_and_step", "qp_task_weights",
    "OPTIMIZER_NAMES", "UPDATE_MODES", "WEIGHTINGS", "HIERARCHICAL_TASKS", "SEED_TASK_NAMES", "LOG_EPS",
]
