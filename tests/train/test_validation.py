"""Validation images checked at the start of a run, and a failed validation redone on resume
(issue 26, points 1 and 5): no step's row disappears, epoch_best is never unvalidated weights."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hpcm.train import checkpoints as checkpointing
from hpcm.train import loop as train
from tests.train.tiny import cli_args


def write_images(folder: Path, size: tuple[int, int], count: int = 2) -> list[Path]:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    paths = []
    for k in range(count):
        path = folder / f"img{k}.png"
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def rows_of(out: Path) -> list[dict[str, str]]:
    with open(out / "metrics.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def state_of(out: Path) -> dict:
    return torch.load(out / checkpointing.CHECKPOINT_LAST, map_location="cpu", weights_only=False)


def break_validation_at(monkeypatch, step: int, images: list[Path]) -> None:
    """The validation images become unreadable during ``step`` (after the run checked them)."""
    real_step = train.Run.train_step

    def breaking_step(self, current, x):
        metrics = real_step(self, current, x)
        if current == step:
            for path in images:
                path.write_bytes(b"\x89PNG garbage")
        return metrics

    monkeypatch.setattr(train.Run, "train_step", breaking_step)


def without_time(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    return [{k: v for k, v in row.items() if k != "step_time"} for row in rows]


@pytest.mark.parametrize(
    "settings",
    [
        {"steps": 3},  # the validation of the last step fails
        {"steps": 4, "val_every": 2, "checkpoint_every": 1},  # a mid-run validation fails
    ],
    ids=["last_step", "mid_run"],
)
def test_a_failed_validation_is_redone_when_the_run_resumes(
    tmp_path, monkeypatch, capsys, settings
):
    images = write_images(tmp_path / "val", (64, 80))
    originals = [path.read_bytes() for path in images]
    settings = {**settings, "val_data": str(tmp_path / "val")}
    failing_step = 2 if "val_every" in settings else 3
    full, parted = tmp_path / "full", tmp_path / "parted"
    assert train.main(cli_args(full, **settings)) == train.EXIT_OK

    with monkeypatch.context() as patch:
        break_validation_at(patch, failing_step, images)
        assert train.main(cli_args(parted, **settings)) == train.EXIT_CONFIG
    assert f"training state saved at step {failing_step}" in capsys.readouterr().err
    assert state_of(parted)["step"] == failing_step and not (parted / "done").exists()
    for path, data in zip(images, originals):  # the user fixes the images, then re-runs
        path.write_bytes(data)
    assert train.main(cli_args(parted, **settings)) == train.EXIT_OK

    # every step's row is there, with its training loss and its validation, as without the failure
    rows, reference = rows_of(parted), rows_of(full)
    assert [r["step"] for r in rows] == [str(s) for s in range(1, settings["steps"] + 1)]
    failed = rows[failing_step - 1]
    assert failed["loss"] != "" and failed["val_loss"] != ""
    assert without_time(rows) == without_time(reference)
    # the best model is a validated one: the same file as the uninterrupted run's
    best_full, best_parted = (
        torch.load(out / checkpointing.BEST_MODEL, weights_only=True) for out in (full, parted)
    )
    assert best_full.keys() == best_parted.keys()
    assert all(torch.equal(best_full[k], best_parted[k]) for k in best_full)
    done = (parted / "done").read_text()
    assert "inf" not in done and done == (full / "done").read_text()
    assert state_of(parted)["pending_validation"] is None


def test_a_validation_that_fails_again_keeps_the_pending_step(tmp_path, monkeypatch, capsys):
    images = write_images(tmp_path / "val", (64, 80))
    settings = {"steps": 2, "val_data": str(tmp_path / "val")}
    out = tmp_path / "run"
    with monkeypatch.context() as patch:
        break_validation_at(patch, 2, images)
        assert train.main(cli_args(out, **settings)) == train.EXIT_CONFIG
    capsys.readouterr()
    # not fixed: the resume is refused at the start (the images are checked), nothing changes
    mtime = (out / checkpointing.CHECKPOINT_LAST).stat().st_mtime_ns
    assert train.main(cli_args(out, **settings)) == train.EXIT_CONFIG
    assert "'val_data'" in capsys.readouterr().err
    assert (out / checkpointing.CHECKPOINT_LAST).stat().st_mtime_ns == mtime
    assert not (out / checkpointing.BEST_MODEL).exists() and not (out / "done").exists()


def test_a_broken_validation_image_is_refused_before_training(tmp_path, capsys):
    images = write_images(tmp_path / "val", (64, 80))
    data = images[1].read_bytes()
    images[1].write_bytes(data[: len(data) // 2])  # the header reads, the pixels do not
    out = tmp_path / "run"
    assert train.main(cli_args(out, steps=2, val_data=str(tmp_path / "val"))) == train.EXIT_CONFIG
    err = capsys.readouterr().err
    assert "'val_data'" in err and str(images[1]) in err and "Traceback" not in err
    assert not (out / checkpointing.CHECKPOINT_LAST).exists() and not (out / "metrics.csv").exists()


def test_a_broken_validation_image_is_skipped_when_asked(tmp_path, capsys):
    images = write_images(tmp_path / "val", (64, 80))
    images[1].write_bytes(images[1].read_bytes()[:100])
    out = tmp_path / "run"
    with pytest.warns(UserWarning, match="skipping unreadable validation image"):
        code = train.main(
            cli_args(out, steps=1, skip_bad_images=True, val_data=str(tmp_path / "val"))
        )
    assert code == train.EXIT_OK
    assert rows_of(out)[-1]["val_loss"] != ""


def test_ms_ssim_with_small_validation_images_is_refused_at_the_start(tmp_path, capsys):
    write_images(tmp_path / "val", (128, 200))
    out = tmp_path / "run"
    code = train.main(
        cli_args(out, steps=1, distortion="ms_ssim", patch_size=192, val_data=str(tmp_path / "val"))
    )
    err = capsys.readouterr().err
    assert code == train.EXIT_CONFIG
    assert f"'val_data' = '{tmp_path / 'val'}'" in err and "128x200" in err and "161" in err
    assert "Traceback" not in err
    assert not (out / checkpointing.CHECKPOINT_LAST).exists() and not (out / "metrics.csv").exists()
