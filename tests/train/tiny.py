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
def sigterm_at_step(step: int):
    """Within: the trainer receives SIGTERM in the middle of ``step``, as SLURM would send it."""
    real_step = loop.Run.train_step

    def interrupted(self, current, x):
        if current == step:
            signal.raise_signal(signal.SIGTERM)
        return real_step(self, current, x)

    loop.Run.train_step = interrupted
    try:
        yield
    finally:
        loop.Run.train_step = real_step
