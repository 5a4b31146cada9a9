"""Schedules: learning-rate milestones, single-gamma schedules (Phase 2), ScaleGammaManager (Phase
3).

Everything is expressed in fractions of the run, so the same config drives a 3000-epoch paper run
and a 200-step CPU demo. ``progress = step / total`` is clamped to [0, 1].

Single gamma (Phase 2), from gamma_0 to gamma_1 (the seed's ``AdaptiveGammaScheduler``,
phase2/src/utils/adaptive_gamma.py of yutendo0714/LIC-HPCM-Balanced, with its epochs written as
fractions of the run; the seed runs 3000 epochs, warms up for 100 and sets gamma_1 = 0.2 gamma_0):
    warm-up: progress < w (``gamma_warmup``, seed 100/3000): gamma_0, whatever the schedule. After
             it, linear and cosine run on q = (progress - w) / (1 - w), clamped to [0, 1].
    fixed:   gamma_0
    linear:  gamma_0 - (gamma_0 - gamma_1) * q
    cosine:  gamma_1 + (gamma_0 - gamma_1) * (1 + cos(pi * q)) / 2
    step:    gamma_0 * f ** (number of milestones m_k <= progress), floored at gamma_1; the
             milestones are absolute fractions of the run (the warm-up does not shift them; seed:
             epochs 1000 / 2000 / 2500 of 3000, ``gamma_step_milestones``) and f = 0.5
             (``gamma_step_factor``).
    adaptive: cosine(q) * a, clipped to [gamma_1, 1.5 gamma_0], where a depends on the last 50
             validation losses (``observe``; the seed appends its per-epoch test loss): with
             cv = std / (mean + 1e-8) (population std, numpy's default as in the seed),
             a = 0.8 if cv < 0.01 (converged: less regularisation), 1.2 if cv > 0.05 (unstable:
             more), else 1. With fewer than 50 losses a = 1 and nothing is clipped. The factor is
             recomputed from the window every time, not compounded.
The seed's ``HPCMGammaScheduler`` preset ('hpcm') is ``step`` with gamma_0 0.006, gamma_1 0.0005,
milestones 500 / 1500 / 2750 of 3000 epochs, factor 0.5 and the same warm-up.

ScaleGammaManager (Phase 3) has the seed's five strategies: fixed, linear, cosine (per scale, final
gammas default to half the initial ones, as in the seed), adaptive (coefficient of variation of
each scale's loss over a 50-value window: < 0.01 multiplies gamma by 0.95, > 0.05 by 1.02, clamped
to [final, 1.5 * initial]) and hierarchical. The hierarchical strategy is the seed's piecewise
schedule written as knots (``HIERARCHICAL_KNOTS``): multipliers of the initial gammas at phase
boundaries that default to 300 / 1500 / 2500 of 3000 epochs. Between knots the seed interpolates
linearly, which is continuous (no jumps) but has kinks; ``interpolation="smooth"`` uses a
smoothstep instead, which is also continuous in its first derivative. Both pass through the
seed's values at every boundary.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

from hpcm.config.presets import DEFAULT_GAMMAS
from hpcm.config.tasks import SCALES

GAMMA_SCHEDULES = ("fixed", "linear", "cosine", "step", "adaptive")
# The seed's step epochs 1000 / 2000 / 2500 of 3000 and its halving factor.
SEED_GAMMA_STEP_MILESTONES = (1000 / 3000, 2000 / 3000, 2500 / 3000)
SEED_GAMMA_STEP_FACTOR = 0.5
SEED_GAMMA_WARMUP = 100 / 3000  # the seed's warmup_epochs=100 of 3000
ADAPTIVE_WINDOW = 50  # the seed's convergence_window (validation losses)
GAMMA_STRATEGIES = ("fixed", "linear", "cosine", "adaptive", "hierarchical")

# Seed phase boundaries (epochs 300, 1500, 2500 of 3000) as fractions of the run.
SEED_PHASE_BOUNDARIES = (300 / 3000, 1500 / 3000, 2500 / 3000)
# Multipliers of the initial gammas at [start, boundary 1, boundary 2, boundary 3, end]; the seed's
# phase formulas (e.g. s1: 1.0 -> 1.2 in warm-up, 1.2 -> 0.9, 0.9 -> 0.7, 0.7 -> 0.5) read off.
HIERARCHICAL_KNOTS = {
    "s1": (1.0, 1.2, 0.9, 0.7, 0.5),
    "s2": (0.8, 0.8, 1.1, 0.8, 0.5),
    "s3": (0.6, 0.6, 1.0, 1.1, 1.3),
}


def _progress(step: float, total: float) -> float:
    if not total > 0:
        raise ValueError(f"total steps must be > 0, got {total}")
    return min(max(step / total, 0.0), 1.0)


def lr_at(
    step: int,
    total: int,
    base_lr: float,
    milestones: Sequence[float] = (),
    values: Sequence[float] = (),
) -> float:
    """Piecewise-constant lr: ``values[k]`` from ``round(milestones[k] * total)`` on, else
    ``base_lr``."""
    if len(milestones) != len(values):
        raise ValueError(
            f"lr_milestones {list(milestones)} and lr_values {list(values)} differ in length"
        )
    if any(not 0.0 <= m <= 1.0 for m in milestones) or list(milestones) != sorted(milestones):
        raise ValueError(
            f"lr_milestones must be increasing fractions in [0, 1], got {list(milestones)}"
        )
    lr = base_lr
    for fraction, value in zip(milestones, values):
        if step >= round(fraction * total):
            lr = value
    return lr


def set_lr(optimizer, lr: float) -> None:
    """Every param group to ``lr`` times its ``lr_ratio`` (Phase 4 groups, ``hpcm.train.phase4``;
    else 1)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_ratio", 1.0)


def _check_milestones(milestones: Sequence[float]) -> tuple[float, ...]:
    values = tuple(float(m) for m in milestones)
    if any(not 0.0 < m < 1.0 for m in values) or list(values) != sorted(values):
        raise ValueError(
            f"gamma_step_milestones must be increasing fractions in (0, 1), got {list(values)}"
        )
    return values


def gamma_at(
    schedule: str,
    progress: float,
    initial: float,
    final: float | None = None,
    *,
    warmup: float = 0.0,
    milestones: Sequence[float] = SEED_GAMMA_STEP_MILESTONES,
    factor: float = SEED_GAMMA_STEP_FACTOR,
) -> float:
    """One gamma at ``progress`` in [0, 1] (clamped) of a stateless schedule (module docstring).

    ``adaptive`` is the cosine base here; its loss-driven factor lives in ``GammaSchedule``.
    """
    if schedule not in GAMMA_SCHEDULES:
        raise ValueError(f"gamma_schedule must be one of {GAMMA_SCHEDULES}, got {schedule!r}")
    if not 0.0 <= warmup < 1.0:
        raise ValueError(f"gamma_warmup must be a fraction in [0, 1), got {warmup}")
    if schedule == "fixed":
        return float(initial)
    if final is None:
        raise ValueError(f"gamma_schedule {schedule!r} needs gamma_final")
    p = min(max(progress, 0.0), 1.0)
    if p < warmup:
        return float(initial)
    if schedule == "step":
        if not 0.0 < factor <= 1.0:
            raise ValueError(f"gamma_step_factor must be in (0, 1], got {factor}")
        drops = sum(1 for m in _check_milestones(milestones) if p >= m)
        return max(initial * factor**drops, final)
    q = min((p - warmup) / (1.0 - warmup), 1.0)
    if schedule == "linear":
        return initial - (initial - final) * q
    return final + (initial - final) * 0.5 * (1.0 + math.cos(math.pi * q))  # cosine, adaptive base


def adaptive_factor(losses: Sequence[float], window: int = ADAPTIVE_WINDOW) -> float:
    """The seed's loss-dynamics factor: 0.8 / 1.0 / 1.2 from the last ``window`` losses' cv."""
    if len(losses) < window:
        return 1.0
    recent = [float(v) for v in losses[-window:]]
    mean = sum(recent) / window
    std = math.sqrt(sum((v - mean) ** 2 for v in recent) / window)  # numpy's np.std (ddof=0)
    cv = std / (mean + 1e-8)
    if cv < 0.01:
        return 0.8
    if cv > 0.05:
        return 1.2
    return 1.0


class GammaSchedule:
    """Phase 2 single-gamma schedule; ``apply(optimizer, step)`` sets ``optimizer.gamma``.

    ``adaptive`` needs the validation losses: the trainer calls ``observe(val_loss)`` after every
    validation, and the history is part of ``state_dict`` so that a resumed run continues exactly.
    """

    def __init__(
        self,
        schedule: str,
        initial: float,
        final: float | None,
        total_steps: int,
        *,
        warmup: float = 0.0,
        milestones: Sequence[float] = SEED_GAMMA_STEP_MILESTONES,
        factor: float = SEED_GAMMA_STEP_FACTOR,
        window: int = ADAPTIVE_WINDOW,
    ):
        gamma_at(
            schedule, 0.0, initial, final, warmup=warmup, milestones=milestones, factor=factor
        )  # validates the arguments
        if schedule == "step":
            _check_milestones(milestones)
        if not total_steps > 0:
            raise ValueError(f"total_steps must be > 0, got {total_steps}")
        if window < 2:
            raise ValueError(f"adaptive window must be >= 2, got {window}")
        self.schedule, self.initial, self.final, self.total_steps = (
            schedule,
            initial,
            final,
            total_steps,
        )
        self.warmup, self.milestones, self.factor, self.window = (
            warmup,
            tuple(milestones),
            factor,
            window,
        )
        self.loss_history: list[float] = []

    def __call__(self, step: int) -> float:
        progress = _progress(step, self.total_steps)
        gamma = gamma_at(
            self.schedule,
            progress,
            self.initial,
            self.final,
            warmup=self.warmup,
            milestones=self.milestones,
            factor=self.factor,
        )
        if (
            self.schedule != "adaptive"
            or progress < self.warmup
            or len(self.loss_history) < self.window
        ):
            return gamma
        gamma *= adaptive_factor(self.loss_history, self.window)
        return min(max(gamma, self.final), 1.5 * self.initial)

    def observe(self, loss: float) -> None:
        """Record one validation loss (used by ``adaptive`` only; kept for every schedule)."""
        self.loss_history.append(float(loss))
        del self.loss_history[: -self.window]  # only the window is ever read

    def apply(self, optimizer, step: int) -> float:
        gamma = self(step)
        optimizer.gamma = gamma
        return gamma

    def state_dict(self) -> dict:
        return {"loss_history": list(self.loss_history)}

    def load_state_dict(self, state: Mapping) -> None:
        self.loss_history = [float(v) for v in state["loss_history"]]


def _interpolate(
    knots: Sequence[float], boundaries: Sequence[float], progress: float, smooth: bool
) -> float:
    points = (0.0, *boundaries, 1.0)
    for k in range(len(points) - 1):
        left, right = points[k], points[k + 1]
        if progress <= right or k == len(points) - 2:
            t = 0.0 if right <= left else min(max((progress - left) / (right - left), 0.0), 1.0)
            if smooth:
                t = t * t * (3.0 - 2.0 * t)
            return knots[k] + (knots[k + 1] - knots[k]) * t
    raise AssertionError("unreachable")


def _as_scale_dict(values: Mapping[str, float] | Sequence[float], what: str) -> dict[str, float]:
    if isinstance(values, Mapping):
        missing = [s for s in SCALES if s not in values]
        if missing:
            raise ValueError(f"{what} lacks {missing}; expected keys {SCALES}")
        return {s: float(values[s]) for s in SCALES}
    values = list(values)
    if len(values) != 3:
        raise ValueError(f"{what} needs 3 values [s1, s2, s3], got {values}")
    return dict(zip(SCALES, (float(v) for v in values)))


class ScaleGammaManager:
    """Per-scale gammas over the run (seed API: ``step(epoch, scale_losses)`` returns a dict)."""

    def __init__(
        self,
        initial_gammas: Mapping[str, float] | Sequence[float] | None = None,
        strategy: str = "fixed",
        total_epochs: int = 3000,
        final_gammas: Mapping[str, float] | Sequence[float] | None = None,
        phase_boundaries: Sequence[float] = SEED_PHASE_BOUNDARIES,
        interpolation: str = "linear",
        window_size: int = 50,
    ):
        if strategy not in GAMMA_STRATEGIES:
            raise ValueError(f"gamma_strategy must be one of {GAMMA_STRATEGIES}, got {strategy!r}")
        if interpolation not in ("linear", "smooth"):
            raise ValueError(f"interpolation must be 'linear' or 'smooth', got {interpolation!r}")
        bounds = [float(b) for b in phase_boundaries]
        if (
            len(bounds) != 3
            or not all(0.0 < b < 1.0 for b in bounds)
            or bounds != sorted(set(bounds))
        ):
            raise ValueError(
                f"phase_boundaries must be 3 increasing fractions in (0, 1), got {bounds}"
            )
        if not total_epochs > 0:
            raise ValueError(f"total_epochs must be > 0, got {total_epochs}")
        if window_size < 2:
            raise ValueError(f"window_size must be >= 2, got {window_size}")
        self.strategy = strategy
        self.total_epochs = total_epochs
        self.initial_gammas = _as_scale_dict(
            initial_gammas if initial_gammas is not None else DEFAULT_GAMMAS, "initial gammas"
        )
        self.final_gammas = (
            _as_scale_dict(final_gammas, "final gammas")
            if final_gammas is not None
            else {s: 0.5 * g for s, g in self.initial_gammas.items()}
        )
        self.phase_boundaries = tuple(bounds)
        self.interpolation = interpolation
        self.window_size = window_size
        self.current_gammas = dict(self.initial_gammas)
        self.scale_losses_history: dict[str, list[float]] = {s: [] for s in SCALES}

    def step(
        self, epoch: float, scale_losses: Mapping[str, float] | None = None
    ) -> dict[str, float]:
        progress = _progress(epoch, self.total_epochs)
        if self.strategy in ("fixed", "linear", "cosine"):
            self.current_gammas = {
                s: gamma_at(self.strategy, progress, self.initial_gammas[s], self.final_gammas[s])
                for s in SCALES
            }
        elif self.strategy == "hierarchical":
            smooth = self.interpolation == "smooth"
            self.current_gammas = {
                s: self.initial_gammas[s]
                * _interpolate(HIERARCHICAL_KNOTS[s], self.phase_boundaries, progress, smooth)
                for s in SCALES
            }
        else:
            if scale_losses is None:
                raise ValueError(
                    "gamma_strategy 'adaptive' needs scale_losses {'s1','s2','s3'} at every step"
                )
            self._adapt(_as_scale_dict(scale_losses, "scale_losses"))
        return dict(self.current_gammas)

    def _adapt(self, scale_losses: dict[str, float]) -> None:
        for s in SCALES:
            history = self.scale_losses_history[s]
            history.append(scale_losses[s])
            del history[: -self.window_size]
            if len(history) < self.window_size:
                continue  # adapt only once the window is full
            mean = sum(history) / len(history)
            std = math.sqrt(sum((v - mean) ** 2 for v in history) / (len(history) - 1))
            cv = std / (mean + 1e-8)
            gamma = self.current_gammas[s]
            if cv < 0.01:
                gamma *= 0.95  # converged: relax the pull towards equal weights
            elif cv > 0.05:
                gamma *= 1.02  # still moving: regularise more
            low, high = self.final_gammas[s], 1.5 * self.initial_gammas[s]
            self.current_gammas[s] = min(max(gamma, min(low, high)), high)

    def state_dict(self) -> dict:
        return {
            "current_gammas": dict(self.current_gammas),
            "scale_losses_history": {s: list(v) for s, v in self.scale_losses_history.items()},
        }

    def load_state_dict(self, state: Mapping) -> None:
        self.current_gammas = _as_scale_dict(state["current_gammas"], "current_gammas")
        self.scale_losses_history = {
            s: [float(v) for v in state["scale_losses_history"][s]] for s in SCALES
        }
