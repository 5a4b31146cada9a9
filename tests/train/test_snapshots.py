"""snapshot_every / snapshot_keep: the seed's epoch_{N}.pth.tar + balanced_state_{N}.pth, kept
newest first."""

from __future__ import annotations

import pytest
import torch

from hpcm import models
from hpcm.train import checkpoints as checkpointing
from hpcm.train import loop as train
from hpcm.util.io import atomic_torch_save
from tests.train.tiny import cli_args

LABELS = {"model": "HPCM_Tiny", "variant": "phase1", "lmbda": 0.013, "seed": 0}


def names(run_dir) -> set[str]:
    return {p.name for p in run_dir.iterdir() if p.name.startswith(("epoch_", "balanced_state_"))}


@pytest.fixture(scope="module")
def model():
    return models.build_model("HPCM_Tiny")


def write_balanced(path):
    atomic_torch_save({"balancing": {"w": torch.zeros(2)}}, path)


def test_the_newest_are_kept_and_orphans_go_with_their_step(tmp_path, model):
    (tmp_path / "balanced_state_1.pth").write_bytes(b"an orphan of a crash between two deletions")
    (tmp_path / "epoch_best.pth.tar").write_bytes(b"not a snapshot")
    (tmp_path / "balanced_state_best.pth").write_bytes(b"not a snapshot")
    for step in (5, 10, 15):
        checkpointing.save_snapshot(
            model, tmp_path, step, LABELS, keep=2, save_balanced_state=write_balanced
        )
    assert names(tmp_path) == {
        "epoch_10.pth.tar",
        "epoch_15.pth.tar",
        "balanced_state_10.pth",
        "balanced_state_15.pth",
        "epoch_best.pth.tar",
        "balanced_state_best.pth",
    }
    assert checkpointing.snapshot_steps(tmp_path) == [10, 15]
    loaded = models.load_checkpoint(
        tmp_path / "epoch_15.pth.tar", name="HPCM_Tiny"
    )  # the epoch_best layout
    assert all(torch.equal(a, b) for a, b in zip(loaded.parameters(), model.parameters()))


def test_keep_zero_keeps_every_snapshot_and_the_new_one_is_never_deleted(tmp_path, model):
    for step in (2, 4, 6):
        checkpointing.save_snapshot(model, tmp_path, step, LABELS, keep=0)
    assert checkpointing.snapshot_steps(tmp_path) == [2, 4, 6]
    # a stale snapshot of a later step (from before a resume) does not push out the one just written
    checkpointing.save_snapshot(model, tmp_path, 3, LABELS, keep=1)
    assert checkpointing.snapshot_steps(tmp_path) == [3]
    with pytest.raises(ValueError, match="snapshot_keep"):
        checkpointing.save_snapshot(model, tmp_path, 8, LABELS, keep=-1)


def test_a_failed_write_deletes_nothing(tmp_path, model, monkeypatch):
    for step in (1, 2):
        checkpointing.save_snapshot(
            model, tmp_path, step, LABELS, keep=2, save_balanced_state=write_balanced
        )
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def disk_full(path):
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        checkpointing.save_snapshot(
            model, tmp_path, 3, LABELS, keep=2, save_balanced_state=disk_full
        )
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert {k: v for k, v in after.items() if k in before} == before  # both old pairs intact
    assert "balanced_state_3.pth" not in after and not any(name.endswith(".tmp") for name in after)


def test_the_trainer_writes_snapshots_every_n_steps(tmp_path):
    balanced, adam = tmp_path / "phase1", tmp_path / "baseline"
    assert (
        train.main(cli_args(balanced, variant="phase1", steps=4, snapshot_every=2, snapshot_keep=1))
        == 0
    )
    assert names(balanced) == {
        "epoch_4.pth.tar",
        "balanced_state_4.pth",
        "epoch_best.pth.tar",
        "balanced_state_best.pth",
    }
    state = torch.load(balanced / "balanced_state_4.pth", map_location="cpu", weights_only=False)
    last = torch.load(
        balanced / checkpointing.CHECKPOINT_LAST, map_location="cpu", weights_only=False
    )
    assert torch.equal(
        state["balancing"]["w"], last["optimizer"]["balancing"]["w"]
    )  # the state at step 4
    exported = models.load_checkpoint(balanced / "epoch_4.pth.tar", name="HPCM_Tiny").state_dict()
    assert all(
        torch.equal(exported[k], v) for k, v in last["model"].items() if k.startswith("g_a.")
    )
    assert train.main(cli_args(adam, steps=3, snapshot_every=1)) == 0
    assert {n for n in names(adam) if n != "epoch_best.pth.tar"} == {
        f"epoch_{s}.pth.tar" for s in (1, 2, 3)
    }
