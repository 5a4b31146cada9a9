"""The training loop acts on an optimizer's registry traits (hpcm.config.optimizers), not on its
name: a newly registered Balanced-like optimizer gets the task vector, the gamma schedule and the
task-weight logging that its spec claims."""

from __future__ import annotations

import dataclasses

import pytest

from hpcm.config import run_config
from hpcm.config.optimizers import OPTIMIZER_SPECS, OptimizerSpec
from hpcm.config.tasks import RD_TASKS
from hpcm.optim.registry import BUILDERS
from hpcm.train import loop as train

TINY = {
    "model": "HPCM_Tiny",
    "patch_size": 64,
    "batch_size": 1,
    "num_workers": 0,
    "wandb_mode": "disabled",
    "quiet": True,
    "steps": 4,
    "lr": 1e-3,
}


def build_run(tmp_path, cfg: dict) -> train.Run:
    run = train.Run(cfg, tmp_path)
    run.open_data()
    run.build(None)
    return run


def test_a_new_balanced_like_optimizer_gets_its_gamma_schedule_from_its_trait(
    tmp_path, monkeypatch
):
    spec = OptimizerSpec(
        "balanced_probe",
        "a Balanced-like optimizer under a new name",
        task_names=RD_TASKS,
        gamma_schedule="single",
        hyperparameters=OPTIMIZER_SPECS["balanced"].hyperparameters,
    )
    monkeypatch.setitem(OPTIMIZER_SPECS, spec.name, spec)
    monkeypatch.setitem(BUILDERS, spec.name, BUILDERS["balanced"])
    cfg = run_config.resolve(
        {
            **TINY,
            "optimizer": "balanced",
            "gamma": 0.004,
            "gamma_final": 0.001,
            "gamma_schedule": "linear",
        }
    )
    cfg = dataclasses.replace(cfg, optimizer=spec.name)  # the choices were fixed at import
    run = build_run(tmp_path, cfg)
    assert run.balanced and not run.hierarchical
    assert run.gamma_schedule is not None and run.gamma_manager is None
    assert run.optimizer.gamma == pytest.approx(0.004)
    x = next(iter(train.data.train_loader(run.train_set, 64, 1, seed=0, total_steps=1)))
    run.train_step(4, x)  # the schedule's progress at step 4 of 4 is 3/4: 0.004 - 3/4 * 0.003
    assert run.optimizer.gamma == pytest.approx(0.00175)
    assert sorted(run.optimizer.get_task_weights()) == sorted(RD_TASKS)


def test_an_optimizer_without_task_weights_gets_no_gamma_machinery(tmp_path):
    run = build_run(tmp_path, run_config.resolve({**TINY, "optimizer": "cautious_adam"}))
    assert not run.balanced and run.gamma_schedule is None and run.gamma_manager is None
