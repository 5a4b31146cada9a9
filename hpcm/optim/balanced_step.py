"""The parameter step of ``Balanced``: skip on non-finite losses or gradients, else Cautious Adam.

The finiteness of the gradients is read from the clip's norm when no gradient changed since the
clip (``_record_clip``), so the step makes no second pass over them; on the host path both checks
cost one device synchronisation, on the ``sync_free`` path none.
"""

from __future__ import annotations

from typing import Callable

import torch


class BalancedParameterStep:
    """``step`` of ``Balanced`` (a mixin placed before ``CautiousAdam``, whose step it calls)."""

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None,
             task_losses: torch.Tensor | None = None):
        """Cautious Adam step; skipped when the losses or the gradients are not finite.

        ``task_losses`` is accepted for the official call signature; the official code only
        re-stores them as ``prev_loss`` (same values), which is all that happens here.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.sync_free:
            self._sync_free_step(task_losses)
            return loss
        stored = None
        if task_losses is not None and not self._skip_next_step:
            stored = task_losses.detach()
            if stored.dtype not in (torch.float32, torch.float64):
                stored = stored.float()
            if stored.shape != (self.n_tasks,):
                stored = None
        if self._skip_next_step:
            gradients_finite = False
        else:
            # One host synchronisation for both checks (gradients, and the re-stored losses).
            gradients_finite, losses_finite = self._finite_flags(stored, self._current_clip_norm())
            if losses_finite:
                self.prev_loss = stored.clone()
        self._clip_record = None
        if not gradients_finite:
            self._skip_next_step = False
            self._last_step_skipped = True
            self._pending_update = False
            self.skipped_steps += 1
            return loss
        super().step()
        self._last_step_skipped = False
        self._pending_update = self.update_mode == "next_batch" and self.weighting == "famo"
        return loss

    def _sync_free_step(self, task_losses: torch.Tensor | None) -> None:
        flags = self._sf
        if task_losses is not None and task_losses.shape == (self.n_tasks,):
            stored = task_losses.detach().float()
            restore = flags.ok_losses & torch.isfinite(stored).all()
            self.prev_loss = torch.where(restore, stored, self.prev_loss)
        norm, self._clip_record = self._current_clip_norm(), None
        ok = self.sync_free_step(flags.ok_losses, None if norm is None else torch.isfinite(norm))
        flags.last_skipped = ~ok
        flags.pending = ok & (self.update_mode == "next_batch")
        flags.ok_losses = torch.ones((), dtype=torch.bool, device=self.device)

    def _record_clip(self, norm: torch.Tensor, clipped: list[torch.Tensor]) -> None:
        """Keep the clip's gradient norm for ``step`` when the clip saw every parameter we step.

        A norm is finite exactly when every gradient element is (the official HPCM loop tests
        it so), which saves ``step`` a second pass over the gradients. The gradients and their
        version counters are kept too: a gradient replaced or changed in place after the clip
        makes ``step`` check the gradients themselves. Writes that bypass version counters
        (through ``.grad.data`` or a numpy view) are not seen: code that edits gradients after
        ``backward_with_task_balancing`` must use ordinary in-place ops.
        """
        clipped_ids = {id(p) for p in clipped}
        stepped = [p for g in self.param_groups for p in g["params"]]
        if all(id(p) in clipped_ids for p in stepped):
            grads = [p.grad for p in stepped]
            self._clip_record = (norm, grads, [None if g is None else g._version for g in grads])

    def _current_clip_norm(self) -> torch.Tensor | None:
        """The recorded clip norm if no gradient changed since; else None."""
        if self._clip_record is None:
            return None
        norm, grads, versions = self._clip_record
        stepped = [p for g in self.param_groups for p in g["params"]]
        if len(stepped) != len(grads):
            return None
        for p, grad, version in zip(stepped, grads, versions):
            if p.grad is not grad or (grad is not None and grad._version != version):
                return None
        return norm

    def _finite_flags(self, losses: torch.Tensor | None, grad_norm: torch.Tensor | None) -> tuple[bool, bool]:
        """(all gradients finite, ``losses`` given and finite), read with a single device sync.

        ``grad_norm``: the norm over every gradient, when the clip has computed it already.
        """
        grads = [] if grad_norm is not None else [
            p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        flags = []
        if grad_norm is not None:
            flags.append(torch.isfinite(grad_norm).to(self.device))
        elif grads:
            # A norm is finite exactly when every element is; one list kernel per device.
            norms = torch._foreach_norm(grads, 2.0)
            flags.append(torch.isfinite(torch.stack([n.float().to(self.device) for n in norms])).all())
        else:
            flags.append(torch.ones((), dtype=torch.bool, device=self.device))
        if losses is not None:
            flags.append(torch.isfinite(losses.to(self.device)).all())
        values = torch.stack(flags).tolist()
        return bool(values[0]), len(values) > 1 and bool(values[1])
