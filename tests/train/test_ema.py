"""ema_decay: the moving average against its closed form, and what is validated and exported with
it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hpcm import models
from hpcm.config import run_config
from hpcm.train import ema as averaging
from hpcm.train import loop as train
from tests.train.tiny import TINY, cli_args


def tiny_run(tmp_path, **overrides) -> train.Run:
    run = train.Run(run_config.resolve({**TINY, "steps": 10, **overrides}), tmp_path)
    run.open_data()
    run.build(None)
    return run


def weights(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {name: p.detach().double().numpy().copy() for name, p in model.named_parameters()}


@pytest.mark.parametrize(
    "overrides", [{"variant": "baseline"}, {"variant": "phase3"}], ids=["adam", "phase3"]
)
def test_average_equals_the_closed_form_of_the_step_weights(tmp_path, overrides):
    decay = 0.6  # far from 1, so that four steps move the average well beyond the tolerance
    run = tiny_run(tmp_path, lr=1e-3, ema_decay=decay, **overrides)
    loader = train.data.train_loader(run.train_set, 64, 1, seed=0, total_steps=4)
    history = [weights(run.model)]  # w_0: the weights the run starts from
    for step, x in enumerate(loader, start=1):
        run.train_step(step, x)
        run.step = step
        history.append(weights(run.model))
    steps = len(history) - 1
    assert steps == 4
    averaged = weights(run.ema.module)
    moved = 0.0
    for name, value in averaged.items():
        # ema_T = d^T w_0 + sum_{t=1..T} (1 - d) d^(T - t) w_t, in float64
        expected = decay**steps * history[0][name] + sum(
            (1 - decay) * decay ** (steps - t) * history[t][name] for t in range(1, steps + 1)
        )
        # float32 recurrence vs float64 sum: measured max |diff| 1.04e-7 under
        # ATEN_CPU_CAPABILITY=avx2 and =default; the closed form of decay 0.7 instead is 4.7e-4 away
        np.testing.assert_allclose(value, expected, rtol=0, atol=1e-6, err_msg=name)
        moved = max(moved, float(np.abs(expected - history[-1][name]).max()))
    assert moved > 1e-4, "the average equals the last weights: the test could not tell them apart"
    for (name, a), (_, b) in zip(run.ema.module.named_buffers(), run.model.named_buffers()):
        assert torch.equal(a, b), f"buffer {name} is not the live model's"


def test_validation_uses_the_average(tmp_path):
    run = tiny_run(tmp_path, lr=1e-3, ema_decay=0.5)
    x = next(iter(train.data.train_loader(run.train_set, 64, 1, seed=0, total_steps=1)))
    for step in (1, 2, 3):
        run.train_step(step, x)
    with_average = run.validate()
    raw = tiny_run(
        tmp_path, lr=1e-3
    )  # the same model class without an average, given the averaged weights
    raw.model.load_state_dict(run.ema.module.state_dict())
    assert raw.validate() == with_average
    raw.model.load_state_dict(run.model.state_dict())
    assert raw.validate()["val_loss"] != with_average["val_loss"]


def test_epoch_best_and_snapshots_hold_the_average(tmp_path):
    out = tmp_path / "run"
    assert (
        train.main(cli_args(out, steps=3, val_every=3, snapshot_every=3, ema_decay=0.5, lr=1e-3))
        == train.EXIT_OK
    )
    state = torch.load(out / "checkpoint_last.pth.tar", map_location="cpu", weights_only=False)
    assert int(state["ema"]["n_averaged"]) == 4  # the copy of w_0, then one update per step
    parameters = {name for name, _ in models.build_model("HPCM_Tiny").named_parameters()}
    for name in ("epoch_best.pth.tar", "epoch_3.pth.tar"):
        exported = models.load_checkpoint(out / name, name="HPCM_Tiny").state_dict()
        differs = False
        for key, raw in state["model"].items():
            if key in parameters:
                assert torch.equal(exported[key], state["ema"][f"module.{key}"]), f"{name}: {key}"
                differs |= not torch.equal(exported[key], raw)
        assert differs, f"{name} holds the raw weights"


def test_decay_outside_its_range_is_refused(tmp_path, capsys):
    assert train.main(cli_args(tmp_path / "run", steps=1, ema_decay=1.0)) == train.EXIT_CONFIG
    assert "'ema_decay' = 1.0" in capsys.readouterr().err
    with pytest.raises(ValueError, match="ema_decay"):
        averaging.build_ema(torch.nn.Linear(1, 1), -0.1)
    assert averaging.build_ema(torch.nn.Linear(1, 1), 0.0) is None
