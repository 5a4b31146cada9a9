"""The optimizers a run may name, as data: one ``OptimizerSpec`` each, in ``OPTIMIZER_SPECS``.

This table is the one home of what the configuration, the training loop, the study checks and the
tables know about an optimizer: its name (``run_config.OPTIMIZERS`` and the ``optimizer`` choices,
the schema's enums, checked by tests/config/test_run_config.py), its traits (what the loop does
for it) and the run-config hyperparameters its builder reads, with their defaults (``KEYS`` takes
them from here). The code that builds each optimizer lives with the optimizer, registered under
the same name by ``hpcm.optim.registry.register_optimizer``; tests/optim/test_registry.py checks
that every name here has exactly one builder and that each built optimizer has the traits claimed.

Plain data without torch: ``hpcm.config`` sits below ``hpcm.optim`` and must not import it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from hpcm.config.presets import DEFAULT_GAMMAS, DEFAULT_SCALE_WEIGHTS
from hpcm.config.tasks import RD_TASKS, SEED_TASK_NAMES

GAMMA = 0.003  # FAMO's L2 coefficient on the task logits (official Balanced R-D)
W_LR = 0.025  # Adam learning rate of the task logits (official Balanced R-D)
UPDATE_MODES = ("same_batch", "next_batch")  # when the FAMO logits see the post-step losses

# What drives an optimizer's gamma(s) over a run (hpcm.train.schedules):
# "single": GammaSchedule (run-config gamma, gamma_schedule, ...) sets ``optimizer.gamma``;
# "per_scale": ScaleGammaManager (gammas, gamma_strategy, ...) calls ``optimizer.set_scale_gammas``.
GAMMA_SCHEDULES = ("single", "per_scale")


@dataclass(frozen=True)
class OptimizerSpec:
    """What the rest of the package may know about one optimizer (no branch on its name)."""

    name: str
    summary: str
    # The task-loss vector it balances, in order (the optimizer's ``task_names``); empty: it steps
    # on the plain R-D loss. A non-empty vector makes the loop build the tasks, log the task
    # weights and write balanced_state files (the optimizer is then a ``hpcm.optim.Balanced``).
    task_names: tuple[str, ...] = ()
    gamma_schedule: str | None = None  # one of GAMMA_SCHEDULES, or None (no gamma)
    # Run-config keys its builder reads, with their defaults (``run_config.KEYS`` uses these).
    hyperparameters: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.gamma_schedule not in (None, *GAMMA_SCHEDULES):
            raise ValueError(
                f"optimizer {self.name!r}: gamma_schedule {self.gamma_schedule!r} "
                f"is not one of {GAMMA_SCHEDULES} or None"
            )
        if self.gamma_schedule is not None and not self.task_names:
            raise ValueError(
                f"optimizer {self.name!r}: a gamma schedule needs task weights (task_names)"
            )

    @property
    def task_weights(self) -> bool:
        """Balanced-like: weights a task-loss vector (FAMO or QP), not stepping on the loss."""
        return bool(self.task_names)

    @property
    def scale_tasks(self) -> bool:
        """Its tasks are the five Phase-3 scale tasks of the decomposition (hpcm.train.losses)."""
        return self.task_names == SEED_TASK_NAMES


_FAMO = {"gamma": GAMMA, "w_lr": W_LR, "update_mode": UPDATE_MODES[0]}

OPTIMIZER_SPECS: dict[str, OptimizerSpec] = {
    spec.name: spec
    for spec in (
        OptimizerSpec("adam", "torch's Adam (fused), the HPCM baseline"),
        OptimizerSpec("cautious_adam", "Adam with the Cautious sign-agreement mask (Balanced R-D)"),
        OptimizerSpec(
            "balanced",
            "Balanced R-D: Cautious Adam + FAMO over (distortion, bpp)",
            task_names=RD_TASKS,
            gamma_schedule="single",
            hyperparameters=_FAMO,
        ),
        OptimizerSpec(
            "qp",
            "Balanced R-D Solution 2: Cautious Adam + analytic QP task weights",
            task_names=RD_TASKS,
            gamma_schedule="single",
            hyperparameters=_FAMO,
        ),
        OptimizerSpec(
            "hierarchical_balanced",
            "HierarchicalBalanced: FAMO over the 5 scale tasks",
            task_names=SEED_TASK_NAMES,
            gamma_schedule="per_scale",
            hyperparameters={
                "gammas": DEFAULT_GAMMAS,
                "w_lr": W_LR,
                "update_mode": UPDATE_MODES[0],
                "scale_weights": DEFAULT_SCALE_WEIGHTS,
            },
        ),
    )
}


# The plain optimizer of the HPCM baseline, the reference of the overhead table's time ratios.
BASELINE_OPTIMIZER = "adam"


def optimizer_spec(name: str) -> OptimizerSpec:
    """The spec of a registered optimizer; an unknown name raises ValueError listing the others."""
    spec = OPTIMIZER_SPECS.get(name)
    if spec is None:
        raise ValueError(
            f"unknown optimizer {name!r}; valid names: {', '.join(OPTIMIZER_SPECS)} "
            "(a new optimizer gets an OptimizerSpec in hpcm/config/optimizers.py)"
        )
    return spec


def hyperparameter_default(key: str) -> Any:
    """The default of a run-config hyperparameter, the same for every optimizer that reads it."""
    values = {
        repr(spec.hyperparameters[key]): spec.hyperparameters[key]
        for spec in OPTIMIZER_SPECS.values()
        if key in spec.hyperparameters
    }
    if len(values) != 1:
        raise ValueError(
            f"optimizer hyperparameter {key!r}: the specs give {len(values)} defaults "
            f"({sorted(values)}); the run config has one default per key"
        )
    return next(iter(values.values()))


# Every run-config key some optimizer reads (build_optimizer accepts these, and ignores the
# ones the named optimizer does not read).
HYPERPARAMETERS = tuple(
    dict.fromkeys(key for spec in OPTIMIZER_SPECS.values() for key in spec.hyperparameters)
)
