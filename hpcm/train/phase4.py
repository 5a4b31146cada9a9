"""Phase 4 context-aware fine-tuning: per-group learning rates, freezing, progressive unfreezing,
per-scale early stopping, for every optimizer of ``hpcm.optim``.

The groups are ``hpcm.models.param_groups`` (transforms, hyperprior, context; context parameters
also know the scales they serve). The run-config keys (``hpcm.config.run_config``):

* ``group_lr``: the optimizer gets one param group per parameter group, each with an ``lr_ratio``;
  ``hpcm.train.schedules.set_lr`` sets ``lr = schedule lr x lr_ratio``, so the ratios compose with
  ``lr_milestones`` / ``lr_values``.
* ``freeze``: those groups never train. ``unfreeze_schedule``: group -> fraction f; the group
  trains from step ``round(f * total) + 1`` on (Python's round, half to even), the step at which
  ``schedules.lr_at`` applies an lr milestone at the same fraction.
* ``scale_early_stop_patience`` = P > 0: after each validation, a scale whose validation rate of
  its y elements (``val_s{k}_bpp``) is not below its best so far counts one; after P such
  validations in a row the scale stops: its context parameters stop updating from the next step
  on (a parameter shared by several scales stops when all of them have stopped).

How a frozen parameter is kept bitwise unchanged, whatever the optimizer: it gets
``requires_grad = False`` before the step, so backward leaves its ``.grad`` None
(``zero_grad(set_to_none=True)`` cleared the previous one). Every optimizer here skips a
parameter without a gradient entirely: torch's fused Adam and Cautious Adam (all its paths,
flat buffers included) neither step it nor touch its moments (so no momentum carries it on after
it stops, and its Adam state resumes where it left off when it is unfrozen); ``clip_grad_norm_``
leaves it out of the norm; FAMO's backward never reaches it; QP's per-task gradients are taken
over the trainable parameters only (``Balanced._trainable_parameters``), so a frozen parameter
takes no part in the Gram matrix or the weights. Weight decay is 0 in every optimizer here, and
even so, a parameter without a gradient is not decayed.

The state that is not a function of the step (the early-stopping counters, bests and stops) is
saved in the training state (``state_dict``), so a resumed run freezes the same parameters at the
same steps as an uninterrupted one. With every Phase 4 key at its default (``active`` False) the
optimizer is built exactly as before (one flat parameter list).
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch

from hpcm.config.run_config import RunConfig
from hpcm.config.tasks import PARAMETER_GROUPS, SCALES
from hpcm.models import param_groups

EXTRA_GROUP = "extra"  # parameters outside the model (the learnable ratios of a decomposition)
METRIC_COLUMNS = ("trainable_groups", "trainable_params", *(f"val_{s}_bpp" for s in SCALES))


def is_active(cfg: RunConfig) -> bool:
    """Whether any Phase 4 key differs from its no-op default."""
    return (
        any(r != 1.0 for r in cfg.group_lr.values())
        or bool(cfg.freeze)
        or bool(cfg.unfreeze_schedule)
        or cfg.scale_early_stop_patience > 0
    )


def unfreeze_step(fraction: float, total_steps: int) -> int:
    """The first step at which a group of ``unfreeze_schedule`` trains (lr_at's milestone
    convention)."""
    return round(fraction * total_steps) + 1


class Phase4:
    """Which parameters train at each step, their lr ratios, and the per-scale early stopping."""

    def __init__(
        self,
        model: torch.nn.Module,
        cfg: RunConfig,
        total_steps: int,
        extra: Iterable[torch.Tensor] = (),
    ):
        named = list(model.named_parameters())
        self.extra = list(extra)  # never frozen: while they train, a step is taken
        self.assignment = param_groups.assign(
            named
        )  # UnknownParameterError on a name no rule covers
        self.params = dict(named)
        self.ratios = dict(cfg.group_lr)
        self.frozen = set(cfg.freeze)
        self.starts = {g: unfreeze_step(f, total_steps) for g, f in cfg.unfreeze_schedule.items()}
        self.patience = int(cfg.scale_early_stop_patience)
        self.active = is_active(cfg)
        self.best = {s: math.inf for s in SCALES}
        self.bad_validations = {s: 0 for s in SCALES}
        self.stopped_at: dict[str, int | None] = {
            s: None for s in SCALES
        }  # the step after which it stops
        self._trainable: dict[str, bool] | None = None

    # -- the optimizer's parameter groups
    def optimizer_groups(self) -> list[dict[str, Any]]:
        """One torch param group per parameter group (and one for ``extra``), each with its
        lr_ratio."""
        groups = [
            {
                "params": [p for n, p in self.params.items() if self.assignment[n].group == g],
                "group": g,
                "lr_ratio": self.ratios[g],
            }
            for g in PARAMETER_GROUPS
        ]
        groups = [g for g in groups if g["params"]]
        if self.extra:
            groups.append({"params": self.extra, "group": EXTRA_GROUP, "lr_ratio": 1.0})
        return groups

    # -- freezing
    def _group_trains(self, group: str, step: int) -> bool:
        return group not in self.frozen and step >= self.starts.get(group, 1)

    def _stopped(self, scales: tuple[str, ...]) -> bool:
        return self.patience > 0 and all(self.stopped_at[s] is not None for s in scales)

    def trainable_at(self, step: int) -> dict[str, bool]:
        """name -> whether the parameter updates at ``step``."""
        out = {}
        for name, where in self.assignment.items():
            trains = self._group_trains(where.group, step)
            if where.group == "context" and self._stopped(where.scales):
                trains = False
            out[name] = trains
        return out

    def apply(self, step: int) -> list[str]:
        """Set requires_grad for ``step``; returns the names whose state changed (for the log)."""
        trainable = self.trainable_at(step)
        changed = [
            n for n, t in trainable.items() if self._trainable is None or self._trainable[n] != t
        ]
        for name in changed:
            self.params[name].requires_grad_(trainable[name])
        self._trainable = trainable
        return changed

    @property
    def any_trainable(self) -> bool:
        return self._trainable is None or bool(self.extra) or any(self._trainable.values())

    # -- per-scale early stopping
    def observe_validation(self, step: int, scale_rates: dict[str, float]) -> list[str]:
        """Count a validation's per-scale rates; returns the scales that stop after ``step``."""
        if self.patience == 0:
            return []
        stopping = []
        for scale in SCALES:
            if self.stopped_at[scale] is not None:
                continue
            rate = scale_rates[f"val_{scale}_bpp"]
            if rate < self.best[scale]:  # a NaN rate never improves
                self.best[scale], self.bad_validations[scale] = rate, 0
                continue
            self.bad_validations[scale] += 1
            if self.bad_validations[scale] >= self.patience:
                self.stopped_at[scale] = step
                stopping.append(scale)
        return stopping

    # -- log and state
    def columns(self) -> dict[str, Any]:
        """metrics.csv cells: the groups updating now (context per scale when some stopped) and
        their size."""
        if not self.active or self._trainable is None:
            return {}
        parts = []
        for group in PARAMETER_GROUPS:
            names = [n for n, w in self.assignment.items() if w.group == group]
            if not any(self._trainable[n] for n in names):
                continue
            if group == "context" and not all(self._trainable[n] for n in names):
                scales = [s for s in SCALES if self.stopped_at[s] is None]
                parts.append(f"context({','.join(scales)})")
            else:
                parts.append(group)
        count = sum(self.params[n].numel() for n, t in self._trainable.items() if t)
        return {"trainable_groups": "+".join(parts) or "none", "trainable_params": count}

    def state_dict(self) -> dict[str, Any]:
        return {
            "best": dict(self.best),
            "bad_validations": dict(self.bad_validations),
            "stopped_at": dict(self.stopped_at),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best = {s: float(state["best"][s]) for s in SCALES}
        self.bad_validations = {s: int(state["bad_validations"][s]) for s in SCALES}
        self.stopped_at = {s: state["stopped_at"][s] for s in SCALES}
        self._trainable = None  # apply() at the next step sets every flag
