"""QP task weighting of ``Balanced`` (Solution 2): per-task gradients, analytic weights.

The weights themselves are ``hpcm.optim.qp.qp_task_weights`` on the Gram matrix of the log-loss
gradients; here the per-task backward passes and their convex combination into ``.grad``.
"""

from __future__ import annotations

import torch

from hpcm.optim.balanced_famo import LOG_EPS
from hpcm.optim.qp import gram_matrix, qp_task_weights


class QPWeighting:
    """The QP half of ``Balanced`` (a mixin: the state lives in ``Balanced.__init__``)."""

    def _trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for g in self.param_groups for p in g["params"] if p.requires_grad]

    def _solve_qp(self, losses: torch.Tensor, retain_graph: bool, average_gradients=None):
        """Per-task gradients, QP weights on their log-loss versions; returns (weights, grads).

        ``average_gradients`` (data-parallel training) averages each task's gradients over the
        processes before the Gram matrix, so the weights are those of the global batch."""
        params = self._trainable_parameters()
        gaps = (losses - self.min_losses + LOG_EPS).detach()
        task_grads = []
        for i in range(self.n_tasks):
            keep = retain_graph or i < self.n_tasks - 1
            grads = list(torch.autograd.grad(losses[i], params, retain_graph=keep, allow_unused=True))
            if average_gradients is not None:
                average_gradients(grads)
            task_grads.append(grads)
        gram = gram_matrix(task_grads)
        inv_gap = (1.0 / gaps.double()).cpu()
        log_gram = gram * inv_gap.unsqueeze(0) * inv_gap.unsqueeze(1)
        weights = qp_task_weights(log_gram).to(device=self.device, dtype=torch.float32)
        return weights, task_grads

    def _qp_backward(self, losses: torch.Tensor, average_gradients=None) -> torch.Tensor:
        checked = self._check_losses(losses, "task losses")
        if checked is None:
            self._skip_next_step = True
            self.prev_loss = None
            return torch.tensor(float("nan"), device=self.device)
        self._skip_next_step = False
        self.qp_weights, task_grads = self._solve_qp(checked, retain_graph=False, average_gradients=average_gradients)
        self.prev_loss = checked.detach().clone()
        loss = self._surrogate(self.prev_loss, self._surrogate_weights(self.qp_weights))
        coefficient_list = self.last_effective_weights.tolist()
        with torch.no_grad():
            for k, p in enumerate(self._trainable_parameters()):
                parts = [(a, g[k]) for a, g in zip(coefficient_list, task_grads) if g[k] is not None]
                if not parts:
                    continue
                combined = sum(a * g for a, g in parts)
                p.grad = combined if p.grad is None else p.grad.add_(combined)
        return loss
