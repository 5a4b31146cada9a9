"""HPCM models: the official HPCM_Base / HPCM_Large, CPU presets, real entropy coding.

Public API
----------
``build_model(name, **overrides) -> HPCM``  names: HPCM_Base, HPCM_Large, HPCM_Small, HPCM_Tiny;
    overrides replace fields of :class:`HPCMConfig` (e.g. ``attn_windows=(2, 4, 4)``).
``HPCM``: ``model(x)`` -> {"x_hat", "likelihoods": {"y", "z"}}; ``scale_map``, ``step_map``,
    ``scale_bits``; ``update``, ``compress``, ``decompress``, ``coded_symbols`` (what compress
    codes, per image); ``pad_multiple``.
``pad_image(x, multiple) -> (x_padded, pad)``, ``crop_image(x_padded, pad)``.
``hpcm.models.param_groups``: the Phase 4 parameter groups (transforms, hyperprior, context and
    the scales each context parameter serves), from the module names.
``load_checkpoint(path, name=None, map_location="cpu")``, ``save_checkpoint(model, path, **extra)``.
``load_checkpoint_and_metadata(path, ...) -> (HPCM, run labels)``, ``with_run_metadata(state_dict,
    model=, variant=, lmbda=, seed=)``: a checkpoint that says what it is (read by hpcm.evaluate).
"""

from __future__ import annotations

from hpcm.models.checkpoint import (
    CheckpointError,
    CheckpointUnreadableError,
    infer_model_name,
    load_checkpoint,
    load_checkpoint_and_metadata,
    save_checkpoint,
    with_run_metadata,
)
from hpcm.models.entropy import NonFiniteScalesError
from hpcm.models.hpcm import HPCM
from hpcm.models.padding import crop_image, pad_image
from hpcm.models.presets import PRESETS, HPCMConfig, preset_config

MODEL_NAMES = tuple(PRESETS)


def build_model(name: str, **overrides) -> HPCM:
    """A freshly initialised HPCM of preset ``name`` (unknown name -> ValueError listing the valid
    ones)."""
    return HPCM(preset_config(name, **overrides), name=name)


__all__ = [
    "HPCM",
    "HPCMConfig",
    "MODEL_NAMES",
    "NonFiniteScalesError",
    "PRESETS",
    "CheckpointError",
    "CheckpointUnreadableError",
    "build_model",
    "crop_image",
    "infer_model_name",
    "load_checkpoint",
    "load_checkpoint_and_metadata",
    "with_run_metadata",
    "pad_image",
    "preset_config",
    "save_checkpoint",
]
