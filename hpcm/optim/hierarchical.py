"""HierarchicalBalanced: Balanced over HPCM's 5 scale tasks (seed Phase 3).

Tasks, in this order: [s1_d, s1_b, s2_d, s2_b, s3_b] (``HIERARCHICAL_TASKS``).

* Per-task gammas from the three scale gammas: [g1, g1, g2, g2, g3]; the logit update is
  g_w = (diag(z) - z z^T) delta + gammas * w (elementwise), as in the seed.
* Scale modulation: scale_weights [a, b, c] become per-task factors [a, a, b, b, c]; the FAMO
  probabilities are modulated and renormalised, z' = z*f / sum(z*f), and the surrogate is
  (1/c') sum_i z'_i log D_i with c' = sum_i z'_i / D_i. The seed divides by c of the
  UNmodulated z instead; that changes only the overall gradient scale (Adam is invariant to
  it up to eps, and the norm clip sees it), and with c' the task gradients form a convex
  combination exactly as in Balanced, so equal scale weights give back Balanced exactly.
* ``get_task_weights`` / ``get_scale_contributions`` report z (unmodulated), as the seed does.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch

from hpcm.config.optimizers import W_LR
from hpcm.config.presets import DEFAULT_GAMMAS, DEFAULT_SCALE_WEIGHTS

# Defined once in hpcm.config.tasks; hpcm.optim re-exports HIERARCHICAL_TASKS and SEED_TASK_NAMES.
from hpcm.config.tasks import HIERARCHICAL_TASKS, SCALES, SEED_TASK_NAMES, TASK_SCALE  # noqa: F401
from hpcm.optim.balanced import Balanced
from hpcm.optim.registry import register_optimizer


def per_task(values: Sequence[float], what: str) -> list[float]:
    """Expand [s1, s2, s3] values to the 5 tasks: [s1, s1, s2, s2, s3]."""
    values = [float(v) for v in values]
    if len(values) != 3:
        raise ValueError(f"{what} needs 3 values [s1, s2, s3], got {values}")
    return [values[scale] for scale in TASK_SCALE]


class HierarchicalBalanced(Balanced):
    """Balanced with 5 scale tasks, per-scale gammas and scale modulation (seed API)."""

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        n_tasks: int = 5,
        gamma_s1: float = DEFAULT_GAMMAS[0],
        gamma_s2: float = DEFAULT_GAMMAS[1],
        gamma_s3: float = DEFAULT_GAMMAS[2],
        w_lr: float = W_LR,
        max_norm: float = 1.0,
        scale_weights: Sequence[float] | None = None,
        **kwargs,
    ):
        if n_tasks != 5:
            raise ValueError(f"HierarchicalBalanced requires n_tasks=5, got {n_tasks}")
        if kwargs.get("weighting", "famo") != "famo":
            raise ValueError("HierarchicalBalanced supports weighting='famo' only")
        kwargs.setdefault("task_names", SEED_TASK_NAMES)
        super().__init__(
            params,
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            amsgrad=amsgrad,
            n_tasks=5,
            gamma=0.0,
            w_lr=w_lr,
            max_norm=max_norm,
            **kwargs,
        )
        self.set_scale_gammas(gamma_s1, gamma_s2, gamma_s3)
        self.set_scale_weights(DEFAULT_SCALE_WEIGHTS if scale_weights is None else scale_weights)

    def set_scale_gammas(self, gamma_s1: float, gamma_s2: float, gamma_s3: float) -> None:
        gammas = per_task([gamma_s1, gamma_s2, gamma_s3], "scale gammas")
        if any(not g >= 0 for g in gammas):
            raise ValueError(f"scale gammas must be >= 0, got {[gamma_s1, gamma_s2, gamma_s3]}")
        # Filled in place with Python scalars: a fresh torch.tensor(..., device=cuda) every
        # training step would be a blocking host->device copy.
        for i, value in enumerate(gammas):
            self.task_gammas[i].fill_(value)

    @property
    def gamma(self) -> float:
        """Mean of the three scale gammas (the seed's avg_gamma); setting it sets all scales."""
        return sum(self.scale_gammas.values()) / 3

    @gamma.setter
    def gamma(self, value: float) -> None:
        Balanced.gamma.fset(self, value)

    @property
    def scale_gammas(self) -> dict[str, float]:
        return {
            scale: float(self.task_gammas[TASK_SCALE.index(i)]) for i, scale in enumerate(SCALES)
        }

    def set_scale_weights(self, scale_weights: Sequence[float]) -> None:
        factors = per_task(scale_weights, "scale_weights")
        if any(not f > 0 for f in factors):
            raise ValueError(f"scale_weights must be > 0, got {list(scale_weights)}")
        self.scale_weights = [float(v) for v in scale_weights]
        self.task_modulation = torch.tensor(factors, device=self.device)

    def get_scale_contributions(self) -> dict[str, float]:
        """Sum of z over each scale's tasks: s1 = z0 + z1, s2 = z2 + z3, s3 = z4."""
        z = self._task_probabilities().tolist()
        totals = [0.0, 0.0, 0.0]
        for value, scale in zip(z, TASK_SCALE):
            totals[scale] += value
        return dict(zip(SCALES, totals))

    def _balancing_state(self) -> dict:
        state = super()._balancing_state()
        state["scale_weights"] = list(self.scale_weights)
        return state

    def _load_balancing_state(self, extra: dict) -> None:
        super()._load_balancing_state(extra)
        self.set_scale_weights(extra["scale_weights"])


@register_optimizer("hierarchical_balanced")
def build_hierarchical_balanced(
    params: Iterable,
    lr: float,
    *,
    max_norm: float,
    min_losses: float,
    sync_free: bool,
    gammas: Sequence[float],
    w_lr: float,
    update_mode: str,
    scale_weights: Sequence[float],
) -> HierarchicalBalanced:
    g1, g2, g3 = (float(g) for g in gammas)
    return HierarchicalBalanced(
        params,
        lr=lr,
        gamma_s1=g1,
        gamma_s2=g2,
        gamma_s3=g3,
        w_lr=w_lr,
        max_norm=max_norm,
        scale_weights=scale_weights,
        min_losses=min_losses,
        update_mode=update_mode,
        sync_free=sync_free,
    )
