"""Load HPCM weights from official checkpoints and from the project's own files.

Accepted layouts:
* the official raw state dict (``torch.save(net.state_dict())``), possibly with ``module.``
  prefixes (DataParallel) or ``_orig_mod.`` (torch.compile);
* official releases from before commit bfd3514 (2026-01-16), whose ten ``adaptive_params_list``
  vectors were never registered: they stay at one, exactly the behaviour those weights were
  trained with, and a warning says so;
* a dict holding the state dict under ``state_dict`` / ``model`` / ``model_state_dict`` / ``net``,
  optionally with ``model_name`` and ``model_config`` (what :func:`save_checkpoint` writes).

Settings that change no tensor shape (``attn_windows``, ``attn_heads``) cannot
be recovered from the weights. Only :func:`save_checkpoint` files carry them; for any other file
whose architecture is inferred from shapes a warning says that the preset defaults are assumed.

Run labels: a checkpoint may say what it is (``model``, ``variant``, ``lmbda``, ``seed``,
``distortion``). In the
official raw layout they sit in the state dict's own ``_metadata`` (under :data:`RUN_METADATA_KEY`),
which ``torch.save``/``torch.load(weights_only=True)`` keep and ``nn.Module.load_state_dict``
ignores, so the official ``test.py`` still loads the file; in the dict layout they are the ``run``
entry. :func:`with_run_metadata` adds them, :func:`load_checkpoint_and_metadata` returns them.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from typing import Any, Mapping

import torch
from torch import Tensor

from hpcm.models.coder import CODER_BUFFER_NAMES
from hpcm.models.hpcm import HPCM
from hpcm.models.presets import PRESETS, HPCMConfig, preset_config
from hpcm.util.io import atomic_torch_save

STATE_DICT_KEYS = ("state_dict", "model", "model_state_dict", "net")
PREFIXES = ("module.", "_orig_mod.")
ADAPTIVE_PREFIX = "adaptive_params_list."


RUN_METADATA_KEY = "__hpcm_run__"  # not a module path: load_state_dict never looks it up
RUN_LABELS = ("model", "variant", "lmbda", "seed", "distortion")


class CheckpointError(ValueError):
    """A checkpoint that does not fit the requested architecture or cannot be read."""


class CheckpointUnreadableError(CheckpointError):
    """The file is not a readable torch checkpoint (truncated, empty, another format)."""


def with_run_metadata(state_dict: dict[str, Tensor], **labels: Any) -> dict[str, Tensor]:
    """``state_dict`` (an official-layout mapping, changed in place) carrying the run's labels."""
    unknown = set(labels) - set(RUN_LABELS)
    if unknown:
        raise ValueError(f"unknown run label(s) {sorted(unknown)}; known: {RUN_LABELS}")
    metadata = getattr(state_dict, "_metadata", None)
    if metadata is None:
        metadata = {}
    metadata = type(metadata)(metadata)  # never share the module's own metadata object
    metadata[RUN_METADATA_KEY] = dict(labels)
    state_dict._metadata = metadata  # type: ignore[attr-defined]
    return state_dict


def _run_metadata(obj: Any) -> dict[str, Any]:
    """The run labels a loaded file carries ({} for official releases and other files)."""
    if isinstance(obj, Mapping) and isinstance(obj.get("run"), Mapping):
        return dict(obj["run"])
    labels = (getattr(obj, "_metadata", None) or {}).get(RUN_METADATA_KEY)
    return dict(labels) if isinstance(labels, Mapping) else {}


def _strip_prefixes(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    out = {}
    for key, value in state.items():
        changed = True
        while changed:
            changed = False
            for prefix in PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix) :], True
        out[key] = value
    return out


def _split_checkpoint(obj: Any, path: str) -> tuple[dict[str, Tensor], str | None, dict | None]:
    """(state_dict, model_name or None, model_config dict or None) of a loaded file."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"{path}: expected a state dict or a dict holding one, got {type(obj).__name__}"
        )
    if obj and all(torch.is_tensor(v) for v in obj.values()):
        return _strip_prefixes(obj), None, None
    for key in STATE_DICT_KEYS:
        if isinstance(obj.get(key), Mapping):
            name = obj.get("model_name")
            config = obj.get("model_config")
            return _strip_prefixes(obj[key]), name if isinstance(name, str) else None, config
    raise CheckpointError(
        f"{path}: no state dict found (not a tensor mapping, and none of the keys "
        f"{STATE_DICT_KEYS})"
    )


def _expected_shapes(config: HPCMConfig) -> dict[str, tuple[int, ...]]:
    """Parameter/buffer shapes of a model of ``config`` (built on the meta device: no memory)."""
    with torch.device("meta"):
        model = HPCM(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if k not in CODER_BUFFER_NAMES}


def first_mismatch(expected: Mapping[str, tuple], state: Mapping[str, Tensor]) -> str | None:
    """Message about the first key (in model order, then file order) that does not fit; None if all
    fit.

    Missing ``adaptive_params_list.*`` keys are tolerated (legacy releases).
    """
    for key, shape in expected.items():
        if key not in state:
            if key.startswith(ADAPTIVE_PREFIX):
                continue
            return f"key {key!r} is missing from the checkpoint"
        if tuple(state[key].shape) != shape:
            return (
                f"key {key!r} has shape {tuple(state[key].shape)} in the checkpoint, the model "
                f"expects {shape}"
            )
    for key in state:
        if key not in expected and key not in CODER_BUFFER_NAMES:
            return f"key {key!r} in the checkpoint does not exist in the model"
    return None


def infer_model_name(state: Mapping[str, Tensor]) -> str:
    """The preset whose parameter shapes match ``state`` exactly."""
    reasons = {}
    for name in PRESETS:
        reason = first_mismatch(_expected_shapes(PRESETS[name]), state)
        if reason is None:
            return name
        reasons[name] = reason
    detail = "; ".join(f"{n}: {r}" for n, r in reasons.items())
    raise CheckpointError(f"the weights match no known architecture ({detail})")


def load_checkpoint(path: str | os.PathLike, name: str | None = None, map_location="cpu") -> HPCM:
    """Build the model of ``name`` (inferred when None) and load the weights in ``path``."""
    return load_checkpoint_and_metadata(path, name, map_location)[0]


def load_checkpoint_and_metadata(
    path: str | os.PathLike, name: str | None = None, map_location="cpu"
) -> tuple[HPCM, dict[str, Any]]:
    """:func:`load_checkpoint` and the run labels stored in the file ({} when it has none)."""
    path = os.fspath(path)
    if name is not None:
        preset_config(name)  # unknown name -> ValueError listing the valid ones, before any I/O
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # unreadable, truncated or not a torch file
        size = os.path.getsize(path)
        what = "is empty (0 bytes)" if size == 0 else f"is unreadable or truncated ({size} bytes)"
        raise CheckpointUnreadableError(
            f"{path} {what}: not a torch checkpoint ({type(exc).__name__}: {exc or 'no detail'}); "
            "restore or re-create the file"
        ) from exc
    metadata = _run_metadata(obj)
    state, stored_name, stored_config = _split_checkpoint(obj, path)
    if stored_name is None and isinstance(metadata.get("model"), str):
        stored_name = metadata["model"]

    inferred = name is None and stored_name is None
    if name is None:
        name = stored_name or infer_model_name(state)
    overrides = dict(stored_config) if stored_config and name == stored_name else {}
    config = preset_config(name, **overrides)
    if inferred and not stored_config:
        # shapes fix the preset but not settings without weights (attention windows, heads):
        # a model trained with overridden ones would load "successfully" and code differently
        warnings.warn(
            f"{path}: no model config stored and no name given; inferred {name} from the tensor "
            f"shapes and assumed its preset defaults (attn_windows={config.attn_windows}, "
            f"attn_heads={config.attn_heads}). Pass name= (and rebuild with the run's overrides) "
            "or save with hpcm.models.save_checkpoint to keep them",
            stacklevel=2,
        )
    mismatch = first_mismatch(_expected_shapes(config), state)
    if mismatch:
        raise CheckpointError(f"{path} does not fit {name}: {mismatch}")
    not_finite = [k for k, v in state.items() if v.is_floating_point() and not v.isfinite().all()]
    if not_finite:  # otherwise the coder fails later, on the first image, without naming the file
        raise CheckpointError(
            f"{path}: {len(not_finite)} weight tensor(s) hold NaN or inf (first: {not_finite[0]}); "
            "the training run that saved it diverged. Train it again (e.g. with a lower lr)"
        )

    model = HPCM(config, name=name)
    missing = sorted(
        k for k in model.state_dict() if k.startswith(ADAPTIVE_PREFIX) and k not in state
    )
    if missing:
        warnings.warn(
            f"{path}: no {ADAPTIVE_PREFIX}* in the checkpoint (an official release from before the "
            "Jan 2026 fix); the ten adaptive vectors stay at 1, as those weights were trained",
            stacklevel=2,
        )
    model.load_state_dict(state, strict=not missing)
    if isinstance(map_location, (str, torch.device)):
        model.to(map_location)
    return model.eval(), metadata


def save_checkpoint(model: HPCM, path: str | os.PathLike, **extra: Any) -> None:
    """Write the project's own checkpoint (atomically): weights, preset name and config, extras."""
    payload = {
        "model_name": model.name,
        "model_config": dataclasses.asdict(model.config),
        "state_dict": model.state_dict(),
        **extra,
    }
    atomic_torch_save(payload, path)
