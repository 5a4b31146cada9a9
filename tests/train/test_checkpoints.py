"""Training checkpoints: rotation, fallback on corruption, a killed writer, RNG round trips."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from hpcm.train import checkpoints as checkpointing
from tests.paths import REPO


def state(step: int) -> dict:
    return {
        "step": step,
        "model": {"w": torch.full((3,), float(step))},
        "optimizer": {},
        "config": {"seed": 0},
    }


def test_newest_checkpoint_is_resumed_and_previous_is_kept(tmp_path):
    assert checkpointing.load_latest_state(tmp_path) is None
    checkpointing.save_training_state(tmp_path, state(1))
    checkpointing.save_training_state(tmp_path, state(2))
    loaded = checkpointing.load_latest_state(tmp_path)
    assert loaded["step"] == 2 and torch.equal(loaded["model"]["w"], torch.full((3,), 2.0))
    prev = torch.load(tmp_path / checkpointing.CHECKPOINT_PREV, weights_only=False)
    assert prev["step"] == 1


@pytest.mark.parametrize("damage", ["truncate", "garbage", "foreign"])
def test_corrupt_newest_checkpoint_falls_back_to_previous_with_a_warning(tmp_path, damage):
    checkpointing.save_training_state(tmp_path, state(1))
    checkpointing.save_training_state(tmp_path, state(2))
    last = tmp_path / checkpointing.CHECKPOINT_LAST
    if damage == "truncate":
        last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    elif damage == "garbage":
        last.write_bytes(b"\x00" * 100)
    else:
        torch.save({"something": "else"}, last)
    with pytest.warns(UserWarning, match="checkpoint_last.pth.tar"):
        loaded = checkpointing.load_latest_state(tmp_path)
    assert loaded["step"] == 1


def test_saving_after_a_fallback_keeps_the_valid_previous_checkpoint(tmp_path):
    checkpointing.save_training_state(tmp_path, state(1))
    checkpointing.save_training_state(tmp_path, state(2))
    (tmp_path / checkpointing.CHECKPOINT_LAST).write_bytes(b"\x00" * 100)
    with pytest.warns(UserWarning, match="aside to checkpoint_last.corrupt"):
        resumed = checkpointing.load_latest_state(tmp_path)
    assert resumed["step"] == 1
    assert (tmp_path / "checkpoint_last.corrupt").read_bytes() == b"\x00" * 100
    # The resumed run saves step 2 again: the generation it resumed from must survive as prev.
    checkpointing.save_training_state(tmp_path, state(2))
    prev = torch.load(tmp_path / checkpointing.CHECKPOINT_PREV, weights_only=False)
    assert prev["step"] == 1
    (tmp_path / checkpointing.CHECKPOINT_LAST).write_bytes(b"broken again")  # and a second crash
    with pytest.warns(UserWarning):
        assert checkpointing.load_latest_state(tmp_path)["step"] == 1


def test_every_checkpoint_corrupt_is_an_error_not_a_fresh_start(tmp_path):
    (tmp_path / checkpointing.CHECKPOINT_LAST).write_bytes(b"broken")
    with pytest.raises(
        checkpointing.CheckpointCorruptError, match="no readable training checkpoint"
    ) as error:
        checkpointing.load_latest_state(tmp_path)
    assert str(tmp_path / checkpointing.CHECKPOINT_LAST) in str(error.value)
    assert (tmp_path / checkpointing.CHECKPOINT_LAST).read_bytes() == b"broken"  # left as it was


def test_a_writer_killed_mid_save_leaves_the_previous_checkpoint_intact(tmp_path):
    # The child saves step 1, then starts saving step 2 with a torch.save that stalls half-way;
    # we SIGKILL it there (power loss / OOM killer) and check what a resumed run would see.
    child = textwrap.dedent(f"""
        import sys, time, torch
        from hpcm.train import checkpoints as checkpointing
        run_dir = {str(tmp_path)!r}
        checkpointing.save_training_state(run_dir, {{"step": 1, "model": {{"w": torch.ones(1000)}},
                                                     "optimizer": {{}}, "config": {{}}}})
        def stalled_save(obj, handle, *args, **kwargs):
            handle.write(b"PK\\x03\\x04" + b"half a zip file" * 1000)
            handle.flush()
            print("mid-write", flush=True)
            time.sleep(600)
        torch.save = stalled_save
        checkpointing.save_training_state(
            run_dir, {{"step": 2, "model": {{}}, "optimizer": {{}}, "config": {{}}}}
        )
    """)
    process = subprocess.Popen(
        [sys.executable, "-c", child],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        assert process.stdout.readline().strip() == "mid-write"
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert not (
        tmp_path / checkpointing.CHECKPOINT_LAST
    ).exists()  # the half file was never renamed
    loaded = checkpointing.load_latest_state(tmp_path)
    assert loaded["step"] == 1 and torch.equal(loaded["model"]["w"], torch.ones(1000))


def test_rng_state_round_trip_replays_every_generator():
    torch.manual_seed(1)
    np.random.seed(1)
    random.seed(1)
    saved = checkpointing.rng_state()
    first = (torch.rand(3), np.random.rand(3), random.random())
    checkpointing.set_rng_state(saved)
    second = (torch.rand(3), np.random.rand(3), random.random())
    assert (
        torch.equal(first[0], second[0]) and (first[1] == second[1]).all() and first[2] == second[2]
    )


def test_best_model_is_exported_with_coder_tables_and_training_model_untouched(tmp_path):
    from hpcm.models import build_model

    torch.manual_seed(0)
    model = build_model("HPCM_Tiny").train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    labels = {"model": "HPCM_Tiny", "variant": "phase1", "lmbda": 0.0067, "seed": 1}
    path = checkpointing.save_best_model(model, tmp_path, labels)
    exported = torch.load(path, map_location="cpu", weights_only=True)
    assert exported._metadata["__hpcm_run__"] == labels  # the file says what it is
    assert model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert set(exported) == set(before)
    changed = [
        k
        for k in exported
        if exported[k].shape != before[k].shape or not torch.equal(exported[k], before[k])
    ]
    assert changed, "update(force=True) built no coder table"
    weights = [k for k, v in before.items() if v.is_floating_point() and k not in changed]
    assert weights and all(torch.equal(exported[k], before[k]) for k in weights)
