"""Atomic file writes: a reader (or a resumed run) never sees a half-written file.

Every writer goes through a temporary file in the destination directory, flushes and fsyncs it,
then renames it over the target (``os.replace`` is atomic on POSIX when both paths share a
filesystem), and finally fsyncs the directory so the rename itself survives a crash.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator


def _default_file_mode() -> int:
    """The mode ``open()`` would give a new file (0o666 minus the umask). mkstemp makes its files
    0o600, which would hide a lab's shared results from the other members of its group."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # some filesystems do not allow opening directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[io.IOBase]:
    """Open a temporary sibling of ``path`` for writing; it replaces ``path`` only on success."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open supports modes 'w' and 'wb', got {mode!r}")
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        os.fchmod(fd, _default_file_mode())
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    _fsync_dir(target.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_open(path, "wb") as handle:
        handle.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_open(path, "w") as handle:
        handle.write(text)


def atomic_save(path: str | os.PathLike, writer: Callable[[Any], None]) -> None:
    """Run ``writer(file_handle)`` against a temporary file, then move it into place."""
    with atomic_open(path, "wb") as handle:
        writer(handle)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` that never leaves a truncated checkpoint behind."""
    import torch  # why: keeps hpcm.util.io free of torch for the callers that write text only

    atomic_save(path, lambda handle: torch.save(obj, handle))


def sha256_file(path: str | os.PathLike) -> str:
    """SHA-256 hex digest of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
