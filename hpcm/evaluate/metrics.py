"""Image-quality metrics of the evaluation, on 8-bit images as a decoder writes them.

PSNR and MS-SSIM follow CompressAI's ``eval_model``: both sides rounded and clamped to 8 bits;
MS-SSIM in dB is CompressAI's ``-10 log10(1 - MS-SSIM)``. The analysis stage reads these too.
"""

from __future__ import annotations

import math

import torch
from pytorch_msssim import ms_ssim

from hpcm.config.run_config import (
    MS_SSIM_MIN_SIDE,  # pytorch_msssim's 5-scale default with an 11-tap window
)


def to_8bit(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] floats -> the 8-bit values a decoder would write, as floats in 0..255."""
    return x.clamp(0, 1).mul(255).round()


def psnr_8bit(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    mse = torch.mean((to_8bit(x).double() - to_8bit(x_hat).double()) ** 2).item()
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def ms_ssim_8bit(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """MS-SSIM (linear) of the 8-bit images; NaN when the image is too small for 5 scales."""
    if min(x.shape[-2:]) < MS_SSIM_MIN_SIDE:
        return math.nan
    return ms_ssim(to_8bit(x).float(), to_8bit(x_hat).float(), data_range=255.0).item()


def ms_ssim_to_db(value: float) -> float:
    """CompressAI's convention: -10 log10(1 - MS-SSIM); NaN (not measured) stays NaN."""
    if math.isnan(value):
        return math.nan
    return -10.0 * math.log10(1.0 - value) if value < 1.0 else math.inf
