"""python -m hpcm.train on CPU with HPCM_Tiny: variants, resume equivalence, signals,
fine-tuning."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from hpcm import models
from hpcm.config import run_config
from hpcm.train import checkpoints as checkpointing
from hpcm.train import loop as train
from hpcm.train.logs import METRIC_COLUMNS
from tests.paths import REPO
from tests.train.tiny import TINY, before_each_step, cli_args, sigterm_at_step


# Small and fast: 64 px crops of the embedded samples, no wandb, data in the main process.
def make_run(tmp_path: Path, **overrides) -> train.Run:
    cfg = run_config.resolve({**TINY, "steps": 10, **overrides})
    run = train.Run(cfg, tmp_path)
    run.open_data()
    run.build(None)
    return run


def fixed_batch(run: train.Run) -> torch.Tensor:
    loader = train.data.train_loader(run.train_set, 64, 2, seed=0, total_steps=1)
    return next(iter(loader))


VARIANTS = {
    "adam": {"variant": "baseline"},
    "cautious_adam": {"optimizer": "cautious_adam"},
    "balanced_same_batch": {"variant": "phase1"},
    "balanced_next_batch": {"variant": "phase1", "update_mode": "next_batch"},
    "phase2_cosine_gamma": {"variant": "phase2"},
    "qp": {"optimizer": "qp"},
    "phase3_measured": {"variant": "phase3"},
    "phase3_fixed_ratio": {
        "variant": "phase3",
        "decomposition": "fixed_ratio",
        "gamma_strategy": "cosine",
        "gammas_final": [0.004, 0.003, 0.002],
    },
    "phase3_adaptive": {
        "variant": "phase3",
        "decomposition": "adaptive",
        "gamma_strategy": "adaptive",
    },
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_every_variant_trains_on_a_fixed_batch(tmp_path, name):
    run = make_run(tmp_path, lr=1e-3, **VARIANTS[name])
    x = fixed_batch(run)
    losses = []
    for step in range(1, 6):
        metrics = run.train_step(step, x)
        run.step = step
        losses.append(float(metrics["loss"].detach()))
    assert all(math.isfinite(v) for v in losses), losses
    assert losses[-1] < 0.95 * losses[0], (
        f"{name}: loss did not decrease on a fixed batch: {losses}"
    )
    assert run.skipped_steps() == 0
    if run.balanced:
        weights = list(run.optimizer.get_task_weights().values())
        n = len(weights)
        assert n == (5 if run.hierarchical else 2)
        assert abs(sum(weights) - 1) < 1e-5
        assert max(abs(w - 1 / n) for w in weights) > 1e-6, (
            f"{name}: task weights never moved: {weights}"
        )
    if name == "phase2_cosine_gamma":  # cosine from 0.003 towards 0.001 over 10 steps
        assert run.optimizer.gamma < 0.003
    if name == "phase3_adaptive":  # the learnable ratios are trained with the model
        assert not torch.allclose(
            run.decomposition.distortion_logits.detach(), torch.tensor([0.40, 0.35, 0.25]).log()
        )


def test_nonfinite_batch_is_skipped_and_counted(tmp_path):
    run = make_run(tmp_path)
    x = fixed_batch(run)
    before = {k: v.clone() for k, v in run.model.state_dict().items()}
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    run.train_step(1, bad)
    after = run.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "a NaN batch changed the weights"
    assert run.skipped_steps() == 1
    assert run.optimizer.state_dict()["state"][0]["step"].item() == 0  # Adam's step was not taken
    run.train_step(1, x)
    assert run.skipped_steps() == 1


def nan_batches(which):
    """Within: the batch of every step for which ``which(step)`` holds has a NaN pixel, so its
    loss is not finite and the optimizer skips it (as a diverged model's batches are)."""

    def poison(step, x):
        if not which(step):
            return x
        x = x.clone()
        x[0, 0, 0, 0] = float("nan")
        return x

    return before_each_step(poison)


@pytest.mark.parametrize(
    "variant, first_bad, stop_step, healthy_step",
    [
        ("baseline", 1, 50, 0),  # every batch from the start: 5 windows of 10
        ("phase1", 1, 50, 0),  # the Balanced optimizers count their own skips
        ("baseline", 16, 70, 20),  # from mid-window: the window of steps 11-20 is half good
    ],
)
def test_a_run_that_skips_most_batches_stops_as_diverged_and_refuses_to_resume(
    tmp_path, capsys, variant, first_bad, stop_step, healthy_step
):
    out = tmp_path / "run"
    args = cli_args(out, variant=variant, steps=100, log_every=10, checkpoint_every=100)
    bad = lambda step: step >= first_bad and step % 25 != 0  # noqa: E731 (the odd good batch)
    with nan_batches(bad):
        assert train.main(args) == train.EXIT_CRASH
    err = capsys.readouterr().err
    skipped = sum(map(bad, range(healthy_step + 1, stop_step + 1)))
    assert f"{skipped} of the {stop_step - healthy_step} batches after step {healthy_step} " in err
    assert f"at step {stop_step}." in err
    assert "diverged at lr 0.0001" in err and "Lower `lr`" in err and "Traceback" not in err
    assert f"Checkpoints from step {healthy_step} on" in err
    assert read_csv(out / "metrics.csv")[-1]["step"] == str(stop_step)
    assert not (out / train.DONE_MARKER).exists()
    assert not (out / checkpointing.CHECKPOINT_LAST).exists()
    # the workflow's retry (the same command) is refused at once, with the same reason
    assert train.main(args) == train.EXIT_CONFIG
    err = capsys.readouterr().err
    assert "refusing to resume" in err and f"after step {healthy_step}" in err


def test_a_run_that_skips_some_batches_finishes(tmp_path, capsys):
    """Skipping is for the odd bad batch: half of 60 batches skipped is no divergence."""
    out = tmp_path / "run"
    with nan_batches(lambda step: step % 2 == 0):
        assert train.main(cli_args(out, steps=60, log_every=10)) == train.EXIT_OK
    assert (out / train.DONE_MARKER).exists() and not (out / train.DIVERGED_MARKER).exists()
    assert read_csv(out / "metrics.csv")[-1]["skipped_steps"] == "30"


def test_lr_follows_the_official_milestone_fractions(tmp_path):
    run = make_run(tmp_path, steps=3000)
    assert run.lr_at(1) == 1e-4 and run.lr_at(2750) == 1e-4
    assert run.lr_at(2751) == 3e-5 and run.lr_at(2851) == 1e-5 and run.lr_at(2951) == 1e-6


def read_csv(path: Path) -> list[dict[str, str]]:
    import csv

    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def final_state(out: Path) -> dict:
    return torch.load(out / checkpointing.CHECKPOINT_LAST, map_location="cpu", weights_only=False)


@pytest.mark.parametrize(
    "variant",
    [
        {"variant": "baseline"},
        {"variant": "phase1", "update_mode": "same_batch"},
        {"optimizer": "qp"},
        {"variant": "phase3", "update_mode": "next_batch"},
        {"variant": "phase3", "decomposition": "adaptive", "gamma_strategy": "adaptive"},
        {"variant": "phase1", "ema_decay": 0.5, "val_every": 2},
    ],
    ids=[
        "baseline",
        "phase1_same_batch",
        "qp",
        "phase3_next_batch",
        "phase3_adaptive",
        "phase1_ema",
    ],
)
def test_interrupted_and_resumed_run_equals_uninterrupted(tmp_path, variant):
    settings = {"steps": 4, "checkpoint_every": 1, **variant}
    full, parted = tmp_path / "full", tmp_path / "parted"
    assert train.main(cli_args(full, **settings)) == train.EXIT_OK

    with sigterm_at_step(2):
        assert train.main(cli_args(parted, **settings)) == train.EXIT_INTERRUPTED
    assert final_state(parted)["step"] == 2 and not (parted / "done").exists()
    assert train.main(cli_args(parted, **settings)) == train.EXIT_OK

    a, b = final_state(full), final_state(parted)
    assert a["step"] == b["step"] == 4
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), f"weights differ after resume: {key}"
    if (
        a["ema"] is not None
    ):  # the moving average resumes too (and so do the validations that use it)
        for key, value in a["ema"].items():
            assert torch.equal(value, b["ema"][key]), f"moving average differs after resume: {key}"
        best_a, best_b = (
            torch.load(out / "epoch_best.pth.tar", weights_only=True) for out in (full, parted)
        )
        assert best_a.keys() == best_b.keys() and all(
            torch.equal(best_a[k], best_b[k]) for k in best_a
        )
    balancing_a, balancing_b = a["optimizer"].get("balancing"), b["optimizer"].get("balancing")
    if balancing_a is not None:
        assert torch.equal(balancing_a["w"], balancing_b["w"])
    # metrics.csv has one row per step, none duplicated by the resume
    assert [r["step"] for r in read_csv(parted / "metrics.csv")] == ["1", "2", "3", "4"]
    # a finished run is a no-op
    mtime = (parted / checkpointing.CHECKPOINT_LAST).stat().st_mtime_ns
    assert train.main(cli_args(parted, **settings)) == train.EXIT_OK
    assert (parted / checkpointing.CHECKPOINT_LAST).stat().st_mtime_ns == mtime


def test_outputs_of_a_balanced_run(tmp_path):
    out = tmp_path / "run"
    assert train.main(cli_args(out, variant="phase1", steps=2, val_every=2)) == train.EXIT_OK
    for name in (
        "metrics.csv",
        "checkpoint_last.pth.tar",
        "epoch_best.pth.tar",
        "balanced_state_best.pth",
        "run.yaml",
        "done",
    ):
        assert (out / name).is_file(), name
    rows = read_csv(out / "metrics.csv")
    assert list(rows[0]) == list(METRIC_COLUMNS)
    assert rows[-1]["val_loss"] and rows[-1]["val_bpp"] and rows[-1]["task_weight_distortion"]
    assert float(rows[-1]["task_weight_distortion"]) + float(
        rows[-1]["task_weight_bpp"]
    ) == pytest.approx(1)
    # epoch_best is the official raw layout with coder tables: it loads and codes
    best = torch.load(out / "epoch_best.pth.tar", map_location="cpu", weights_only=True)
    assert all(torch.is_tensor(v) for v in best.values())
    model = models.load_checkpoint(out / "epoch_best.pth.tar", name="HPCM_Tiny")
    x = torch.rand(1, 3, 64, 64)
    coded = model.compress(x)
    assert model.decompress(coded["strings"], coded["shape"])["x_hat"].shape == x.shape
    import yaml

    meta = yaml.safe_load((out / "run.yaml").read_text())
    assert (
        meta["variant"] == "phase1"
        and meta["optimizer"] == "balanced"
        and meta["meta"]["git_commit"]
    )
    balanced_state = torch.load(
        out / "balanced_state_best.pth", map_location="cpu", weights_only=False
    )
    assert "w" in balanced_state["balancing"]
    assert all(
        row["s1_distortion"] == "" and row["s3_bpp"] == "" for row in rows
    )  # Phase 3 columns only


def test_logged_rows_are_window_means_of_the_step_metrics(tmp_path, monkeypatch):
    """Phase 3: every summed column, the scale tasks included, is the mean of its window's steps."""
    import numpy as np

    # metrics.csv column -> key of the loss dict that train_step returns
    columns = {
        "loss": "loss",
        "distortion": "distortion",
        "bpp": "bpp_loss",
        "y_bpp": "y_bpp",
        "psnr": "psnr",
        "s1_distortion": "s1_d",
        "s2_bpp": "s2_b",
        "s3_bpp": "s3_b",
    }
    per_step: list[dict[str, float]] = []
    real_step = train.Run.train_step

    def recording_step(self, step, x):
        metrics = real_step(self, step, x)
        per_step.append({column: float(metrics[key].detach()) for column, key in columns.items()})
        return metrics

    monkeypatch.setattr(train.Run, "train_step", recording_step)
    out = tmp_path / "run"
    assert (
        train.main(cli_args(out, variant="phase3", steps=4, log_every=2, val_every=4))
        == train.EXIT_OK
    )
    rows = [r for r in read_csv(out / "metrics.csv") if r["loss"]]
    assert [r["step"] for r in rows] == ["2", "4"]
    for row, window in zip(rows, (per_step[0:2], per_step[2:4])):
        for column in columns:
            expected = np.mean([step[column] for step in window], dtype=np.float64)
            assert float(row[column]) == pytest.approx(expected, rel=1e-6), column


def test_logged_loss_std_describes_the_per_step_losses_of_each_window(tmp_path, monkeypatch):
    import numpy as np

    from hpcm.analysis import tables

    per_step: list[float] = []
    real_step = train.Run.train_step

    def recording_step(self, step, x):
        metrics = real_step(self, step, x)
        per_step.append(float(metrics["loss"].detach()))
        return metrics

    monkeypatch.setattr(train.Run, "train_step", recording_step)
    out = tmp_path / "run"
    assert train.main(cli_args(out, steps=7, log_every=3, val_every=7)) == train.EXIT_OK
    rows = [r for r in read_csv(out / "metrics.csv") if r["loss"]]
    assert [(r["step"], r["loss_steps"]) for r in rows] == [("3", "3"), ("6", "3"), ("7", "1")]
    losses = np.array(per_step)
    for row, window in zip(rows, (losses[0:3], losses[3:6], losses[6:7])):
        assert float(row["loss"]) == pytest.approx(window.mean(), rel=1e-6)
        assert float(row["loss_std"]) == pytest.approx(window.std(), rel=1e-4, abs=1e-7)
    import pandas as pd

    stability = tables.loss_cv(pd.read_csv(out / "metrics.csv"), tail=1.0)
    assert stability.per_step
    assert stability.value == pytest.approx(losses.std(ddof=1) / losses.mean(), rel=1e-4)


def test_all_checkpoints_corrupt_is_a_clear_error_not_a_traceback(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / checkpointing.CHECKPOINT_LAST).write_bytes(b"truncated")
    assert train.main(cli_args(out, steps=2)) == train.EXIT_CONFIG
    err = capsys.readouterr().err
    assert "error: no readable training checkpoint" in err
    assert str(out / checkpointing.CHECKPOINT_LAST) in err and "Traceback" not in err
    assert (out / checkpointing.CHECKPOINT_LAST).read_bytes() == b"truncated"  # nothing overwritten


def test_an_image_that_breaks_mid_run_is_a_clear_error_and_work_is_kept(
    tmp_path, monkeypatch, capsys
):
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    for k in range(2):
        Image.fromarray((torch.rand(72, 80, 3) * 255).byte().numpy()).save(folder / f"img{k}.png")
    real_step = train.Run.train_step

    def corrupt_after_step_2(self, step, x):
        metrics = real_step(self, step, x)
        if self.step + 1 == 2:  # the disk goes bad after the run was validated and started
            for path in folder.iterdir():
                path.write_bytes(b"\x89PNG garbage")
        return metrics

    monkeypatch.setattr(train.Run, "train_step", corrupt_after_step_2)
    out = tmp_path / "run"
    assert train.main(cli_args(out, steps=6, train_data=str(folder))) == train.EXIT_CONFIG
    err = capsys.readouterr().err
    assert "error: " in err and str(folder / "img") in err and "Traceback" not in err
    assert "training state saved at step 2" in err
    assert final_state(out)["step"] == 2 and not (out / "done").exists()


def test_fine_tuning_from_an_official_layout_checkpoint(tmp_path):
    torch.manual_seed(123)
    source = models.build_model("HPCM_Tiny")
    # official layout: raw state dict, DataParallel prefix, legacy release without adaptive vectors
    official = {
        f"module.{k}": v
        for k, v in source.state_dict().items()
        if not k.startswith("adaptive_params_list.")
    }
    path = tmp_path / "0.013.pth.tar"
    torch.save(official, path)
    with pytest.warns(UserWarning, match="adaptive"):
        run = make_run(
            tmp_path / "ft", init_checkpoint=str(path), variant="phase2", optimizer="qp", lr=5e-5
        )
    loaded = run.model.state_dict()
    for key, value in official.items():
        assert torch.equal(loaded[key.removeprefix("module.")], value), key
    metrics = run.train_step(1, fixed_batch(run))
    assert math.isfinite(float(metrics["loss"].detach())) and run.skipped_steps() == 0


def test_fine_tuning_from_a_project_training_checkpoint_and_a_misfit(tmp_path, capsys):
    torch.manual_seed(7)
    source = models.build_model("HPCM_Tiny")
    checkpointing.save_training_state(
        tmp_path / "old", {"step": 3, "model": source.state_dict(), "optimizer": {}, "config": {}}
    )
    path = tmp_path / "old" / checkpointing.CHECKPOINT_LAST
    run = make_run(tmp_path / "ft", init_checkpoint=str(path))
    for key, value in source.named_parameters():
        assert torch.equal(run.model.state_dict()[key], value.detach()), key
    code = train.main(
        cli_args(
            tmp_path / "misfit",
            steps=1,
            model="HPCM_Small",
            patch_size=128,
            init_checkpoint=str(path),
        )
    )
    assert code == train.EXIT_CONFIG
    assert f"{path} does not fit HPCM_Small: parameter" in capsys.readouterr().err


def test_sigterm_to_the_process_group_saves_and_exits_with_the_documented_code(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    command = [sys.executable, "-m", "hpcm.train", *cli_args(out, steps=100000, num_workers=1)]
    process = subprocess.Popen(
        command,
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
        text=True,
    )
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and process.poll() is None:
            if (out / "metrics.csv").exists() and len(read_csv(out / "metrics.csv")) >= 1:
                break
            time.sleep(0.5)
        assert process.poll() is None, process.communicate()[1]
        os.killpg(
            process.pid, signal.SIGTERM
        )  # SLURM signals every process of the job, workers included
        _, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == train.EXIT_INTERRUPTED, stderr
    assert "checkpoint saved" in stderr
    state = checkpointing.load_latest_state(out)
    assert state is not None and state["step"] >= 1
    assert not (out / "done").exists()


@pytest.mark.parametrize(
    "overrides, expected",
    [
        ({"lamda": 0.01}, ["'lamda'", "0.01", "unknown key"]),
        ({"batch_size": "abc"}, ["'batch_size'", "'abc'"]),
        ({"lmbda": -1}, ["'lmbda'", "-1", "> 0"]),
        ({"lmbda": 0}, ["'lmbda'", "0"]),
        ({"optimizer": "sgd"}, ["'optimizer'", "'sgd'", "balanced"]),
        ({"patch_size": 96}, ["'patch_size'", "96", "multiple of 64"]),
        ({"steps": 10, "epochs": 2}, ["'steps'", "'epochs'"]),
    ],
)
def test_bad_configs_fail_before_any_work_naming_key_and_value(
    tmp_path, capsys, overrides, expected
):
    out = tmp_path / "run"
    code = train.main(cli_args(out, **{"steps": 2, **overrides}))
    message = capsys.readouterr().err
    assert code == train.EXIT_CONFIG
    for fragment in expected:
        assert fragment in message, (fragment, message)
    assert not (out / "metrics.csv").exists() and not (out / checkpointing.CHECKPOINT_LAST).exists()


def test_bad_datasets_fail_naming_key_and_value(tmp_path, capsys):
    from PIL import Image

    empty = tmp_path / "empty"
    empty.mkdir()
    small = tmp_path / "small"
    small.mkdir()
    Image.new("RGB", (40, 48)).save(small / "a.png")
    assert (
        train.main(cli_args(tmp_path / "r1", steps=2, train_data=str(empty))) == train.EXIT_CONFIG
    )
    assert f"'train_data' = '{empty}'" in capsys.readouterr().err
    assert (
        train.main(cli_args(tmp_path / "r2", steps=2, train_data=str(small))) == train.EXIT_CONFIG
    )
    message = capsys.readouterr().err
    assert "'patch_size' = 64" in message and "larger than every image" in message
    assert (
        train.main(cli_args(tmp_path / "r3", steps=2, train_data=str(tmp_path / "nope")))
        == train.EXIT_CONFIG
    )
    assert "'train_data'" in capsys.readouterr().err


def test_changed_config_on_resume_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    assert train.main(cli_args(out, steps=1)) == train.EXIT_OK
    (out / "done").unlink()
    assert train.main(cli_args(out, steps=1, lmbda=0.0483)) == train.EXIT_CONFIG
    assert "'lmbda' changed from 0.013" in capsys.readouterr().err


def test_help_documents_every_key(capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for key in run_config.KEYS:
        assert f"  {key} (" in text, key
    assert str(train.EXIT_INTERRUPTED) in text


def test_a_loss_without_a_logged_key_names_the_column_and_the_loss(tmp_path):
    run = make_run(tmp_path, variant="phase3")
    metrics, _ = run.forward_and_loss(fixed_batch(run))
    del metrics["psnr"]
    with pytest.raises(KeyError, match=r"hierarchical_balanced.*measured.*no 'psnr'.*column"):
        run.stack_metrics(metrics)
