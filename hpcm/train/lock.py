"""One writer per run folder: an OS lock that dies with its process.

``hold_run_folder(run_dir)`` takes ``fcntl.flock(LOCK_EX | LOCK_NB)`` on ``<run_dir>/.lock`` and
keeps it until the ``with`` block ends. A second trainer on the same folder (same or another
config) fails at once with :class:`RunFolderLocked`, naming the holder (pid, host, start time,
written into the lock file). The kernel drops the lock when the holder's file descriptor closes,
i.e. also when the process is killed (``kill -9``, OOM, SLURM timeout): a stale lock cannot
exist, and the lock file staying behind is harmless (its content only describes the last holder).

Where the lock holds:

* local filesystems (ext4, xfs, btrfs, tmpfs): always;
* NFS: Linux emulates ``flock`` with NFS byte-range locks (NLM for v3, built in for v4), so the
  lock holds across hosts when the server supports locking. A client mounted with ``nolock`` (or
  ``local_lock=flock``/``all``) keeps the lock local to that host: two hosts can then both train in
  one folder. Lustre needs the ``flock`` mount option (``localflock`` is node-local, ``noflock``
  fails); BeeGFS needs ``tuneUseGlobalFileLocks``; GPFS and CephFS hold across nodes.
  Where the filesystem refuses locks (``ENOLCK``/``ENOSYS``/``EOPNOTSUPP``) this module raises
  :class:`RunLockUnsupported` rather than training unguarded: put the run folders on a filesystem
  with working locks (or ask the administrators for the mount option above). A node-local lock
  cannot be detected from inside; with Snakemake every run folder belongs to one job, so only a
  manual second launch on another node would slip through.

DDP: all ranks of one training job write one run folder, so they share one lock. Rank 0 takes it
(``rank=0``, the default); the other ranks pass their rank and hold nothing (``rank > 0`` is a
no-op). They must not touch the folder before rank 0 holds the lock:
``hold_run_folder_for_all_ranks`` (what ``hpcm.train.loop.run_training`` uses) takes the lock on
rank 0 first and then broadcasts rank 0's outcome (``Processes.from_rank0``), so that all ranks
stop together when it failed.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, Iterator

LOCK_FILE = ".lock"
_UNSUPPORTED = {errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL}


class RunFolderUnavailable(RuntimeError):
    """The run folder cannot be held: locked by another process, or no working ``flock``."""


class RunFolderLocked(RunFolderUnavailable):
    """Another live process holds the run folder's lock."""


class RunLockUnsupported(RunFolderUnavailable):
    """The filesystem of the run folder does not support ``flock``."""


def _holder(path: Path) -> str:
    try:
        text = path.read_text().strip()
    except OSError:
        text = ""
    return text or "another process (no holder recorded yet)"


@contextmanager
def hold_run_folder(run_dir: str | Path, rank: int = 0) -> Iterator[Path | None]:
    """Hold the exclusive lock of ``run_dir`` (created if missing) for the ``with`` block.

    Yields the lock file's path (None on ranks > 0, which hold nothing: see the module docstring).
    Raises RunFolderLocked while another process holds it, RunLockUnsupported where the
    filesystem has no working ``flock``.
    """
    if rank < 0:
        raise ValueError(f"rank must be >= 0, got {rank}")
    if rank > 0:  # rank 0 of the same job holds the folder for every rank
        yield None
        return
    run_dir = Path(run_dir)
    path = run_dir / LOCK_FILE
    # O_RDWR without O_TRUNC: the current holder's description must survive a failed attempt.
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunFolderLocked(
                f"{run_dir} is in use by {_holder(path)}; wait for that run to end (or stop it), "
                "or use another output directory. The lock ends with its process, so no file "
                "needs removing"
            ) from None
        except OSError as exc:
            if exc.errno in _UNSUPPORTED:
                raise RunLockUnsupported(
                    f"{run_dir}: the filesystem does not support file locks "
                    f"({os.strerror(exc.errno)}); two trainers could then write one run folder. "
                    "Use a run folder on a filesystem with working flock (see hpcm/train/lock.py "
                    "for NFS/Lustre/BeeGFS mount options)"
                ) from None
            raise
        os.ftruncate(fd, 0)
        stamp = time.strftime("%Y-%m-%d %H:%M:%S %Z")
        os.write(fd, f"pid {os.getpid()} on host {socket.gethostname()} since {stamp}\n".encode())
        try:
            yield path
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


@contextmanager
def hold_run_folder_for_all_ranks(run_dir: str | Path, processes: Any) -> Iterator[None]:
    """``hold_run_folder`` for a run of one or more processes (``processes``: a
    ``hpcm.train.distributed.Processes``): rank 0 takes the lock, and every rank raises
    RunFolderUnavailable with rank 0's reason when it could not, so all stop before any work."""
    with ExitStack() as held:
        problem = None
        try:
            held.enter_context(hold_run_folder(run_dir, rank=processes.rank))
        except RunFolderUnavailable as exc:
            problem = str(exc)
        problem = processes.from_rank0(problem)
        if problem:
            raise RunFolderUnavailable(problem)
        yield
