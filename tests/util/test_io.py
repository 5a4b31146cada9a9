"""hpcm.util.io: a failed write leaves the previous file untouched and no temporary behind."""

import os
import stat

import pytest
import torch

from hpcm.util.io import atomic_open, atomic_torch_save, atomic_write_text


def test_successful_write_replaces_content(tmp_path):
    target = tmp_path / "sub" / "file.txt"
    atomic_write_text(target, "first")
    atomic_write_text(target, "second")
    assert target.read_text() == "second"
    assert sorted(p.name for p in target.parent.iterdir()) == ["file.txt"]


def test_failed_write_keeps_previous_content_and_cleans_up(tmp_path):
    target = tmp_path / "ckpt.pth.tar"
    atomic_torch_save({"step": 1}, target)
    with pytest.raises(RuntimeError, match="writer died"):
        with atomic_open(target, "wb") as handle:
            handle.write(b"partial garbage")
            raise RuntimeError("writer died")
    assert torch.load(target) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pth.tar"]


def test_rejects_append_mode(tmp_path):
    with pytest.raises(ValueError, match="'a'"):
        with atomic_open(tmp_path / "x", "a"):
            pass


def test_written_files_get_the_mode_open_would_give_them(tmp_path):
    """mkstemp's 0o600 must not leak into results (a lab shares them through group permissions)."""
    previous = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        plain = tmp_path / "b.txt"
        plain.write_text("x")
    finally:
        os.umask(previous)
    assert (
        stat.S_IMODE((tmp_path / "a.txt").stat().st_mode)
        == stat.S_IMODE(plain.stat().st_mode)
        == 0o644
    )
