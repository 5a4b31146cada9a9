"""Ablation presets of the seed's Phase-3 studies, as plain data: the one place their values live.

Study 1 varies the scale modulation weights ``scale_weights`` [s1, s2, s3]; Study 2 varies the
per-scale gammas ``gammas`` [s1, s2, s3]. Each entry maps a variant name to run-config overrides.
A config names a preset instead of spelling its numbers (``scale_weights: equal``,
``gammas: decreasing``): the workflow (``workflow/rules/common.smk``) and ``hpcm.config.run_config``
turn the name into the list with :func:`preset_value`. No dependencies beyond the standard library,
so that Snakemake can import this module while it parses the workflow.
"""

from __future__ import annotations

STUDY1_SCALE_WEIGHTS: dict[str, dict[str, list[float]]] = {
    "equal": {"scale_weights": [0.33, 0.33, 0.34]},
    "s1_emphasis": {"scale_weights": [0.5, 0.3, 0.2]},
    "s2_emphasis": {"scale_weights": [0.3, 0.4, 0.3]},
    "s3_emphasis": {"scale_weights": [0.2, 0.3, 0.5]},
}

STUDY2_GAMMAS: dict[str, dict[str, list[float]]] = {
    "uniform": {"gammas": [0.006, 0.006, 0.006]},
    "increasing": {"gammas": [0.004, 0.006, 0.008]},
    "decreasing": {"gammas": [0.008, 0.006, 0.004]},
}

STUDIES: dict[str, dict[str, dict[str, list[float]]]] = {
    "study1_scale_weights": STUDY1_SCALE_WEIGHTS,
    "study2_gammas": STUDY2_GAMMAS,
}


# The seed's defaults (HierarchicalBalanced, ScaleGammaManager, the run config) are two of them.
DEFAULT_SCALE_WEIGHTS: tuple[float, ...] = tuple(
    STUDY1_SCALE_WEIGHTS["s2_emphasis"]["scale_weights"]
)
DEFAULT_GAMMAS: tuple[float, ...] = tuple(STUDY2_GAMMAS["decreasing"]["gammas"])

# Official HPCM recipe: lr 1e-4, then 3e-5 / 1e-5 / 1e-6 from epoch 2750 / 2850 / 2950 of 3000.
HPCM_LR = 1e-4
HPCM_LR_MILESTONES = (2750 / 3000, 2850 / 3000, 2950 / 3000)
HPCM_LR_VALUES = (3e-5, 1e-5, 1e-6)

# The lambdas of the released HPCM-Base / HPCM-Large weights (lyq133/LIC-HPCM README), per
# distortion: loss lmbda*255^2*MSE + bpp, and lmbda*(1 - MS-SSIM) + bpp.
OFFICIAL_LAMBDAS: dict[str, tuple[float, ...]] = {
    "mse": (0.0018, 0.0035, 0.0067, 0.013, 0.025, 0.0483),
    "ms_ssim": (2.4, 4.58, 8.73, 16.64, 31.73, 60.5),
}

# Run-config keys whose value may be a preset name, and the study whose presets it names.
NAMED_KEYS: dict[str, str] = {"scale_weights": "study1_scale_weights", "gammas": "study2_gammas"}


def ablation_overrides(study: str, variant: str) -> dict[str, list[float]]:
    """A copy of the run-config overrides of one ablation variant; unknown names raise
    ValueError."""
    if study not in STUDIES:
        raise ValueError(f"unknown ablation study {study!r}; valid: {', '.join(STUDIES)}")
    variants = STUDIES[study]
    if variant not in variants:
        raise ValueError(f"unknown preset {variant!r} of {study}; valid: {', '.join(variants)}")
    return {key: list(value) for key, value in variants[variant].items()}


def preset_value(key: str, value: object) -> object:
    """The list a preset name stands for under ``key`` (``"equal"`` for ``scale_weights`` gives
    [0.33, 0.33, 0.34]); any other value is returned as it is. An unknown name raises ValueError."""
    if key not in NAMED_KEYS or not isinstance(value, str):
        return value
    return ablation_overrides(NAMED_KEYS[key], value)[key]
