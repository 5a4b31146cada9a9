"""Named HPCM configurations and ``build_model``.

``HPCM_Base`` and ``HPCM_Large`` are the official architectures (lyq133/LIC-HPCM, 68.505 M and
89.719 M parameters). ``HPCM_Small`` and ``HPCM_Tiny`` keep the whole structure (3 scales, 11 steps,
step adaptors, spatial priors, ten adaptive vectors, window cross-attention, cross-scale merges)
with fewer channels and smaller attention windows, for CPU work on 128 px / 64 px patches.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from hpcm.models.partition import check_channels


@dataclass(frozen=True)
class HPCMConfig:
    M: int = 320  # latent y channels (8 channel groups of M/8)
    N: int = 256  # hyper-latent z channels
    transform_channels: tuple[int, int, int] = (
        96,
        192,
        384,
    )  # g_a / g_s stage widths, shallow first
    analysis_blocks: tuple[int, int, int] = (2, 2, 4)  # PConvRB per g_a stage, shallow first
    synthesis_blocks: tuple[int, int, int] = (4, 2, 2)  # PConvRB per g_s stage, deep first
    hyper_blocks: int = 3  # PConvRB(N) in h_a and in h_s
    prior_s1_s2_blocks: tuple[int, int] = (2, 1)  # DWConvRB(3M) before / after the q-multiplication
    prior_s3_blocks: tuple[int, int] = (3, 2)
    attn_windows: tuple[int, int, int] = (4, 8, 8)  # window size on the s1, s2, s3 grids
    attn_heads: int = 32
    mlp_ratio: int = 4  # PConvRB expansion in the transforms
    partial_ratio: int = 4  # PConvRB convolves 1/partial_ratio of the channels

    def __post_init__(self) -> None:
        check_channels(self.M)
        if (2 * self.M) % self.attn_heads:
            raise ValueError(f"2*M={2 * self.M} must be divisible by attn_heads={self.attn_heads}")
        for name in ("transform_channels", "analysis_blocks", "synthesis_blocks", "attn_windows"):
            if len(getattr(self, name)) != 3:
                raise ValueError(f"{name} needs 3 entries, got {getattr(self, name)!r}")
        if min(self.attn_windows) < 1:
            raise ValueError(f"attn_windows must be >= 1, got {self.attn_windows}")
        for ch in (*self.transform_channels, self.M, self.N, 2 * self.M):
            if ch % self.partial_ratio:
                raise ValueError(
                    f"channel count {ch} not divisible by partial_ratio={self.partial_ratio}"
                )

    @property
    def pad_multiple(self) -> int:
        """Image sizes must be multiples of this: stride 64 to the s1 grid, and whole windows."""
        w1, w2, w3 = self.attn_windows
        return math.lcm(64, 64 * w1, 32 * w2, 16 * w3)


PRESETS: dict[str, HPCMConfig] = {
    "HPCM_Base": HPCMConfig(),
    "HPCM_Large": HPCMConfig(
        analysis_blocks=(2, 2, 8),
        synthesis_blocks=(8, 2, 2),
        prior_s1_s2_blocks=(2, 2),
        prior_s3_blocks=(4, 3),
    ),
    # CPU presets: attention head dim stays 20 (Small) / 16 (Tiny) like the official 20.
    "HPCM_Small": HPCMConfig(
        M=160,
        N=128,
        transform_channels=(48, 96, 192),
        attn_windows=(2, 4, 8),
        attn_heads=16,
    ),
    "HPCM_Tiny": HPCMConfig(
        M=64,
        N=64,
        transform_channels=(32, 48, 96),
        analysis_blocks=(1, 1, 1),
        synthesis_blocks=(1, 1, 1),
        hyper_blocks=1,
        prior_s1_s2_blocks=(1, 1),
        prior_s3_blocks=(1, 1),
        attn_windows=(1, 2, 4),
        attn_heads=8,
        mlp_ratio=2,
    ),
}


def preset_config(name: str, **overrides) -> HPCMConfig:
    """The config of preset ``name`` with fields replaced by ``overrides``."""
    if name not in PRESETS:
        raise ValueError(f"unknown model name {name!r}; valid names: {', '.join(sorted(PRESETS))}")
    fields = {f.name for f in dataclasses.fields(HPCMConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown override(s) {unknown} for {name}; valid: {sorted(fields)}")
    tuples = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}
    return dataclasses.replace(PRESETS[name], **tuples)
