"""The run folder guarded: one writer (an flock that dies with its process), a finished run checks
its config, arguments and messages that point at the fix (issue 10, points 1, 2, 6, 7)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from hpcm.train import checkpoints as checkpointing
from hpcm.train import lock
from hpcm.train import loop as train
from tests.paths import REPO
from tests.train.tiny import cli_args

HOLDER = """
import sys, time
from hpcm.train.lock import hold_run_folder
with hold_run_folder(sys.argv[1]):
    print("held", flush=True)
    time.sleep(120)
"""


def start_holder(run_dir: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(run_dir)], stdout=subprocess.PIPE, env=env, text=True
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_process_is_refused_and_a_killed_holder_leaves_no_stale_lock(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    holder = start_holder(run_dir)
    try:
        with pytest.raises(lock.RunFolderLocked, match=rf"pid {holder.pid} on host"):
            with lock.hold_run_folder(run_dir):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with lock.hold_run_folder(run_dir) as path:  # the kernel dropped the killed holder's lock
        assert path == run_dir / lock.LOCK_FILE and f"pid {os.getpid()}" in path.read_text()


def test_ranks_above_zero_share_rank_zeros_lock(tmp_path):
    with lock.hold_run_folder(tmp_path, rank=0):
        with lock.hold_run_folder(tmp_path, rank=1) as held:
            assert held is None  # rank 1 holds nothing and is not refused
        with pytest.raises(lock.RunFolderLocked):  # a second job's rank 0 is
            with lock.hold_run_folder(tmp_path, rank=0):
                pass


def test_unsupported_filesystem_is_an_error_not_an_unguarded_run(tmp_path, monkeypatch):
    def no_locks(fd, operation):
        raise OSError(38, os.strerror(38))  # ENOSYS, as on a Lustre client mounted noflock

    monkeypatch.setattr(lock.fcntl, "flock", no_locks)
    with pytest.raises(lock.RunLockUnsupported, match="does not support file locks"):
        with lock.hold_run_folder(tmp_path):
            pass


def test_trainer_refuses_a_folder_another_trainer_holds(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    with lock.hold_run_folder(out):  # flock is per open file: this process's trainer is refused too
        assert train.main(cli_args(out, steps=1)) == train.EXIT_CONFIG
    err = capsys.readouterr().err
    assert f"{out} is in use by pid {os.getpid()}" in err and "Traceback" not in err
    assert not (out / "done").exists() and not (out / checkpointing.CHECKPOINT_LAST).exists()


def test_two_trainers_on_one_folder_one_is_refused(tmp_path):
    """The reported case: two `python -m hpcm.train` on one folder used to both exit 0."""
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "hpcm.train"]
    first = subprocess.Popen(
        cmd + cli_args(out, steps=400, lmbda=0.0067), env=env, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 120
        while not (out / lock.LOCK_FILE).exists() or not (out / lock.LOCK_FILE).read_text():
            assert first.poll() is None and time.monotonic() < deadline, (
                first.stderr.read() if first.poll() else ""
            )
            time.sleep(0.05)
        second = subprocess.run(
            cmd + cli_args(out, steps=1, lmbda=0.013),
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert second.returncode == train.EXIT_CONFIG, second.stderr
        assert f"in use by pid {first.pid}" in second.stderr
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()


def test_finished_run_with_a_changed_experiment_key_is_an_error(tmp_path, capsys):
    out = tmp_path / "run"
    assert train.main(cli_args(out, steps=1)) == train.EXIT_OK
    capsys.readouterr()
    assert train.main(cli_args(out, steps=1)) == train.EXIT_OK  # same config: nothing to do
    assert "nothing to do" in capsys.readouterr().err
    assert train.main(cli_args(out, steps=1, lmbda=0.0483)) == train.EXIT_CONFIG
    assert "'lmbda' changed from 0.013" in capsys.readouterr().err
    assert train.main(cli_args(out, steps=8)) == train.EXIT_CONFIG
    assert "'steps' changed from 1" in capsys.readouterr().err
    # runtime keys (how, not what) may change: still a no-op
    assert train.main(cli_args(out, steps=1, log_every=5)) == train.EXIT_OK


def test_finished_run_without_checkpoints_compares_its_run_yaml(tmp_path, capsys):
    out = tmp_path / "run"
    assert train.main(cli_args(out, steps=1)) == train.EXIT_OK
    for name in (checkpointing.CHECKPOINT_LAST, checkpointing.CHECKPOINT_PREV):
        (out / name).unlink(missing_ok=True)
    assert train.main(cli_args(out, steps=1, lmbda=0.0483)) == train.EXIT_CONFIG
    assert "'lmbda' changed from 0.013" in capsys.readouterr().err


def test_output_dir_that_is_a_file_is_a_clear_error(tmp_path, capsys):
    out = tmp_path / "run"
    out.write_text("not a folder")
    assert train.main(cli_args(out, steps=1)) == train.EXIT_CONFIG
    err = capsys.readouterr().err
    assert f"--output-dir {out} is a file" in err and "Traceback" not in err


def test_bad_image_before_any_checkpoint_does_not_promise_a_resume(tmp_path, monkeypatch, capsys):
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    for k in range(2):
        Image.fromarray((torch.rand(72, 80, 3) * 255).byte().numpy()).save(folder / f"img{k}.png")
    real_open = train.Run.open_data

    def open_then_break(self):  # the images pass the scan, then go bad before step 1
        real_open(self)
        for path in folder.iterdir():
            path.write_bytes(b"\x89PNG garbage")

    monkeypatch.setattr(train.Run, "open_data", open_then_break)
    out = tmp_path / "run"
    assert train.main(cli_args(out, steps=4, train_data=str(folder))) == train.EXIT_CONFIG
    err = capsys.readouterr().err
    assert "nothing was saved" in err and "resume" not in err
    assert not (out / checkpointing.CHECKPOINT_LAST).exists()
