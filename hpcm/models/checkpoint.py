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
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from typing import Any, Mapping

import torch
from torch import Tensor

from hpcm.util.io import atomic_torch_save
from hpcm.models.coder import CODER_BUFFER_NAMES
from hpcm.models.hpcm import HPCM
from hpcm.models.presets import PRESETS, HPCMConfig, preset_config

STATE_DICT_KEYS = ("state_dict", "model", "model_state_dict", "net")
PREFIXES = ("module.", "_orig_mod.")
ADAPTIVE_PREFIX = "adaptive_params_list."


class CheckpointError(ValueError):
    """A checkpoint that does not fit the requested architecture or cannot be read."""


def _strip_prefixes(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    out = {}
    for key, value in state.items():
        changed = True
        while changed:
            changed = False
            for prefix in PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix):], True
        out[key] = value
    return out


def _split_checkpoint(obj: Any, path: str) -> tuple[dict[str, Tensor], str | None, dict | None]:
    """(state_dict, model_name or None, model_config dict or None) of a loaded file."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a state dict or a dict holding one, got {type(obj).__name__}")
    if obj and all(torch.is_tensor(v) for v in obj.values()):
        return _strip_prefixes(obj), None, None
    for key in STATE_DICT_KEYS:
        if isinstance(obj.get(key), Mapping):
            name = obj.get("model_name")
            config = obj.get("model_config")
            return _strip_prefixes(obj[key]), name if isinstance(name, str) else None, config
    raise CheckpointError(
        f"{path}: no state dict found (not a tensor mapping, and none of the keys {STATE_DICT_KEYS})"
    )


def _expected_shapes(config: HPCMConfig) -> dict[str, tuple[int, ...]]:
    """Parameter/buffer shapes of a model of ``config`` (built on the meta device: no memory)."""
    with torch.device("meta"):
        model = HPCM(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if k not in CODER_BUFFER_NAMES}


def first_mismatch(expected: Mapping[str, tuple], state: Mapping[str, Tensor]) -> str | None:
    """Message about the first key (in model order, then file order) that does not fit; None if all fit.

    Missing ``adaptive_params_list.*`` keys are tolerated (legacy releases).
    """
    for key, shape in expected.items():
        if key not in state:
            if key.startswith(ADAPTIVE_PREFIX):
                continue
            return f"key {key!r} is missing from the checkpoint"
        if tuple(state[key].shape) != shape:
            return f"key {key!r} has shape {tuple(state[key].shape)} in the checkpoint, the model expects {shape}"
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
    path = os.fspath(path)
    if name is not None:
        preset_config(name)  # unknown name -> ValueError listing the valid ones, before any I/O
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # unreadable, truncated or not a torch file
        raise CheckpointError(f"{path}: cannot be read as a torch checkpoint ({exc})") from exc
    state, stored_name, stored_config = _split_checkpoint(obj, path)

    inferred = name is None and stored_name is None
    if name is None:
        name = stored_name or infer_model_name(state)
    overrides = dict(stored_config) if stored_config and name == stored_name else {}
    config = preset_config(name, **overrides)
    if inferred and not stored_config:
        # shapes fix the preset but not settings without weights (attention windows, heads):
        # a model trained with overridden ones would load "successfully" and code differently
        warnings.warn(
            f"{path}: no model config stored and no name given; inferred {name} from the tensor shapes "
            f"and assumed its preset defaults (attn_windows={config.attn_windows}, "
            f"attn_heads={config.attn_heads}). Pass name= (and rebuild with the run's overrides) "
            "or save with hpcm.models.save_checkpoint to keep them",
            stacklevel=2,
        )
    mismatch = first_mismatch(_expected_shapes(config), state)
    if mismatch:
        raise CheckpointError(f"{path} does not fit {name}: {mismatch}")

    model = HPCM(config, name=name)
    missing = sorted(k for k in model.state_dict() if k.startswith(ADAPTIVE_PREFIX) and k not in state)
    if missing:
        warnings.warn(
            f"{path}: no {ADAPTIVE_PREFIX}* in the checkpoint (an official release from before the "
            "Jan 2026 fix); the ten adaptive vectors stay at 1, as those weights were trained",
            stacklevel=2,
        )
    model.load_state_dict(state, strict=not missing)
    if isinstance(map_location, (str, torch.device)):
        model.to(map_location)
    return model.eval()


def save_checkpoint(model: HPCM, path: str | os.PathLike, **extra: Any) -> None:
    """Write the project's own checkpoint (atomically): weights, preset name and config, extras."""
    payload = {
        "model_name": model.name,
        "model_config": dataclasses.asdict(model.config),
        "state_dict": model.state_dict(),
        **extra,
    }
    atomic_torch_save(payload, path)
