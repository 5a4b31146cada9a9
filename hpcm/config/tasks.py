"""Names of the seed's three latent scales and of the five Phase-3 tasks, defined once.

Plain data without torch, so that the optimizer, the losses, the schedules, the logs and the plots
all import the same tuples cheaply. The task order is the order of HierarchicalBalanced's task
vector: [s1_d, s1_b, s2_d, s2_b, s3_b] (distortion and bpp of s1 and s2, bpp of s3).
"""

from __future__ import annotations

SCALES = ("s1", "s2", "s3")
# The two tasks of Balanced R-D (Phase 1/2): the task vector [distortion, bpp] and its seed names.
RD_TASKS = ("distortion", "bpp")
HIERARCHICAL_TASKS = ("s1_d", "s1_b", "s2_d", "s2_b", "s3_b")
# The seed's names of the same tasks (metrics.csv columns, wandb keys weights/s1_distortion, ...).
SEED_TASK_NAMES = ("s1_distortion", "s1_bpp", "s2_distortion", "s2_bpp", "s3_bpp")
TASK_SCALE = (0, 0, 1, 1, 2)  # the index in SCALES of each task's scale
# Phase 4 parameter groups of HPCM (hpcm.models.param_groups assigns every parameter to one).
PARAMETER_GROUPS = ("transforms", "hyperprior", "context")
