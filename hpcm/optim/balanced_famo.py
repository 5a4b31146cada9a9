"""FAMO task weighting of ``Balanced``: the logit update after each parameter step.

With z = softmax(w) and L' the losses after the step (same batch, or the next batch in
``next_batch`` mode): delta_i = log D_i(L) - log D_i(L'), g_w = (diag(z) - z z^T) delta + gamma * w,
then one torch Adam step on w (research/balanced.md section 2.3). ``sync_free`` variants of the
loss check and the weighted loss keep every decision on the device (``balanced_sync_free``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hpcm.optim.balanced_sync_free import gated

LOG_EPS = 1e-8  # inside the log, as in FAMO and the official code


class FamoWeighting:
    """The FAMO half of ``Balanced`` (a mixin: the state lives in ``Balanced.__init__``)."""

    def update_task_weights(self, curr_loss: torch.Tensor) -> None:
        """same_batch mode: one Adam step on the logits from the post-step losses.

        Skipped (and counted) when the last step was skipped or ``curr_loss`` is not finite.
        A no-op for ``weighting="qp"``.
        """
        if self.weighting == "qp":
            return
        if self.update_mode == "next_batch":
            raise RuntimeError(
                "update_task_weights is not used with update_mode='next_batch': the next "
                "get_weighted_loss call applies the update with the next batch's losses")
        if self.sync_free:
            flags = self._sf
            ok = self._sync_free_check(curr_loss.detach(), "post-step losses")
            not_skipped = ~flags.last_skipped & flags.prev_valid
            self._skipped_weight_updates.add_((flags.last_skipped | (not_skipped & ~ok)).float())
            self._apply_weight_update(torch.where(ok, curr_loss.detach().float(), self.prev_loss),
                                      apply=not_skipped & ok)
            return
        if self._last_step_skipped:
            self.skipped_weight_updates += 1
            return
        if self.prev_loss is None:  # no step taken yet: nothing to compare with (official)
            return
        checked = self._check_losses(curr_loss.detach(), "post-step losses")
        if checked is None:
            self.skipped_weight_updates += 1
            return
        self._apply_weight_update(checked)

    def _apply_weight_update(self, curr_loss: torch.Tensor, apply: torch.Tensor | None = None) -> None:
        """One Adam step on w; with ``apply`` (sync_free) w and its Adam state change only where true."""
        if self.prev_loss is None:
            return
        if apply is not None:
            with gated(apply, [self.w], self.w_opt):
                self._apply_weight_update(curr_loss)
            return
        with torch.no_grad():
            delta = (self.prev_loss - self.min_losses + LOG_EPS).log() - (
                curr_loss - self.min_losses + LOG_EPS).log()
            z = F.softmax(self.w, -1)
            # Vector-Jacobian product of softmax: (diag(z) - z z^T) delta.
            grad = z * (delta - (z * delta).sum())
            grad = grad + self.task_gammas * self.w
        self.w_opt.zero_grad()
        self.w.grad = grad.to(self.w.dtype)
        self.w_opt.step()

    def _sync_free_check(self, losses: torch.Tensor, what: str) -> torch.Tensor:
        """Device bool: losses finite and above min_losses; a finite loss below is recorded."""
        if losses.shape != (self.n_tasks,):
            raise ValueError(f"{what} must have shape ({self.n_tasks},), got {tuple(losses.shape)}")
        values = losses.detach().float()
        finite = torch.isfinite(values).all()
        below = finite & (values - self.min_losses + LOG_EPS <= 0).any()
        self._sf.below_losses = torch.where(below, values, self._sf.below_losses)
        self._sf.below |= below
        return finite & ~below

    def _sync_free_weighted_loss(self, losses: torch.Tensor) -> torch.Tensor:
        """get_weighted_loss with every decision on the device (see the module docstring)."""
        flags = self._sf
        ok = self._sync_free_check(losses, "task losses")
        checked = losses if losses.dtype in (torch.float32, torch.float64) else losses.float()
        values = checked.detach().float()
        if self.update_mode == "next_batch":  # the pending update, with these losses as L'
            self._skipped_weight_updates.add_((flags.pending & ~ok).float())
            self._apply_weight_update(torch.where(ok, values, self.prev_loss), apply=flags.pending & ok)
            flags.pending = torch.zeros((), dtype=torch.bool, device=self.device)
        flags.ok_losses = ok
        flags.prev_valid = ok
        self.prev_loss = torch.where(ok, values, self.prev_loss)
        # a NaN surrogate when not ok: the step then skips
        return self._surrogate(checked, self._surrogate_weights(self._task_probabilities()))
