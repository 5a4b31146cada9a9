"""Training logs: ``metrics.csv`` (always), wandb (offline by default, online when configured), and
``run.yaml`` (``write_run_yaml``: the resolved run config and a ``meta`` block).

metrics.csv has one fixed header for every variant (cells that do not apply stay empty), so the
analysis code reads all runs alike. A resumed run first drops the rows logged after its checkpoint
(they will be logged again), then appends.

wandb keys are the seed trainers' names (``WANDB_KEYS``: wandb key -> metrics.csv column), so a
row is logged under ``train/loss``, ``train/mse_loss``, ``test/y_bpp``, ``weights/s1_distortion``,
``gamma/s1``, ``scale_contrib/s1``, ... while metrics.csv keeps its own column names. Runs are
grouped by variant and named by lambda. This module never reads, stores or prints the API key;
wandb finds it itself (``WANDB_API_KEY`` or netrc).
"""

from __future__ import annotations

import csv
import io
import math
import secrets
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
import yaml

import hpcm
from hpcm.config.run_config import RUN_YAML, RunConfig
from hpcm.config.tasks import SCALES, SEED_TASK_NAMES
from hpcm.util.io import atomic_write_text

METRIC_COLUMNS = (
    # loss: mean over the logging window; loss_std (ddof=0) and loss_steps describe that window's
    # per-step losses, so the stability table can pool the per-step spread exactly.
    "step",
    "epoch",
    "lr",
    "loss",
    "loss_std",
    "loss_steps",
    "distortion",
    "bpp",
    "y_bpp",
    "z_bpp",
    "mse",
    "psnr",
    "val_loss",
    "val_distortion",
    "val_bpp",
    "val_psnr",
    "val_mse",
    "val_y_bpp",
    "val_z_bpp",
    "task_weight_distortion",
    "task_weight_bpp",
    *(f"task_weight_{t}" for t in SEED_TASK_NAMES),
    "gamma",
    *(f"gamma_{s}" for s in SCALES),
    *SEED_TASK_NAMES,
    *(f"scale_contribution_{s}" for s in SCALES),
    "skipped_steps",
    "step_time",
    # Phase 4 (hpcm.train.phase4): the parameter groups updating at the step and their size; the
    # validation y rate of each scale's elements (every run)
    "trainable_groups",
    "trainable_params",
    *(f"val_{s}_bpp" for s in SCALES),
)

# wandb key -> metrics.csv column. The names are the seed trainers' (yutendo0714/LIC-HPCM-Balanced):
# phase1/train.py and phase2/train.py log epoch, train/* and test/* (+ train/gamma in phase 2);
# phase3/train.py logs train/s*_*, weights/<task>, scale_contrib/<scale>, gamma/<scale>, test/bpp.
# The last three keys are this trainer's own.
WANDB_KEYS: dict[str, str] = {
    "epoch": "epoch",
    "train/loss": "loss",
    "train/distortion": "distortion",
    "train/bpp_loss": "bpp",
    "train/mse_loss": "mse",
    "train/psnr": "psnr",
    "train/y_bpp": "y_bpp",
    "train/z_bpp": "z_bpp",
    "train/lr": "lr",
    "train/task_weight_distortion": "task_weight_distortion",
    "train/task_weight_bpp": "task_weight_bpp",
    "train/gamma": "gamma",
    **{f"train/{task}": task for task in SEED_TASK_NAMES},
    **{f"weights/{task}": f"task_weight_{task}" for task in SEED_TASK_NAMES},
    **{f"scale_contrib/{scale}": f"scale_contribution_{scale}" for scale in SCALES},
    **{f"gamma/{scale}": f"gamma_{scale}" for scale in SCALES},
    "test/loss": "val_loss",
    "test/distortion": "val_distortion",
    "test/mse_loss": "val_mse",
    "test/bpp_loss": "val_bpp",
    "test/bpp": "val_bpp",
    "test/psnr": "val_psnr",
    "test/y_bpp": "val_y_bpp",
    "test/z_bpp": "val_z_bpp",
    "train/loss_std": "loss_std",
    "train/skipped_steps": "skipped_steps",
    "train/step_time": "step_time",
    "phase4/trainable_groups": "trainable_groups",
    "phase4/trainable_params": "trainable_params",
    **{f"test/{scale}_y_bpp": f"val_{scale}_bpp" for scale in SCALES},
}


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else str(value)
    return str(value)


class MetricsCSV:
    """Append-only metrics table that survives crashes and resumes without duplicate rows."""

    def __init__(self, path: str | Path, resume_step: int = 0):
        self.path = Path(path)
        kept: list[dict[str, str]] = []
        if self.path.exists() and resume_step > 0:
            kept = [row for row in self._read_rows() if int(row["step"]) <= resume_step]
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=METRIC_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(kept)
        atomic_write_text(self.path, buffer.getvalue())
        self._handle = open(self.path, "a", newline="")
        self._writer = csv.DictWriter(self._handle, fieldnames=METRIC_COLUMNS, lineterminator="\n")

    def _read_rows(self) -> list[dict[str, str]]:
        rows = []
        with open(self.path, newline="") as handle:
            reader = csv.DictReader(handle)
            if reader.fieldnames is None or not set(reader.fieldnames) <= set(METRIC_COLUMNS):
                return []  # a foreign or empty file: start the table afresh
            # (a header with fewer columns is this table before columns were added: its cells are
            # kept)
            for row in reader:
                # a line cut by a crash has missing cells (None) or a non-integer step: drop it
                if None in row.values() or not (row.get("step") or "").isdigit():
                    continue
                rows.append(row)
        return rows

    def write(self, row: dict[str, Any]) -> None:
        unknown = set(row) - set(METRIC_COLUMNS)
        if unknown:
            raise KeyError(f"metrics.csv has no column(s) {sorted(unknown)}")
        self._writer.writerow({k: _cell(row.get(k)) for k in METRIC_COLUMNS})
        self._handle.flush()

    def close(self) -> None:
        self._handle.close()


def wandb_payload(row: dict[str, Any]) -> dict[str, Any]:
    """A metrics row under the seed's wandb keys (``WANDB_KEYS``); empty cells are left out."""
    return {key: row[column] for key, column in WANDB_KEYS.items() if row.get(column) is not None}


class WandbLogger:
    """Thin wandb wrapper; ``mode='disabled'`` never imports wandb (tests, minimal installs)."""

    def __init__(self, cfg: RunConfig, run_dir: Path, resolved_config: dict[str, Any]):
        self.run = None
        if cfg.wandb_mode == "disabled":
            return
        import wandb  # why: slow to import (seconds); runs with wandb_mode disabled never need it

        id_file = run_dir / "wandb_run_id"
        if id_file.exists():
            run_id = id_file.read_text().strip()
        else:
            run_id = secrets.token_hex(8)  # wandb run ids: lowercase letters and digits
            atomic_write_text(id_file, run_id + "\n")
        self.run = wandb.init(
            mode=cfg.wandb_mode,
            project=cfg.wandb_project,
            entity=cfg.wandb_entity,
            group=cfg.variant,
            name=f"lmbda{cfg.lmbda}",
            id=run_id,
            resume="allow",
            dir=str(run_dir),
            config=resolved_config,
            settings=wandb.Settings(silent=bool(cfg.quiet), console="off"),
        )

    def log(self, row: dict[str, Any], step: int) -> None:
        if self.run is not None:
            self.run.log(wandb_payload(row), step=step)

    def finish(self, exit_code: int = 0) -> None:
        if self.run is not None:
            self.run.finish(exit_code=exit_code)
            self.run = None


def log_line(row: dict[str, Any], total_steps: int) -> str:
    """One compact line per logged step for quiet (cluster) mode."""
    parts = [f"step {row['step']}/{total_steps}"]
    for column, fmt in (
        ("loss", ".4f"),
        ("bpp", ".4f"),
        ("psnr", ".2f"),
        ("lr", ".2e"),
        ("val_loss", ".4f"),
        ("val_bpp", ".4f"),
        ("val_psnr", ".2f"),
        ("skipped_steps", "d"),
        ("step_time", ".3f"),
    ):
        value = row.get(column)
        if value is not None:
            parts.append(f"{column} {value:{fmt}}")
    return " | ".join(parts)


def print_err(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def write_run_yaml(
    run_dir: Path,
    cfg: RunConfig,
    *,
    device: str,
    total_steps: int,
    steps_per_epoch: int,
    train_images: int,
    val_images: int,
    resumed_from_step: int,
    world_size: int,
) -> None:
    """``run_dir/run.yaml``: the resolved config (a valid run config itself) and a ``meta`` block of
    versions, commit, command and the run's sizes."""
    meta = {
        "hpcm_version": hpcm.__version__,
        "git_commit": git_commit(Path(__file__).resolve().parent),
        "torch_version": str(torch.__version__),
        "device": device,
        "total_steps": total_steps,
        "steps_per_epoch": steps_per_epoch,
        "train_images": train_images,
        "val_images": val_images,
        "resumed_from_step": resumed_from_step,
        "command": " ".join(sys.argv),
        "world_size": world_size,
    }
    text = yaml.safe_dump({**cfg.as_dict(), "meta": meta}, sort_keys=False)
    atomic_write_text(run_dir / RUN_YAML, text)


def git_commit(path: str | Path) -> str:
    """The commit of the repository holding ``path`` (with ``-dirty``), or 'unknown' outside git."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=path,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=path,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit + ("-dirty" if dirty else "")
