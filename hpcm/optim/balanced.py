"""Balanced R-D optimizer: Cautious Adam on the model plus FAMO (or QP) task weighting.

Equations (research/balanced.md sections 2.2-2.4, official ``Balanced`` class):

* Surrogate for the model parameters, with logits w, z = softmax(w), lower bounds m (default -1)
  and D_i = L_i - m_i + 1e-8:   loss = (1/c) sum_i z_i log D_i,  c = sum_i z_i / D_i (detached).
  Its gradient is the convex combination sum_i a_i grad L_i with a_i = (z_i/D_i) / c.
* After the parameter step, with L' the losses at the new parameters:
  delta_i = log D_i(L) - log D_i(L'),  g_w = (diag(z) - z z^T) delta + gamma * w,
  and one torch Adam step (lr = w_lr, betas 0.9/0.999, eps 1e-8) on w.
* The parameter step is ``CautiousAdam`` (same maths as ``Balanced.step``).

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
(the training loop reads them at every logging point), not at once.

``weighting="qp"`` replaces FAMO by the analytic Solution-2 weights (``hpcm.optim.qp``, ``balanced_qp``): per-task
gradients of the log losses, clipped QP weights, the same renormalised convex combination.
Use ``backward_with_task_balancing`` (n backward passes); ``get_weighted_loss`` also works but
costs one more. ``update_task_weights`` is then a no-op: the weights come from the gradients.

With one task the surrogate's gradient is exactly grad L (a = 1): plain Cautious Adam.
"""

from __future__ import annotations

from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F

from hpcm.optim.balanced_famo import LOG_EPS, FamoWeighting
from hpcm.optim.balanced_qp import QPWeighting
from hpcm.optim.balanced_state import BalancedStateFiles
from hpcm.optim.balanced_step import BalancedParameterStep
from hpcm.optim.balanced_sync_free import SyncFreeFlags
from hpcm.optim.cautious_adam import CautiousAdam

UPDATE_MODES = ("same_batch", "next_batch")
WEIGHTINGS = ("famo", "qp")


def default_task_names(n_tasks: int) -> list[str]:
    if n_tasks == 2:
        return ["distortion", "bpp"]
    return [f"task{i}" for i in range(n_tasks)]


class Balanced(FamoWeighting, QPWeighting, BalancedParameterStep, BalancedStateFiles, CautiousAdam):
    """Cautious Adam + FAMO task balancing with the seed API (``set_min_losses``, ...).

    One job per module: the FAMO logit update (``balanced_famo``), the QP weights
    (``balanced_qp``), the parameter step (``balanced_step``) and the state files
    (``balanced_state``) are mixins; this class holds the configuration, the loss checks, the
    surrogate loss and the backward.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        n_tasks: int = 2,
        gamma: float = 0.003,
        w_lr: float = 0.025,
        max_norm: float = 1.0,
        *,
        min_losses: float | Sequence[float] | torch.Tensor = -1.0,
        update_mode: str = "same_batch",
        weighting: str = "famo",
        cautious: bool = True,
        task_names: Sequence[str] | None = None,
        device: torch.device | str | None = None,
        foreach: bool | None = None,
        sync_free: bool = False,
    ):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         amsgrad=amsgrad, cautious=cautious, foreach=foreach, sync_free=sync_free)
        if sync_free and weighting != "famo":
            raise ValueError("sync_free=True supports weighting='famo' only (QP solves on the host)")
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
        self.n_tasks = int(n_tasks)
        self.task_names = list(task_names) if task_names is not None else default_task_names(self.n_tasks)
        if len(self.task_names) != self.n_tasks:
            raise ValueError(f"task_names has {len(self.task_names)} names for n_tasks={self.n_tasks}")
        first = next((p for g in self.param_groups for p in g["params"]), None)
        self.device = torch.device(device) if device is not None else (
            first.device if first is not None else torch.device("cpu"))
        self.max_norm = float(max_norm)
        self.update_mode = update_mode
        self.weighting = weighting
        self.w = torch.zeros(self.n_tasks, device=self.device, requires_grad=True)
        # capturable on CUDA keeps the step count of w on the device (sync_free gating needs it);
        # on both paths, so that they run the same arithmetic (capturable Adam computes its bias
        # corrections on the device in float32, the default one on the host in double)
        self.w_opt = torch.optim.Adam([self.w], lr=w_lr, capturable=self.device.type == "cuda")
        self.task_gammas = torch.full((self.n_tasks,), float(gamma), device=self.device)
        self.task_modulation: torch.Tensor | None = None  # per-task factors (HierarchicalBalanced)
        self.min_losses = torch.zeros(self.n_tasks, device=self.device)
        self.set_min_losses(min_losses)
        self.prev_loss: torch.Tensor | None = None
        if sync_free:  # a tensor always; prev_valid says whether it holds losses
            self.prev_loss = torch.zeros(self.n_tasks, device=self.device)
        self.qp_weights = torch.full((self.n_tasks,), 1.0 / self.n_tasks, device=self.device)
        self.last_effective_weights: torch.Tensor | None = None
        self._skipped_weight_updates = torch.zeros((), device=self.device) if self.sync_free else 0
        if not self.sync_free:
            self.skipped_steps = 0
        self._sf = SyncFreeFlags(self.device, self.n_tasks) if self.sync_free else None
        self._pending_update = False  # next_batch: a step was taken since prev_loss was stored
        self._skip_next_step = False  # the current losses were non-finite
        self._clip_record: tuple | None = None  # (norm, grads, versions) of the last clip (see step)
        self._last_step_skipped = False

    # ------------------------------------------------------------------ configuration
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

    @property
    def last_step_skipped(self) -> bool:
        """Whether the latest ``step`` was skipped (non-finite losses or gradients); syncs when sync_free."""
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
                f"{self.min_losses.tolist()} (task names {self.task_names}); log(L - m) is undefined "
                "(those steps were skipped). Lower the bounds with set_min_losses (the official value is -1).")

    def set_min_losses(self, losses: float | Sequence[float] | torch.Tensor) -> None:
        """Set the per-task lower bounds m (a scalar broadcasts to every task)."""
        value = torch.as_tensor(losses, dtype=torch.float32).detach().to(self.device)
        if value.ndim == 0:
            value = value.expand(self.n_tasks).clone()
        if value.shape != (self.n_tasks,):
            raise ValueError(f"min_losses must have shape ({self.n_tasks},), got {tuple(value.shape)}")
        if not torch.isfinite(value).all():
            raise ValueError(f"min_losses must be finite, got {value.tolist()}")
        self.min_losses = value

    # ------------------------------------------------------------------ task weighting
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

    def _check_losses(self, losses: torch.Tensor, what: str) -> torch.Tensor | None:
        """Validate shape; return the losses (at least fp32), or None when they are not finite."""
        if losses.shape != (self.n_tasks,):
            raise ValueError(f"{what} must have shape ({self.n_tasks},), got {tuple(losses.shape)}")
        if losses.dtype not in (torch.float32, torch.float64):
            losses = losses.float()  # fp16/bf16 losses from autocast
        detached = losses.detach()
        finite, below = torch.stack([
            torch.isfinite(detached).all(),
            (detached - self.min_losses + LOG_EPS <= 0).any(),
        ]).tolist()  # one device sync for both checks
        if not finite:
            return None
        if below:
            raise ValueError(
                f"{what} {detached.tolist()} are at or below min_losses {self.min_losses.tolist()} "
                f"(task names {self.task_names}); log(L - m) is undefined. Lower the bounds with "
                "set_min_losses (the official value is -1).")
        return losses

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
            clipped = [shared_parameters] if torch.is_tensor(shared_parameters) else list(shared_parameters)
            norm = torch.nn.utils.clip_grad_norm_(clipped, self.max_norm)
            self._record_clip(norm, clipped)
        return loss

    def _surrogate(self, losses: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """(1/c) sum_i z_i log(L_i - m_i + eps) with c = sum_i z_i / (L_i - m_i + eps) detached;
        keeps the gradient coefficients a_i = z_i / (L_i - m_i + eps) / c."""
        gaps = losses - self.min_losses + LOG_EPS
        c = (weights / gaps).sum().detach()
        self.last_effective_weights = (weights / gaps.detach() / c).detach()
        return (gaps.log() * weights / c).sum()

    # ------------------------------------------------------------------ reporting
    def get_task_weights(self) -> dict[str, float]:
        """z = softmax(w) (FAMO) or the last QP weights, by task name."""
        values = self._task_probabilities().tolist()
        return dict(zip(self.task_names, values))

    def get_effective_weights(self) -> dict[str, float]:
        """a_i of the last surrogate: the convex coefficients of the task gradients."""
        if self.last_effective_weights is None:
            return {}
        return dict(zip(self.task_names, self.last_effective_weights.tolist()))
