"""Training checkpoints that never lose work.

A run directory keeps two generations of the full training state: ``checkpoint_last.pth.tar``
(newest) and ``checkpoint_prev.pth.tar`` (the one before). Saving rotates last -> prev and then
writes the new last atomically (``hpcm.util.io``: temporary file, fsync, rename), so at every
instant at least one complete checkpoint exists. Resuming takes the newest checkpoint that loads and
carries the expected format tag; an unreadable newest one falls back to the previous with a warning
and is renamed aside to ``checkpoint_last.corrupt`` (so the next save cannot rotate it over the only
valid generation in ``checkpoint_prev``).

``epoch_best.pth.tar`` is different on purpose: a raw model state dict in the official HPCM layout
(what ``hpcm.evaluate`` and the official ``test.py`` load), with the entropy-coder tables built,
that says what it is: model, variant, lambda, seed and distortion ride in the state dict's
``_metadata``
(``hpcm.models.with_run_metadata``), where ``load_state_dict`` does not look, so ``hpcm.evaluate``
labels its rows from the checkpoint itself rather than from whatever ``run.yaml`` sits beside it.

Snapshots (run-config ``snapshot_every``, 0 = off) keep the seed's names: ``epoch_{N}.pth.tar`` (the
layout of ``epoch_best.pth.tar``) and, for the balanced optimizers, ``balanced_state_{N}.pth``. The
seed's N is its epoch (``epoch % 500 == 0``); this trainer counts every cadence in optimizer steps,
so here N is the step. ``snapshot_keep`` (0 = all) keeps the newest ones: older pairs are deleted
only after the new pair is written, so a crash while writing loses none of the kept snapshots.
"""

from __future__ import annotations

import copy
import os
import random
import re
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from hpcm import models
from hpcm.config import run_config
from hpcm.config.run_config import ConfigError, RunConfig
from hpcm.models.checkpoint import with_run_metadata
from hpcm.util.io import atomic_torch_save

CHECKPOINT_LAST = "checkpoint_last.pth.tar"
CHECKPOINT_PREV = "checkpoint_prev.pth.tar"
CHECKPOINT_CORRUPT = "checkpoint_last.corrupt"
BEST_MODEL = "epoch_best.pth.tar"
BEST_BALANCED_STATE = "balanced_state_best.pth"  # written by Balanced.save_state (save_best_model)
SNAPSHOT_MODEL = "epoch_{step}.pth.tar"  # the seed's names (its N is an epoch; here the step)
SNAPSHOT_BALANCED_STATE = "balanced_state_{step}.pth"
_SNAPSHOT_FILE = re.compile(r"(?:epoch_(\d+)\.pth\.tar|balanced_state_(\d+)\.pth)")
STATE_FORMAT = "hpcm-train-state/1"


class CheckpointCorruptError(RuntimeError):
    """Every checkpoint of a run directory is unreadable; the message names each file and why."""


def rng_state() -> dict[str, Any]:
    """Every random generator a training step may draw from."""
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's generators (model init, data order, noise)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def save_training_state(run_dir: str | Path, state: dict[str, Any]) -> Path:
    """Write ``state`` as the newest checkpoint, keeping the previous one as a fallback."""
    run_dir = Path(run_dir)
    last, prev = run_dir / CHECKPOINT_LAST, run_dir / CHECKPOINT_PREV
    if last.exists():
        os.replace(last, prev)  # atomic: a crash here leaves prev complete and no last
    atomic_torch_save({"format": STATE_FORMAT, **state}, last)
    return last


def _read_state(path: Path, map_location: Any) -> dict[str, Any]:
    # weights_only=False: the file holds our own RNG states and config (python objects), not foreign
    # data.
    state = torch.load(path, map_location=map_location, weights_only=False)
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"not a training checkpoint of format {STATE_FORMAT!r} (found {found!r})")
    for key in ("step", "model", "optimizer", "config"):
        if key not in state:
            raise ValueError(f"training checkpoint lacks {key!r}")
    return state


def model_weights_of_training_state(path: str | Path) -> dict[str, torch.Tensor] | None:
    """The model state dict inside a training checkpoint of this project, or None for any other
    file."""
    try:
        return _read_state(Path(path), "cpu")["model"]
    except Exception:  # not ours (or unreadable): the caller reports its own error
        return None


def load_initial_model(path: str, name: str) -> torch.nn.Module:
    """Weights to fine-tune from: official raw state dicts, epoch_best files, or a training
    checkpoint of this project."""
    try:
        return models.load_checkpoint(path, name=name)
    except models.CheckpointError:
        weights = model_weights_of_training_state(path)
        if weights is None:
            raise
        model = models.build_model(name)
        for key, param in model.named_parameters():  # name the first misfit, not a page of keys
            if key not in weights or weights[key].shape != param.shape:
                found = tuple(weights[key].shape) if key in weights else "missing"
                raise models.CheckpointError(
                    f"{path} does not fit {name}: parameter {key!r} is {found}, "
                    f"the model expects {tuple(param.shape)}"
                ) from None
        model.load_state_dict(weights)
        return model


def load_latest_state(run_dir: str | Path, map_location: Any = "cpu") -> dict[str, Any] | None:
    """The newest valid training state in ``run_dir``, or None when there is none at all.

    Corrupt candidates are reported with a warning; if every candidate is corrupt, raise
    CheckpointCorruptError (a RuntimeError) rather than silently starting over (that would overwrite
    the work the files stand for).
    """
    run_dir = Path(run_dir)
    candidates = [run_dir / CHECKPOINT_LAST, run_dir / CHECKPOINT_PREV]
    present = [p for p in candidates if p.exists()]
    if not present:
        return None
    loaded, problems = [], []
    for path in present:
        try:
            loaded.append((path, _read_state(path, map_location)))
        except (
            Exception
        ) as exc:  # any failure to unpickle means "corrupt", whatever its exception type
            problems.append(f"{path}: {type(exc).__name__}: {exc}")
    if not loaded:
        raise CheckpointCorruptError(
            "no readable training checkpoint in {}:\n  {}\nmove the files aside "
            "to start over".format(run_dir, "\n  ".join(problems))
        )
    path, state = max(loaded, key=lambda item: item[1]["step"])
    if problems:
        moved = ""
        last = run_dir / CHECKPOINT_LAST
        if last.exists() and all(p != last for p, _ in loaded):
            # The next save rotates last -> prev: a corrupt last must not replace the valid prev.
            os.replace(last, run_dir / CHECKPOINT_CORRUPT)
            moved = f"\nmoved the unreadable {last.name} aside to {CHECKPOINT_CORRUPT}"
        warnings.warn(
            "ignoring unreadable checkpoint(s):\n  {}\nresuming from {} (step {}){}".format(
                "\n  ".join(problems), path, state["step"], moved
            ),
            stacklevel=2,
        )
    state["_path"] = str(path)
    return state


def state_to_resume(
    run_dir: Path, cfg: RunConfig, total_steps: int, train_images: int
) -> dict[str, Any] | None:
    """The newest training state of ``run_dir`` (None for a fresh run), once it is known to continue
    the same experiment: a changed experiment key or run length raises ConfigError."""
    state = load_latest_state(run_dir, map_location="cpu")
    if state is None:
        return None
    problem = run_config.resume_mismatch(state["config"], cfg)
    if problem:
        raise ConfigError(problem)
    if state["total_steps"] != total_steps:
        raise ConfigError(
            f"the run length changed from {state['total_steps']} steps (checkpoint) to "
            f"{total_steps} (epochs = {cfg.epochs!r} over {train_images} training images); "
            "restore the data or use a new output directory"
        )
    return state


def finished_run_config(run_dir: Path) -> dict[str, Any]:
    """The config a finished run trained with: its checkpoint's, else its run.yaml's."""
    state = load_latest_state(run_dir, map_location="cpu")
    if state is not None:
        return state["config"]
    saved = run_config.read_run_yaml(run_dir)
    saved.pop("meta", None)
    return saved


def coder_ready_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """CPU state dict of a copy of ``model`` with its entropy-coder tables built
    (``update(force=True)``).

    A copy, so the training model (and its RNG use, device and mode) is untouched.
    """
    export = copy.deepcopy(model).to("cpu").eval()
    export.update(force=True)
    return export.state_dict()  # the copy is discarded, so its tensors need no second copy


def run_labels(cfg: RunConfig) -> dict[str, Any]:
    """What a run's best model is, from its run config: model, variant, lambda, seed, distortion
    (``hpcm.models.check`` tells an MSE from an MS-SSIM model by the last)."""
    return {
        "model": str(cfg.model),
        "variant": str(cfg.variant),
        "lmbda": float(cfg.lmbda),
        "seed": int(cfg.seed),
        "distortion": str(cfg.distortion),
    }


def save_model_export(model: torch.nn.Module, path: str | Path, labels: dict[str, Any]) -> Path:
    """The official raw layout, coder tables built, ``labels`` in its metadata (what hpcm.evaluate
    loads)."""
    atomic_torch_save(with_run_metadata(coder_ready_state_dict(model), **labels), path)
    return Path(path)


def save_best_model(
    model: torch.nn.Module,
    run_dir: str | Path,
    labels: dict[str, Any],
    save_balanced_state: Callable[[Path], None] | None = None,
) -> Path:
    """``epoch_best.pth.tar`` (``save_model_export``), and for the balanced optimizers the seed's
    ``balanced_state_best.pth`` (``save_balanced_state``, their atomic ``save_state``)."""
    path = save_model_export(model, Path(run_dir) / BEST_MODEL, labels)
    if save_balanced_state is not None:
        save_balanced_state(Path(run_dir) / BEST_BALANCED_STATE)
    return path


def snapshot_steps(run_dir: str | Path) -> list[int]:
    """The steps of the snapshot files in ``run_dir`` (a model file, a balanced state or both),
    ascending."""
    steps = set()
    for path in Path(run_dir).iterdir():
        match = _SNAPSHOT_FILE.fullmatch(path.name)
        if match:
            steps.add(int(match.group(1) or match.group(2)))
    return sorted(steps)


def save_snapshot(
    model: torch.nn.Module,
    run_dir: str | Path,
    step: int,
    labels: dict[str, Any],
    keep: int,
    save_balanced_state: Callable[[Path], None] | None = None,
) -> Path:
    """Write ``epoch_{step}.pth.tar`` (+ ``balanced_state_{step}.pth``), then keep the newest
    ``keep`` (0 = all).

    Every file is written atomically; older snapshots are deleted only after the new one is
    complete.
    """
    if keep < 0:
        raise ValueError(f"snapshot_keep = {keep!r}: must be >= 0 (0 keeps every snapshot)")
    run_dir = Path(run_dir)
    path = save_model_export(model, run_dir / SNAPSHOT_MODEL.format(step=step), labels)
    if save_balanced_state is not None:
        save_balanced_state(run_dir / SNAPSHOT_BALANCED_STATE.format(step=step))
    if keep:
        others = [s for s in snapshot_steps(run_dir) if s != step]  # the new one is always kept
        for old in others[: max(len(others) - (keep - 1), 0)]:
            for name in (SNAPSHOT_MODEL, SNAPSHOT_BALANCED_STATE):
                (run_dir / name.format(step=old)).unlink(missing_ok=True)
    return path
