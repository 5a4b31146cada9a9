"""Balanced R-D: Cautious Adam on the model plus FAMO (or QP) weighting of the task losses.

One training step of ``Balanced`` (research/balanced.md sections 2.2-2.4, the official
``Balanced`` class), in the order ``hpcm.optim.step.backward_and_step`` runs it and in the order
of this file:

1. ``backward_with_task_balancing(L)``: the surrogate, its backward, the clip. With logits w,
   z = softmax(w), lower bounds m (default -1) and D_i = L_i - m_i + 1e-8:

       loss = (1/c) sum_i z_i log D_i,   c = sum_i z_i / D_i (detached);

   its gradient is the convex combination sum_i a_i grad L_i, a_i = (z_i / D_i) / c.
   ``weighting="qp"`` replaces z by the analytic Solution-2 weights (``hpcm.optim.qp``): one
   backward per task, the QP weights from the Gram matrix of the log-loss gradients, the same
   renormalised combination written into ``.grad``.
2. ``step()``: the Cautious Adam step (``CautiousAdam``), skipped when the losses or the gradients
   are not finite (the gradients' finiteness is read from the clip's norm).
3. ``update_task_weights(L')`` (FAMO, ``same_batch``), with L' the losses of the updated model:

       delta_i = log D_i(L) - log D_i(L'),   g_w = (diag(z) - z z^T) delta + gamma * w,

   and one torch Adam step (lr = w_lr, betas 0.9/0.999, eps 1e-8) on w.

Weight-update modes (``update_mode``):

* ``same_batch`` (official): after ``step`` the training loop runs a second, no-grad forward
  on the SAME batch and passes its losses to ``update_task_weights``. delta then measures only
  the effect of the parameter step (plus fresh quantisation noise), at the cost of one extra
  forward pass per iteration (about +20 % step time).
* ``next_batch``: no extra forward. The next call of ``get_weighted_loss`` (next iteration,
  next batch) first applies the pending update with that batch's losses as L'. Free, but delta
  now also contains the difference in difficulty between two batches: noisier weights, which
  the Adam averaging on w and gamma damp. ``update_task_weights`` must not be called.
  ``needs_second_forward`` tells the loop which of the two it is.

Non-finite task losses (or, in ``same_batch``, non-finite second-forward losses) and non-finite
gradients skip the parameter step and the weight update; ``skipped_steps`` and
``skipped_weight_updates`` count them. A finite loss at or below its lower bound is a
configuration error (log of a non-positive number) and raises ``ValueError``.

``sync_free=True`` (FAMO only; ``hpcm.train`` uses it on CUDA) takes every skip decision on the
device, with no host synchronisation per step: a 0-dim bool ``ok`` gates, through
``torch.where``, the moments, the parameters and their device step counters (``CautiousAdam``),
the logits w and their Adam state, prev_loss and the pending-update flag; ``skipped_steps`` and
``skipped_weight_updates`` accumulate on the device and are read (one sync) only when accessed.
The results are bitwise those of the default path. Difference: a finite loss at or below
min_losses skips the step (as a non-finite one) and its ``ValueError`` is raised at the next
read of ``skipped_steps`` / ``skipped_weight_updates`` or call of ``raise_deferred_errors``
(the training loop reads them at every logging point), not at once. Each method of the step has
its ``_sync_free_*`` twin right after it.

With one task the surrogate's gradient is exactly grad L (a = 1): plain Cautious Adam.
``state_dict`` is the torch layout of the moments plus everything of the task weighting under
'balancing': the layout of ``balanced_state_*.pth`` files and training checkpoints (keep it
stable, old files must load).
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F

from hpcm.config.optimizers import GAMMA, UPDATE_MODES, W_LR
from hpcm.config.tasks import RD_TASKS
from hpcm.optim.cautious_adam import CautiousAdam
from hpcm.optim.qp import gram_matrix, qp_task_weights
from hpcm.optim.registry import register_optimizer
from hpcm.util.io import atomic_torch_save

LOG_EPS = 1e-8  # inside the log, as in FAMO and the official code
WEIGHTINGS = ("famo", "qp")


def default_task_names(n_tasks: int) -> list[str]:
    if n_tasks == len(RD_TASKS):
        return list(RD_TASKS)
    return [f"task{i}" for i in range(n_tasks)]


class Balanced(CautiousAdam):
    """Cautious Adam + FAMO (or QP) task balancing with the seed API (``set_min_losses``, ...)."""

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        n_tasks: int = 2,
        gamma: float = GAMMA,
        w_lr: float = W_LR,
        max_norm: float = 1.0,
        *,
        min_losses: float | Sequence[float] | torch.Tensor = -1.0,
        update_mode: str = UPDATE_MODES[0],
        weighting: str = "famo",
        cautious: bool = True,
        task_names: Sequence[str] | None = None,
        device: torch.device | str | None = None,
        foreach: bool | None = None,
        sync_free: bool = False,
    ):
        super().__init__(
            params,
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            amsgrad=amsgrad,
            cautious=cautious,
            foreach=foreach,
            sync_free=sync_free,
        )
        if sync_free and weighting != "famo":
            raise ValueError(
                "sync_free=True supports weighting='famo' only (QP solves on the host)"
            )
        if int(n_tasks) != n_tasks or n_tasks < 1:
            raise ValueError(f"n_tasks must be a positive integer, got {n_tasks!r}")
        if update_mode not in UPDATE_MODES:
            raise ValueError(f"update_mode must be one of {UPDATE_MODES}, got {update_mode!r}")
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
        if not w_lr > 0:
            raise ValueError(f"w_lr must be > 0, got {w_lr}")
        if not max_norm >= 0:
            raise ValueError(f"max_norm must be >= 0 (0 disables clipping), got {max_norm}")
        # configuration
        self.n_tasks = int(n_tasks)
        self.task_names = (
            list(task_names) if task_names is not None else default_task_names(self.n_tasks)
        )
        if len(self.task_names) != self.n_tasks:
            raise ValueError(
                f"task_names has {len(self.task_names)} names for n_tasks={self.n_tasks}"
            )
        first = next((p for g in self.param_groups for p in g["params"]), None)
        self.device = (
            torch.device(device)
            if device is not None
            else (first.device if first is not None else torch.device("cpu"))
        )
        self.max_norm = float(max_norm)
        self.update_mode = update_mode
        self.weighting = weighting
        # the task weighting: logits w and their Adam (FAMO), or the last QP weights
        self.w = torch.zeros(self.n_tasks, device=self.device, requires_grad=True)
        # capturable on CUDA keeps the step count of w on the device (sync_free gating needs it);
        # on both paths, so that they run the same arithmetic (capturable Adam computes its bias
        # corrections on the device in float32, the default one on the host in double)
        self.w_opt = torch.optim.Adam([self.w], lr=w_lr, capturable=self.device.type == "cuda")
        self.task_gammas = torch.full((self.n_tasks,), float(gamma), device=self.device)
        self.task_modulation: torch.Tensor | None = None  # per-task factors (HierarchicalBalanced)
        self.min_losses = torch.zeros(self.n_tasks, device=self.device)
        self.set_min_losses(min_losses)
        self.qp_weights = torch.full((self.n_tasks,), 1.0 / self.n_tasks, device=self.device)
        self.last_effective_weights: torch.Tensor | None = None
        # between the calls of one step: the losses L of the surrogate, and what was skipped
        self.prev_loss: torch.Tensor | None = None
        if sync_free:  # a tensor always; prev_valid says whether it holds losses
            self.prev_loss = torch.zeros(self.n_tasks, device=self.device)
        self._skipped_weight_updates = torch.zeros((), device=self.device) if self.sync_free else 0
        if not self.sync_free:
            self.skipped_steps = 0
        self._sf = SyncFreeFlags(self.device, self.n_tasks) if self.sync_free else None
        self._pending_update = False  # next_batch: a step was taken since prev_loss was stored
        self._skip_next_step = False  # the current losses were non-finite
        self._clip_record: tuple | None = None  # (norm, grads, versions) of the last clip
        self._last_step_skipped = False

    # ================================================================== 1. the backward
    def backward_with_task_balancing(
        self,
        losses: torch.Tensor,
        shared_parameters: Iterable[torch.nn.Parameter] | torch.Tensor | None = None,
        *,
        average_gradients: Callable[[list[torch.Tensor | None]], None] | None = None,
    ) -> torch.Tensor:
        """Weighted loss, backward, then clip to ``max_norm`` (when parameters are given).

        Returns the surrogate loss (NaN, with no backward, when the losses are not finite).
        ``average_gradients`` (data-parallel training) averages gradients over the processes in
        place before the clip: the optimizer's parameter gradients (FAMO), or each task's gradient
        before the QP solve (QP), so every process sees the same weights, norm and skip decision.
        """
        if self.weighting == "famo":
            loss = self.get_weighted_loss(losses)
            if self._skip_next_step:
                return loss.detach()
            loss.backward()
            if average_gradients is not None:
                average_gradients([p.grad for p in self._trainable_parameters()])
        else:
            loss = self._qp_backward(losses, average_gradients)
            if self._skip_next_step:
                return loss
        self._clip_record = None
        if self.max_norm > 0 and shared_parameters is not None:
            clipped = (
                [shared_parameters]
                if torch.is_tensor(shared_parameters)
                else list(shared_parameters)
            )
            norm = torch.nn.utils.clip_grad_norm_(clipped, self.max_norm)
            self._record_clip(norm, clipped)
        return loss

    def get_weighted_loss(self, losses: torch.Tensor) -> torch.Tensor:
        """The FAMO surrogate (1/c) sum_i z_i log(L_i - m_i + eps); stores prev_loss."""
        if self.sync_free:
            return self._sync_free_weighted_loss(losses)
        checked = self._check_losses(losses, "task losses")
        if self.update_mode == "next_batch" and self._pending_update:
            self._pending_update = False
            if checked is None:
                self.skipped_weight_updates += 1
            else:
                self._apply_weight_update(checked.detach())
        if checked is None:
            self._skip_next_step = True
            self.prev_loss = None
            return losses.float().sum() * float("nan")
        self._skip_next_step = False
        if self.weighting == "qp":
            self.qp_weights = self._solve_qp(checked, retain_graph=True)[0]
        self.prev_loss = checked.detach().clone()
        return self._surrogate(checked, self._surrogate_weights(self._task_probabilities()))

    def _sync_free_weighted_loss(self, losses: torch.Tensor) -> torch.Tensor:
        """get_weighted_loss with every decision on the device (see the module docstring)."""
        flags = self._sf
        ok = self._sync_free_check(losses, "task losses")
        checked = losses if losses.dtype in (torch.float32, torch.float64) else losses.float()
        values = checked.detach().float()
        if self.update_mode == "next_batch":  # the pending update, with these losses as L'
            self._skipped_weight_updates.add_((flags.pending & ~ok).float())
            self._apply_weight_update(
                torch.where(ok, values, self.prev_loss), apply=flags.pending & ok
            )
            flags.pending = torch.zeros((), dtype=torch.bool, device=self.device)
        flags.ok_losses = ok
        flags.prev_valid = ok
        self.prev_loss = torch.where(ok, values, self.prev_loss)
        # a NaN surrogate when not ok: the step then skips
        return self._surrogate(checked, self._surrogate_weights(self._task_probabilities()))

    def _check_losses(self, losses: torch.Tensor, what: str) -> torch.Tensor | None:
        """Validate shape; return the losses (at least fp32), or None when they are not finite."""
        if losses.shape != (self.n_tasks,):
            raise ValueError(f"{what} must have shape ({self.n_tasks},), got {tuple(losses.shape)}")
        if losses.dtype not in (torch.float32, torch.float64):
            losses = losses.float()  # fp16/bf16 losses from autocast
        detached = losses.detach()
        finite, below = torch.stack(
            [
                torch.isfinite(detached).all(),
                (detached - self.min_losses + LOG_EPS <= 0).any(),
            ]
        ).tolist()  # one device sync for both checks
        if not finite:
            return None
        if below:
            raise ValueError(
                f"{what} {detached.tolist()} are at or below min_losses {self.min_losses.tolist()} "
                f"(task names {self.task_names}); log(L - m) is undefined. Lower the bounds with "
                "set_min_losses (the official value is -1)."
            )
        return losses

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

    def _task_probabilities(self) -> torch.Tensor:
        """z = softmax(w), or the last QP weights; detached (w gets its gradient by hand)."""
        if self.weighting == "qp":
            return self.qp_weights
        with torch.no_grad():
            return F.softmax(self.w, -1)

    def _surrogate_weights(self, probabilities: torch.Tensor) -> torch.Tensor:
        if self.task_modulation is None:
            return probabilities
        modulated = probabilities * self.task_modulation
        return modulated / modulated.sum()

    def _surrogate(self, losses: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """(1/c) sum_i z_i log(L_i - m_i + eps) with c = sum_i z_i / (L_i - m_i + eps) detached;
        keeps the gradient coefficients a_i = z_i / (L_i - m_i + eps) / c."""
        gaps = losses - self.min_losses + LOG_EPS
        c = (weights / gaps).sum().detach()
        self.last_effective_weights = (weights / gaps.detach() / c).detach()
        return (gaps.log() * weights / c).sum()

    # ------------------------------------------------------------------ 1'. the QP backward
    def _trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for g in self.param_groups for p in g["params"] if p.requires_grad]

    def _qp_backward(self, losses: torch.Tensor, average_gradients=None) -> torch.Tensor:
        """Per-task backward passes, the QP weights, and their combination written into .grad."""
        checked = self._check_losses(losses, "task losses")
        if checked is None:
            self._skip_next_step = True
            self.prev_loss = None
            return torch.tensor(float("nan"), device=self.device)
        self._skip_next_step = False
        self.qp_weights, task_grads = self._solve_qp(
            checked, retain_graph=False, average_gradients=average_gradients
        )
        self.prev_loss = checked.detach().clone()
        loss = self._surrogate(self.prev_loss, self._surrogate_weights(self.qp_weights))
        coefficient_list = self.last_effective_weights.tolist()
        with torch.no_grad():
            for k, p in enumerate(self._trainable_parameters()):
                parts = [
                    (a, g[k]) for a, g in zip(coefficient_list, task_grads) if g[k] is not None
                ]
                if not parts:
                    continue
                combined = sum(a * g for a, g in parts)
                p.grad = combined if p.grad is None else p.grad.add_(combined)
        return loss

    def _solve_qp(self, losses: torch.Tensor, retain_graph: bool, average_gradients=None):
        """Per-task gradients, QP weights on their log-loss versions; returns (weights, grads).

        ``average_gradients`` (data-parallel training) averages each task's gradients over the
        processes before the Gram matrix, so the weights are those of the global batch."""
        params = self._trainable_parameters()
        gaps = (losses - self.min_losses + LOG_EPS).detach()
        task_grads = []
        for i in range(self.n_tasks):
            keep = retain_graph or i < self.n_tasks - 1
            grads = list(
                torch.autograd.grad(losses[i], params, retain_graph=keep, allow_unused=True)
            )
            if average_gradients is not None:
                average_gradients(grads)
            task_grads.append(grads)
        gram = gram_matrix(task_grads)
        inv_gap = (1.0 / gaps.double()).cpu()
        log_gram = gram * inv_gap.unsqueeze(0) * inv_gap.unsqueeze(1)
        weights = qp_task_weights(log_gram).to(device=self.device, dtype=torch.float32)
        return weights, task_grads

    # ================================================================== 2. the parameter step
    @torch.no_grad()
    def step(
        self,
        closure: Callable[[], torch.Tensor] | None = None,
        task_losses: torch.Tensor | None = None,
    ):
        """Cautious Adam step; skipped when the losses or the gradients are not finite.

        ``task_losses`` is accepted for the official call signature; the official code only
        re-stores them as ``prev_loss`` (same values), which is all that happens here.
        The finiteness of the gradients is read from the clip's norm when no gradient changed
        since the clip (``_record_clip``), so the step makes no second pass over them; on the
        host path both checks cost one device synchronisation, on the ``sync_free`` path none.
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
        super().step()  # CautiousAdam
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

    def _finite_flags(
        self, losses: torch.Tensor | None, grad_norm: torch.Tensor | None
    ) -> tuple[bool, bool]:
        """(all gradients finite, ``losses`` given and finite), read with a single device sync.

        ``grad_norm``: the norm over every gradient, when the clip has computed it already.
        """
        grads = (
            []
            if grad_norm is not None
            else [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        )
        flags = []
        if grad_norm is not None:
            flags.append(torch.isfinite(grad_norm).to(self.device))
        elif grads:
            # A norm is finite exactly when every element is; one list kernel per device.
            norms = torch._foreach_norm(grads, 2.0)
            stacked = torch.stack([n.float().to(self.device) for n in norms])
            flags.append(torch.isfinite(stacked).all())
        else:
            flags.append(torch.ones((), dtype=torch.bool, device=self.device))
        if losses is not None:
            flags.append(torch.isfinite(losses.to(self.device)).all())
        values = torch.stack(flags).tolist()
        return bool(values[0]), len(values) > 1 and bool(values[1])

    # ================================================================== 3. the task weights
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
                "get_weighted_loss call applies the update with the next batch's losses"
            )
        if self.sync_free:
            flags = self._sf
            ok = self._sync_free_check(curr_loss.detach(), "post-step losses")
            not_skipped = ~flags.last_skipped & flags.prev_valid
            self._skipped_weight_updates.add_((flags.last_skipped | (not_skipped & ~ok)).float())
            self._apply_weight_update(
                torch.where(ok, curr_loss.detach().float(), self.prev_loss), apply=not_skipped & ok
            )
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

    def _apply_weight_update(
        self, curr_loss: torch.Tensor, apply: torch.Tensor | None = None
    ) -> None:
        """One Adam step on w; with ``apply`` (sync_free) w and its state change only where true."""
        if self.prev_loss is None:
            return
        if apply is not None:
            with gated(apply, [self.w], self.w_opt):
                self._apply_weight_update(curr_loss)
            return
        with torch.no_grad():
            delta = (self.prev_loss - self.min_losses + LOG_EPS).log() - (
                curr_loss - self.min_losses + LOG_EPS
            ).log()
            z = F.softmax(self.w, -1)
            # Vector-Jacobian product of softmax: (diag(z) - z z^T) delta.
            grad = z * (delta - (z * delta).sum())
            grad = grad + self.task_gammas * self.w
        self.w_opt.zero_grad()
        self.w.grad = grad.to(self.w.dtype)
        self.w_opt.step()

    # ================================================================== configuration
    @property
    def gamma(self) -> float:
        """The logit L2 coefficient (mean over tasks when they differ, as the seed's avg_gamma)."""
        return float(self.task_gammas.mean())

    @gamma.setter
    def gamma(self, value: float) -> None:
        if not value >= 0:
            raise ValueError(f"gamma must be >= 0, got {value}")
        self.task_gammas.fill_(float(value))

    @property
    def needs_second_forward(self) -> bool:
        """True when the loop must run the no-grad forward and call ``update_task_weights``."""
        return self.weighting == "famo" and self.update_mode == "same_batch"

    def set_min_losses(self, losses: float | Sequence[float] | torch.Tensor) -> None:
        """Set the per-task lower bounds m (a scalar broadcasts to every task)."""
        value = torch.as_tensor(losses, dtype=torch.float32).detach().to(self.device)
        if value.ndim == 0:
            value = value.expand(self.n_tasks).clone()
        if value.shape != (self.n_tasks,):
            raise ValueError(
                f"min_losses must have shape ({self.n_tasks},), got {tuple(value.shape)}"
            )
        if not torch.isfinite(value).all():
            raise ValueError(f"min_losses must be finite, got {value.tolist()}")
        self.min_losses = value

    # ================================================================== counters and reporting
    @property
    def last_step_skipped(self) -> bool:
        """Whether the latest ``step`` was skipped (non-finite losses or gradients); syncs when
        sync_free."""
        if self.sync_free:
            return bool(self._sf.last_skipped)
        return self._last_step_skipped

    @property
    def skipped_steps(self) -> int:
        """Skipped parameter steps (sync_free: one read, and deferred errors raised here)."""
        if self.sync_free:
            self.raise_deferred_errors()
            return int(self.skipped_steps_device.item())
        return self._skipped_steps

    @skipped_steps.setter
    def skipped_steps(self, value: int) -> None:
        if self.sync_free:
            self.skipped_steps_device.fill_(float(value))
        else:
            self._skipped_steps = int(value)

    @property
    def skipped_weight_updates(self) -> int:
        if self.sync_free:
            self.raise_deferred_errors()
            return int(self._skipped_weight_updates.item())
        return self._skipped_weight_updates

    @skipped_weight_updates.setter
    def skipped_weight_updates(self, value: int) -> None:
        if self.sync_free:
            self._skipped_weight_updates.fill_(float(value))
        else:
            self._skipped_weight_updates = int(value)

    def raise_deferred_errors(self) -> None:
        """sync_free: raise the ValueError of a finite loss at or below min_losses seen so far."""
        if self.sync_free and bool(self._sf.below):
            self._sf.below.fill_(False)
            raise ValueError(
                f"task losses {self._sf.below_losses.tolist()} were at or below min_losses "
                f"{self.min_losses.tolist()} (task names {self.task_names}); log(L - m) is "
                "undefined (those steps were skipped). Lower the bounds with set_min_losses "
                "(the official value is -1)."
            )

    def get_task_weights(self) -> dict[str, float]:
        """z = softmax(w) (FAMO) or the last QP weights, by task name."""
        values = self._task_probabilities().tolist()
        return dict(zip(self.task_names, values))

    def get_effective_weights(self) -> dict[str, float]:
        """a_i of the last surrogate: the convex coefficients of the task gradients."""
        if self.last_effective_weights is None:
            return {}
        return dict(zip(self.task_names, self.last_effective_weights.tolist()))

    # ================================================================== state dict and files
    def state_dict(self) -> dict:
        """Model moments (torch layout) plus everything of the task weighting under 'balancing'."""
        state = super().state_dict()
        state["balancing"] = self._balancing_state()
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        extra = state_dict.pop("balancing", None)
        if extra is None:
            raise ValueError(
                "optimizer state has no 'balancing' entry: it was not saved by Balanced "
                "(a torch Adam state cannot resume Balanced; start a fresh optimizer instead)"
            )
        for key, mine in (
            ("n_tasks", self.n_tasks),
            ("weighting", self.weighting),
            ("update_mode", self.update_mode),
        ):
            if extra[key] != mine:
                raise ValueError(
                    f"saved Balanced state has {key}={extra[key]!r}, this optimizer {mine!r}"
                )
        super().load_state_dict(state_dict)
        self._load_balancing_state(extra)

    def _balancing_state(self) -> dict:
        sf = self._sf
        state = {
            "n_tasks": self.n_tasks,
            "task_names": list(self.task_names),
            "weighting": self.weighting,
            "update_mode": self.update_mode,
            "max_norm": self.max_norm,
            "w": self.w.detach().clone(),
            "w_optimizer_state": self.w_opt.state_dict(),
            "task_gammas": self.task_gammas.clone(),
            "min_losses": self.min_losses.clone(),
            "prev_loss": None if self.prev_loss is None else self.prev_loss.clone(),
            "qp_weights": self.qp_weights.clone(),
            "pending_update": self._pending_update if sf is None else bool(sf.pending),
            "last_step_skipped": self._last_step_skipped if sf is None else bool(sf.last_skipped),
            "skipped_steps": self.skipped_steps,
            "skipped_weight_updates": self.skipped_weight_updates,
        }
        if sf is not None and not bool(sf.prev_valid):
            state["prev_loss"] = None
        return state

    def _load_balancing_state(self, extra: dict) -> None:
        with torch.no_grad():
            self.w.copy_(extra["w"].to(self.device))
        self.w_opt.load_state_dict(extra["w_optimizer_state"])
        self.task_gammas = extra["task_gammas"].to(self.device).clone()
        self.min_losses = extra["min_losses"].to(self.device).clone()
        prev = extra["prev_loss"]
        self.prev_loss = None if prev is None else prev.to(self.device).clone()
        self.qp_weights = extra["qp_weights"].to(self.device).clone()
        self.max_norm = float(extra["max_norm"])
        self._pending_update = bool(extra["pending_update"])
        self._last_step_skipped = bool(extra["last_step_skipped"])
        self.skipped_steps = int(extra["skipped_steps"])
        self.skipped_weight_updates = int(extra["skipped_weight_updates"])
        if self._sf is not None:
            self._sf = SyncFreeFlags(self.device, self.n_tasks)
            self._sf.pending.fill_(self._pending_update)
            self._sf.last_skipped.fill_(self._last_step_skipped)
            self._sf.prev_valid.fill_(self.prev_loss is not None)
            if self.prev_loss is None:
                self.prev_loss = torch.zeros(self.n_tasks, device=self.device)

    def save_state(self, path: str | Path) -> None:
        """Atomically write ``state_dict()`` (the official ``balanced_state_*.pth`` role)."""
        atomic_torch_save(self.state_dict(), path)

    def load_state(self, path: str | Path) -> None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"Balanced state file not found: {path}")
        try:
            state = torch.load(path, map_location=self.device, weights_only=False)
        except Exception as error:  # noqa: BLE001 - re-raised with the file name
            raise ValueError(f"cannot read Balanced state {path}: {error}") from error
        self.load_state_dict(state)


# ---------------------------------------------------------------------- sync_free: device flags
class SyncFreeFlags:
    """The per-step decisions of ``Balanced`` as device bools, when ``sync_free``.

    Every decision the default path takes with ``if`` on a host bool is a 0-dim bool tensor here,
    and every state change it guards goes through ``torch.where(flag, new, old)``, which selects
    bit-exactly (NaN in the unselected branch does not leak).
    """

    def __init__(self, device: torch.device, n_tasks: int):
        def flag(value: bool) -> torch.Tensor:
            return torch.full((), value, dtype=torch.bool, device=device)

        self.ok_losses = flag(True)  # the last get_weighted_loss losses are usable
        self.prev_valid = flag(False)  # prev_loss holds losses (the default path's "not None")
        self.pending = flag(False)  # next_batch: a step was taken since prev_loss was stored
        self.last_skipped = flag(False)
        self.below = flag(False)  # a finite loss at or below min_losses was seen (deferred error)
        self.below_losses = torch.zeros(n_tasks, device=device)


@contextmanager
def gated(
    apply: torch.Tensor, params: list[torch.Tensor], optimizer: torch.optim.Optimizer
) -> Iterator[None]:
    """Run an optimizer step whose effect (parameters and state) is kept only where ``apply``.

    A state entry created by the step (first step) is reverted to zeros, which torch Adam
    treats exactly as a fresh state. The optimizer's state must live on ``apply``'s device
    (torch Adam with ``capturable=True`` on CUDA), else ``where`` would copy to the host.
    """
    with torch.no_grad():
        before = [p.detach().clone() for p in params]
        saved = [
            {k: v.clone() for k, v in optimizer.state[p].items() if torch.is_tensor(v)}
            for p in params
        ]
    yield
    with torch.no_grad():
        for p, old in zip(params, before):
            p.copy_(torch.where(apply, p, old))
        for p, old_state in zip(params, saved):
            for key, value in optimizer.state[p].items():
                if torch.is_tensor(value):
                    old = old_state.get(key)
                    value.copy_(
                        torch.where(
                            apply.to(value.device),
                            value,
                            torch.zeros_like(value) if old is None else old,
                        )
                    )


# ---------------------------------------------------------------------- registration
@register_optimizer("balanced")
def build_balanced(
    params: Iterable,
    lr: float,
    *,
    max_norm: float,
    min_losses: float,
    sync_free: bool,
    gamma: float,
    w_lr: float,
    update_mode: str,
) -> Balanced:
    return Balanced(
        params,
        lr=lr,
        n_tasks=len(RD_TASKS),
        gamma=gamma,
        w_lr=w_lr,
        max_norm=max_norm,
        min_losses=min_losses,
        update_mode=update_mode,
        weighting="famo",
        task_names=RD_TASKS,
        sync_free=sync_free,
    )


@register_optimizer("qp")
def build_qp(
    params: Iterable,
    lr: float,
    *,
    max_norm: float,
    min_losses: float,
    sync_free: bool,
    gamma: float,
    w_lr: float,
    update_mode: str,
) -> Balanced:
    del sync_free  # QP solves its weights on the host: always the host path
    return Balanced(
        params,
        lr=lr,
        n_tasks=len(RD_TASKS),
        gamma=gamma,
        w_lr=w_lr,
        max_norm=max_norm,
        min_losses=min_losses,
        update_mode=update_mode,
        weighting="qp",
        task_names=RD_TASKS,
        sync_free=False,
    )
