"""The small HPCM_Tiny run the training tests share (one definition)."""

from __future__ import annotations

import contextlib
import signal
from pathlib import Path

from hpcm.train import loop

TINY = {
    "model": "HPCM_Tiny",
    "patch_size": 64,
    "batch_size": 1,
    "num_workers": 0,
    "wandb_mode": "disabled",
    "quiet": True,
    "log_every": 1,
    "val_every": 1000,
    "checkpoint_every": 1000,
}


def cli_args(out: Path, **overrides) -> list[str]:
    """``python -m hpcm.train`` arguments: TINY plus ``overrides`` as ``--set`` items."""
    args = ["--output-dir", str(out)]
    for key, value in {**TINY, **overrides}.items():
        args += ["--set", f"{key}={value}"]
    return args


@contextlib.contextmanager
def before_each_step(hook):
    """Within: every ``Run.train_step(step, x)`` first calls ``hook(step, x)`` and trains on the
    batch it returns."""
    real_step = loop.Run.train_step

    def hooked(self, step, x):
        return real_step(self, step, hook(step, x))

    loop.Run.train_step = hooked
    try:
        yield
    finally:
        loop.Run.train_step = real_step


def sigterm_at_step(step: int):
    """Within: the trainer receives SIGTERM in the middle of ``step``, as SLURM would send it."""

    def signal_at(current, x):
        if current == step:
            signal.raise_signal(signal.SIGTERM)
        return x

    return before_each_step(signal_at)
