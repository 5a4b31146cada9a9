"""Phase 4 fine-tuning (hpcm.train.phase4) in real tiny runs: frozen groups stay bitwise unchanged
under every optimizer, lr ratios compose with the lr schedule, progressive unfreezing and per-scale
early stopping happen at the configured steps, and an interrupted run resumes bit-identically."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch

from hpcm import models
from hpcm.config import run_config
from hpcm.config.tasks import SCALES
from hpcm.models import param_groups
from hpcm.train import checkpoints as checkpointing
from hpcm.train import loop as train
from hpcm.train import phase4
from tests.train.tiny import cli_args, sigterm_at_step


def initial_weights(seed: int = 0) -> dict[str, torch.Tensor]:
    """The weights Run.build starts from with no init_checkpoint (same seed, same preset)."""
    checkpointing.seed_everything(seed)
    return {k: v.clone() for k, v in models.build_model("HPCM_Tiny").state_dict().items()}


def names_in(group: str, scales: set[str] | None = None) -> list[str]:
    with torch.device("meta"):
        model = models.build_model("HPCM_Tiny")
    out = []
    for name, _ in model.named_parameters():
        where = param_groups.group_of(name)
        if where.group == group and (scales is None or set(where.scales) == scales):
            out.append(name)
    return out


def record_steps(monkeypatch) -> list[dict]:
    """After every training step: the model's parameters and each optimizer group's lr."""
    history: list[dict] = []
    real_step = train.Run.train_step

    def recorded(self, step, x):
        metrics = real_step(self, step, x)
        history.append(
            {
                "step": self.step + 1,
                "weights": {n: p.detach().clone() for n, p in self.model.named_parameters()},
                "lrs": {g.get("group"): g["lr"] for g in self.optimizer.param_groups},
            }
        )
        return metrics

    monkeypatch.setattr(train.Run, "train_step", recorded)
    return history


def scripted_validation(monkeypatch, rates: dict[str, list[float]]) -> None:
    """Run.validate returns the scripted per-scale rates of the k-th validation (no images
    coded)."""

    def validate(self):
        k = self.step // self.cfg.val_every - 1
        values = {f"val_{s}_bpp": rates[s][k] for s in SCALES}
        total = sum(values.values())
        return {
            "val_loss": 1.0 / (k + 1),
            "val_distortion": 0.5,
            "val_bpp": total,
            "val_psnr": 20.0,
            "val_mse": 0.01,
            "val_y_bpp": total,
            "val_z_bpp": 0.0,
            **values,
        }

    monkeypatch.setattr(train.Run, "validate", validate)


def final_state(out: Path) -> dict:
    return torch.load(out / checkpointing.CHECKPOINT_LAST, map_location="cpu", weights_only=False)


OPTIMIZERS = {
    "adam": {"optimizer": "adam"},
    "cautious_adam": {"optimizer": "cautious_adam"},
    "balanced_same_batch": {"optimizer": "balanced", "update_mode": "same_batch"},
    "balanced_next_batch": {"optimizer": "balanced", "update_mode": "next_batch"},
    "qp": {"optimizer": "qp"},
    "hierarchical_balanced": {"optimizer": "hierarchical_balanced", "update_mode": "next_batch"},
}


@pytest.mark.parametrize("settings", OPTIMIZERS.values(), ids=OPTIMIZERS)
def test_a_frozen_group_is_bitwise_unchanged_under_every_optimizer(tmp_path, monkeypatch, settings):
    scripted_validation(
        monkeypatch, {s: [1.0] for s in SCALES}
    )  # the end-of-run validation codes no images
    out = tmp_path / "run"
    assert (
        train.main(cli_args(out, steps=3, val_every=3, freeze="[hyperprior]", **settings))
        == train.EXIT_OK
    )
    start, end = initial_weights(), final_state(out)
    frozen = names_in("hyperprior")
    for name in frozen:
        assert torch.equal(end["model"][name], start[name]), f"frozen {name} moved"
    assert any(
        not torch.equal(end["model"][n], start[n]) for n in names_in("context")
    )  # the others trained
    # a frozen parameter has no optimizer state (no moments that could carry it later)
    index = {n: i for i, (n, _) in enumerate(models.build_model("HPCM_Tiny").named_parameters())}
    groups = end["optimizer"]["param_groups"]
    order = [i for g in groups for i in g["params"]]
    by_name = {
        n: order[
            [g["group"] for g in groups for _ in g["params"]].index("hyperprior")
            + names_in("hyperprior").index(n)
        ]
        for n in frozen
    }
    assert all(by_name[n] not in end["optimizer"]["state"] for n in frozen)
    assert len(index) == len(order)


def test_group_lr_ratios_compose_with_the_lr_schedule(tmp_path, monkeypatch):
    history = record_steps(monkeypatch)
    ratios = {"transforms": 1.0, "hyperprior": 0.5, "context": 0.1}
    out = tmp_path / "run"
    assert (
        train.main(
            cli_args(
                out,
                steps=4,
                optimizer="balanced",
                update_mode="next_batch",
                lr=1e-3,
                lr_milestones="[0.5,0.75]",
                lr_values="[1e-4,1e-5]",
                group_lr="{hyperprior: 0.5, context: 0.1}",
            )
        )
        == train.EXIT_OK
    )

    # closed form: lr until step 2, then 1e-4 from step 3 (round(0.5*4) = 2 steps done), 1e-5 from 4
    def schedule(step):
        return 1e-3 if step <= 2 else (1e-4 if step == 3 else 1e-5)

    assert [h["step"] for h in history] == [1, 2, 3, 4]
    for h in history:
        assert h["lrs"] == {g: schedule(h["step"]) * r for g, r in ratios.items()}


def test_progressive_unfreezing_starts_at_the_configured_step(tmp_path, monkeypatch):
    history = record_steps(monkeypatch)
    out = tmp_path / "run"
    assert (
        train.main(cli_args(out, steps=4, optimizer="adam", unfreeze_schedule="{context: 0.5}"))
        == train.EXIT_OK
    )
    assert phase4.unfreeze_step(0.5, 4) == 3
    start, context = initial_weights(), names_in("context")
    for h in history:
        unchanged = all(torch.equal(h["weights"][n], start[n]) for n in context)
        assert unchanged == (h["step"] < 3), f"step {h['step']}"
    with open(out / "metrics.csv", newline="") as handle:
        groups = [r["trainable_groups"] for r in csv.DictReader(handle)]
    assert groups == ["transforms+hyperprior"] * 2 + ["transforms+hyperprior+context"] * 2


@pytest.mark.parametrize("optimizer", ["adam", "balanced"])
def test_a_scale_stops_when_its_validation_rate_stalls_for_the_patience(
    tmp_path, monkeypatch, optimizer
):
    # patience 2, one validation per step: s3 never improves after validation 1 -> stops after step
    # 3; s1 improves at validation 2, then not at 3 and 4 -> stops after step 4; s2 always improves.
    scripted_validation(
        monkeypatch,
        {
            "s1": [1.0, 0.9, 0.95, 0.9, 0.8, 0.7],
            "s2": [1.0, 0.9, 0.8, 0.7, 0.6, 0.5],
            "s3": [1.0, 1.0, 1.2, 1.1, 1.0, 0.9],
        },
    )
    history = record_steps(monkeypatch)
    out = tmp_path / "run"
    assert (
        train.main(
            cli_args(
                out,
                steps=6,
                val_every=1,
                optimizer=optimizer,
                update_mode="next_batch",
                scale_early_stop_patience=2,
            )
        )
        == train.EXIT_OK
    )
    weights = {h["step"]: h["weights"] for h in history}

    def moved(names, a, b):
        return [n for n in names if not torch.equal(weights[a][n], weights[b][n])]

    only = {s: names_in("context", {s}) for s in SCALES}
    shared_s1_s2 = names_in("context", {"s1", "s2"})
    assert moved(only["s3"], 2, 3) and not moved(
        only["s3"], 3, 6
    )  # stopped after step 3 (momentum ignored)
    assert moved(only["s1"], 3, 4) and not moved(only["s1"], 4, 6)  # stopped after step 4
    assert moved(only["s2"], 5, 6) and moved(
        shared_s1_s2, 5, 6
    )  # s2 (and the prior it shares with s1) go on
    assert moved(names_in("transforms"), 5, 6)
    state = final_state(out)["phase4"]
    assert state["stopped_at"] == {"s1": 4, "s2": None, "s3": 3}
    # a stopped scale stays stopped: its best is the one before it stopped
    assert (
        state["best"] == {"s1": 0.9, "s2": 0.5, "s3": 1.0} and state["bad_validations"]["s2"] == 0
    )
    with open(out / "metrics.csv", newline="") as handle:
        groups = [r["trainable_groups"] for r in csv.DictReader(handle)]
    assert (
        groups[3] == "transforms+hyperprior+context(s1,s2)"
        and groups[5] == "transforms+hyperprior+context(s2)"
    )


def test_interrupted_phase4_run_resumes_bit_identically(tmp_path, monkeypatch):
    scripted_validation(
        monkeypatch, {"s1": [1.0, 1.1, 1.2, 1.3], "s2": [1.0, 0.9, 0.8, 0.7], "s3": [1.0] * 4}
    )
    settings = {
        "steps": 4,
        "val_every": 1,
        "checkpoint_every": 1,
        "optimizer": "balanced",
        "update_mode": "next_batch",
        "scale_early_stop_patience": 1,
        "unfreeze_schedule": "{hyperprior: 0.5}",
        "group_lr": "{context: 0.1}",
    }
    full, parted = tmp_path / "full", tmp_path / "parted"
    assert train.main(cli_args(full, **settings)) == train.EXIT_OK
    with sigterm_at_step(3):
        assert train.main(cli_args(parted, **settings)) == train.EXIT_INTERRUPTED
    assert final_state(parted)["phase4"]["stopped_at"] == {"s1": 2, "s2": None, "s3": 2}
    assert train.main(cli_args(parted, **settings)) == train.EXIT_OK
    a, b = final_state(full), final_state(parted)
    assert a["phase4"] == b["phase4"]
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), f"weights differ after resume: {key}"
    assert [g["lr"] for g in a["optimizer"]["param_groups"]] == [
        g["lr"] for g in b["optimizer"]["param_groups"]
    ]


def test_per_scale_validation_rates_sum_to_the_y_rate(tmp_path):
    out = tmp_path / "run"
    assert train.main(cli_args(out, steps=1, val_every=1)) == train.EXIT_OK
    with open(out / "metrics.csv", newline="") as handle:
        row = list(csv.DictReader(handle))[-1]
    parts = [float(row[f"val_{s}_bpp"]) for s in SCALES]
    assert all(p > 0 for p in parts)
    assert math.isclose(
        sum(parts), float(row["val_y_bpp"]), rel_tol=1e-5
    )  # float32 sums in another order
    assert row["trainable_groups"] == ""  # Phase 4 off: no group column


@pytest.mark.parametrize(
    "overrides, expected",
    [
        ({"group_lr": {"context": 0}}, "'group_lr' = {'context': 0}: ratios must be > 0"),
        ({"group_lr": {"entropy": 0.5}}, "unknown parameter group 'entropy'"),
        ({"freeze": "hyperprior"}, "'freeze' = 'hyperprior': expected a list of parameter groups"),
        ({"freeze": ["context", "context"]}, "a group is listed twice"),
        (
            {"unfreeze_schedule": {"context": 1.5}},
            "'unfreeze_schedule' = {'context': 1.5}: fractions must be in (0, 1)",
        ),
        (
            {"freeze": ["context"], "unfreeze_schedule": {"context": 0.5}},
            "group 'context' is in 'freeze'",
        ),
        (
            {"freeze": ["context", "transforms"], "unfreeze_schedule": {"hyperprior": 0.5}},
            "leave no parameter group",
        ),
        ({"scale_early_stop_patience": -1}, "'scale_early_stop_patience' = -1: must be >= 0"),
    ],
)
def test_bad_phase4_keys_name_key_and_value(overrides, expected):
    with pytest.raises(run_config.ConfigError) as error:
        run_config.resolve({"steps": 1, **overrides})
    assert expected in str(error.value)


def test_phase4_keys_resolve_to_one_canonical_form():
    cfg = run_config.resolve(
        {"steps": 1, "group_lr": {"context": "0.1"}, "freeze": ["hyperprior", "transforms"]}
    )
    assert cfg.group_lr == {"transforms": 1.0, "hyperprior": 1.0, "context": 0.1}
    assert cfg.freeze == ["transforms", "hyperprior"]
    assert not phase4.is_active(run_config.resolve({"steps": 1}))


def test_a_run_whose_every_group_stopped_finishes_without_moving(tmp_path, monkeypatch):
    # transforms and hyperprior frozen, every scale stalls: after step 2 nothing trains
    scripted_validation(monkeypatch, {s: [1.0, 1.0, 1.0, 1.0] for s in SCALES})
    history = record_steps(monkeypatch)
    out = tmp_path / "run"
    assert (
        train.main(
            cli_args(
                out,
                steps=4,
                val_every=1,
                optimizer="balanced",
                update_mode="next_batch",
                freeze="[transforms,hyperprior]",
                scale_early_stop_patience=1,
            )
        )
        == train.EXIT_OK
    )
    weights = {h["step"]: h["weights"] for h in history}
    assert all(torch.equal(weights[2][n], weights[4][n]) for n in weights[4])
    assert any(not torch.equal(weights[1][n], weights[2][n]) for n in names_in("context"))
    with open(out / "metrics.csv", newline="") as handle:
        assert [r["trainable_groups"] for r in csv.DictReader(handle)][-1] == "none"


def test_the_weight_average_keeps_updating_after_every_group_stopped(tmp_path, monkeypatch):
    """ema_T = decay**T w_0 + ...: the average must be updated at every step, also the steps at
    which nothing trains, or it stays behind the final weights (validated and exported is the
    average)."""
    scripted_validation(monkeypatch, {s: [1.0, 1.0, 1.0, 1.0] for s in SCALES})
    updates = []
    real = torch.optim.swa_utils.AveragedModel.update_parameters
    monkeypatch.setattr(
        torch.optim.swa_utils.AveragedModel,
        "update_parameters",
        lambda self, model: (updates.append(1), real(self, model))[1],
    )
    assert (
        train.main(
            cli_args(
                tmp_path / "run",
                steps=4,
                val_every=1,
                optimizer="adam",
                ema_decay=0.5,
                freeze="[transforms,hyperprior]",
                scale_early_stop_patience=1,
            )
        )
        == train.EXIT_OK
    )
    assert (
        len(updates) == 1 + 4
    )  # the copy at the start, then one per step (steps 3 and 4 train nothing)
