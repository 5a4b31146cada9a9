"""The small HPCM_Tiny run the training tests share (one definition)."""

from __future__ import annotations

from pathlib import Path

TINY = {
    "model": "HPCM_Tiny", "patch_size": 64, "batch_size": 1, "num_workers": 0, "wandb_mode": "disabled",
    "quiet": True, "log_every": 1, "val_every": 1000, "checkpoint_every": 1000,
}


def cli_args(out: Path, **overrides) -> list[str]:
    """``python -m hpcm.train`` arguments: TINY plus ``overrides`` as ``--set`` items."""
    args = ["--output-dir", str(out)]
    for key, value in {**TINY, **overrides}.items():
        args += ["--set", f"{key}={value}"]
    return args
