"""Generalized-Gaussian entropy model of HPCM (likelihoods, gradient, quantised CDF tables).

This module is the "GGM" of the official implementation (lyq133/LIC-HPCM,
``src/entropy_models/entropy_models.py`` and ``bound_ops.py``), written anew. The rANS side
(buffers on the model, encode/decode of symbols) lives in :mod:`hpcm.models.coder`.

API
---
``GGM(beta=1.5, scale_bound=0.12, likelihood_bound=1e-9)`` (an ``nn.Module``; the model keeps one
    as ``model.entropy_estimation``). State-dict keys, as official:
    ``beta`` (shape [1]), ``scale_lower_bound.bound`` ([1]), ``likelihood_lower_bound.bound`` ([1]).
  ``ggm(inputs, scales, means=None) -> likelihoods``: P(r) = F((r+1/2)/s) - F((r-1/2)/s) with
    r = inputs - means, s = max(scales, 0.12), then max(P, 1e-9). Broadcasts like torch.
  ``ggm.get_quantized_cdf(scale_table) -> (quantized_cdf, cdf_length, offset)``: 16-bit CDF tables
    (int32, shapes (n, L_max+2), (n,), (n,)) for a 1-D tensor of scales, one table per scale.
``gennorm_cdf(t, beta)``: standard generalized-normal CDF with the official custom gradient.
``LowerBound(bound)``: max(x, bound) with the CompressAI gradient rule.
``get_scale_table(min=0.12, max=64.0, levels=60)``: the official log-spaced y scale table.
``build_indexes_conditional(scales, scale_table)``: index of the first table entry >= sigma.
``build_indexes_z(size)``: z uses one table per channel, so its index is the channel number.

Gradients (checked against the official code): the CDF's backward returns ``grad * pdf(t)`` with
pdf(t) = beta / (2 Gamma(1/beta)) exp(-|t|^beta) for ``t`` and nothing for ``beta``; both lower
bounds pass the gradient through where ``x >= bound`` or where the gradient pushes ``x`` upwards
(``grad_output < 0``), and block it otherwise.

Note on the tables: like the official code, the tail mass of every row is taken from the first
sample's lower CDF plus the upper tail beyond the *longest* row's last sample; for shorter rows that
under-counts the upper tail. We keep it so that our tables equal the official ones bit for bit (the
escape symbol gets the minimum 16-bit frequency either way).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
from torch import Tensor

from hpcm.models.compressai_ext import pmf_to_quantized_cdf as _pmf_to_quantized_cdf

__all__ = [
    "GGM",
    "LowerBound",
    "gennorm_cdf",
    "get_scale_table",
    "build_indexes_conditional",
    "build_indexes_z",
    "TAIL_MASS",
    "CDF_PRECISION",
]

TAIL_MASS = 1e-6  # probability mass left to the escape symbol when building tables (official)
CDF_PRECISION = 16  # bits of the quantised CDFs; compressai's rANS coder is fixed to 16


class NonFiniteScalesError(ValueError):
    """The model predicted NaN or infinite scales: its activations overflowed (a diverged model)."""


class _LowerBoundFunction(torch.autograd.Function):
    """max(x, bound); gradient passes where x >= bound or where it would raise x (CompressAI
    rule)."""

    @staticmethod
    def forward(ctx, x: Tensor, bound: Tensor) -> Tensor:
        ctx.save_for_backward(x, bound)
        return torch.max(x, bound)

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        x, bound = ctx.saved_tensors
        passes = (x >= bound) | (grad_output < 0)
        return passes * grad_output, None


class LowerBound(nn.Module):
    """Lower bound with the CompressAI gradient; the bound is a buffer named ``bound`` (shape
    [1])."""

    bound: Tensor

    def __init__(self, bound: float) -> None:
        super().__init__()
        self.register_buffer("bound", torch.tensor([float(bound)]))

    def forward(self, x: Tensor) -> Tensor:
        return _LowerBoundFunction.apply(x, self.bound.to(dtype=x.dtype))


class _GenNormCDF(torch.autograd.Function):
    """Standard generalized-normal CDF F(t) = (1 + sign(t) P(1/beta, |t|^beta)) / 2.

    The backward is the density, as in the official ``generalnormalcdf``: torch has no gradient of
    the regularised incomplete gamma with respect to its first argument, and writing the pdf in
    closed form is cheaper than differentiating through ``gammainc`` anyway.
    """

    @staticmethod
    def forward(ctx, beta: Tensor, t: Tensor) -> Tensor:
        abs_pow = torch.pow(torch.abs(t), beta)
        ctx.save_for_backward(abs_pow, beta)
        return (1 + torch.sign(t) * torch.special.gammainc(1 / beta, abs_pow)) / 2

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        abs_pow, beta = ctx.saved_tensors
        pdf = torch.exp(-abs_pow - torch.special.gammaln(1 / beta)) * beta / 2
        return None, grad_output * pdf


def gennorm_cdf(t: Tensor, beta: Tensor | float) -> Tensor:
    """Standard generalized-normal CDF of ``t`` with shape ``beta`` (official custom gradient)."""
    if not torch.is_tensor(beta):
        beta = torch.tensor([float(beta)], dtype=t.dtype, device=t.device)
    return _GenNormCDF.apply(beta.to(dtype=t.dtype, device=t.device), t)


class GGM(nn.Module):
    """Discretised generalized Gaussian with fixed shape ``beta`` (a buffer, never learned)."""

    beta: Tensor

    def __init__(
        self, beta: float = 1.5, scale_bound: float = 0.12, likelihood_bound: float = 1e-9
    ) -> None:
        super().__init__()
        self.scale_lower_bound = LowerBound(scale_bound)
        self.likelihood_lower_bound = LowerBound(likelihood_bound)
        self.register_buffer("beta", torch.tensor([float(beta)]))

    def _cdf(self, t: Tensor) -> Tensor:
        return gennorm_cdf(t, self.beta)

    def likelihood_unbounded(
        self, inputs: Tensor, scales: Tensor, means: Tensor | None = None
    ) -> Tensor:
        """F((r+1/2)/s) - F((r-1/2)/s) before the 1e-9 floor (s already bounded below)."""
        values = inputs - means if means is not None else inputs
        if values.dtype in (torch.float16, torch.bfloat16):  # gammainc needs float32 or wider
            values = values.float()
        scales = self.scale_lower_bound(scales.to(dtype=values.dtype))
        upper = self._cdf((values + 0.5) / scales)
        lower = self._cdf((values - 0.5) / scales)
        return upper - lower

    def forward(self, inputs: Tensor, scales: Tensor, means: Tensor | None = None) -> Tensor:
        return self.likelihood_lower_bound(self.likelihood_unbounded(inputs, scales, means))

    def standardized_quantile(self, quantile: float) -> float:
        """Quantile of the standard generalized normal (scipy; only used to size the tables)."""
        import scipy.stats  # not at the top: its import costs ~1.2 s and only update() needs it

        return float(scipy.stats.gennorm.ppf(quantile, float(self.beta.item())))

    @torch.no_grad()
    def get_quantized_cdf(self, scale_table: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """16-bit CDF tables, one per scale: ``(quantized_cdf, cdf_length, offset)``, all int32.

        Row i covers the symbols ``offset[i] .. offset[i] + cdf_length[i] - 3``; its last entry
        before the terminal 65536 belongs to the escape symbol (compressai's overflow code).
        """
        if scale_table.dim() != 1 or scale_table.numel() == 0:
            raise ValueError(
                f"scale_table must be a non-empty 1-D tensor, got shape {tuple(scale_table.shape)}"
            )
        if not torch.isfinite(scale_table).all() or (scale_table <= 0).any():
            raise ValueError("scale_table must hold finite, positive scales")
        device = scale_table.device
        scales = self.scale_lower_bound(scale_table.float())
        multiplier = -self.standardized_quantile(TAIL_MASS / 2)
        # float64 product, as the official code (tensor * numpy array promotes to float64)
        pmf_center = torch.ceil(scales.double() * multiplier).int()
        pmf_length = 2 * pmf_center + 1
        max_length = int(pmf_length.max().item())

        samples = (torch.arange(max_length, device=device).int() - pmf_center[:, None]).float()
        upper = self._cdf((samples + 0.5) / scales[:, None])
        lower = self._cdf((samples - 0.5) / scales[:, None])
        pmf = upper - lower
        tail_mass = lower[:, :1] + (1 - upper[:, -1:])

        quantized_cdf = torch.zeros((len(pmf_length), max_length + 2), dtype=torch.int32)
        for i in range(len(pmf_length)):
            prob = torch.cat((pmf[i, : pmf_length[i]], tail_mass[i]), dim=0)
            cdf = _pmf_to_quantized_cdf(prob.tolist(), CDF_PRECISION)
            quantized_cdf[i, : len(cdf)] = torch.tensor(cdf, dtype=torch.int32)
        return quantized_cdf.to(device), (pmf_length + 2).int(), (-pmf_center).int()


def get_scale_table(min: float = 0.12, max: float = 64.0, levels: int = 60) -> Tensor:
    """Log-spaced scale table, as the official test.py builds it (float32)."""
    if not (0 < min < max) or levels < 2:
        raise ValueError(f"need 0 < min < max and levels >= 2, got {min}, {max}, {levels}")
    return torch.exp(torch.linspace(math.log(min), math.log(max), levels))


def build_indexes_conditional(scales: Tensor, scale_table: Tensor) -> Tensor:
    """Index of the first table entry >= sigma (the last entry for larger sigma), int32.

    Same rule as the official ``build_indexes_conditional``: count the entries of
    ``scale_table[:-1]`` that are strictly below sigma.
    """
    if scale_table.dim() != 1 or scale_table.numel() == 0:
        raise ValueError("scale_table is empty: call model.update() before coding")
    if not torch.isfinite(scales).all():
        raise NonFiniteScalesError("scales contain NaN or inf; cannot pick a coding table")
    dtype = torch.promote_types(scales.dtype, torch.float32)  # never compare in half precision
    thresholds = scale_table[:-1].to(device=scales.device, dtype=dtype)
    # searchsorted(left) == number of entries strictly below sigma, without a (..., levels) tensor
    return torch.searchsorted(thresholds, scales.to(dtype).contiguous(), right=False).int()


def build_indexes_z(size: Sequence[int]) -> Tensor:
    """Per-channel table index for a z tensor of ``size`` (B, C, ...): element (b, c, ...) -> c."""
    if len(size) < 2:
        raise ValueError(f"z size must be (B, C, ...), got {tuple(size)}")
    view = [1, -1] + [1] * (len(size) - 2)
    return torch.arange(size[1], dtype=torch.int32).view(*view).expand(*size).contiguous()
