r"""Rate-distortion loss and the Phase-3 five-task decompositions [s1_d, s1_b, s2_d, s2_b, s3_b].

Standard loss (CompressAI convention, images in [0, 1], N = batch * H * W pixels):
    distortion = lmbda * 255^2 * MSE,   bpp_loss = (-sum log2 p(y) - sum log2 p(z)) / N,
    loss = distortion + bpp_loss.  The 2-task vector for Balanced is [distortion, bpp_loss].

MS-SSIM loss (run-config ``distortion: ms_ssim``), the HPCM maintainer's (lyq133/LIC-HPCM issue #9):
    distortion = lmbda * (1 - MS-SSIM(x_hat, x)),  MS-SSIM = pytorch_msssim.ms_ssim(x_hat, x,
    data_range=1.0) (5 scales, 11-tap Gaussian window, weights 0.0448 ... 0.1333, batch mean),
    loss = distortion + bpp_loss, with the official MS-SSIM lambdas 2.4 ... 60.5. The distortion
    task of Balanced / QP is then lmbda * (1 - MS-SSIM). Images need a side of at least
    ``MS_SSIM_MIN_SIDE`` (161) px; smaller ones are refused (no silent fewer-scale variant: that
    would be another metric than the evaluation's).

Three decompositions, all ``forward(output, target, scale_bits=None) -> (tasks (5,), details)``:

* ``HierarchicalLoss`` (seed, fixed ratios): s1_d = 0.40 D, s2_d = 0.35 D (the seed's 0.25 D
  "s3 distortion" is not a task), s1_b = 0.30 R, s2_b = 0.40 R, s3_b = 0.30 R, with D, R the
  standard distortion and total bpp (the seed multiplies MSE by lmbda only; we use the standard
  lmbda * 255^2 * MSE so every variant shares one operating-point scale).
* ``AdaptiveHierarchicalLoss`` (seed): the same with softmax-parameterised learnable ratios.
* ``MeasuredHierarchicalLoss`` (new): s1_b, s2_b, s3_b are the exact estimated bits of the latent
  elements each scale codes (z bits added to s3_b) from ``model.scale_bits``; s1_d and s2_d split
  D by a one-level orthonormal Haar transform of the error e = x_hat - x, per channel: s1_d is the
  coarse (LL) band energy, s2_d the three detail bands. Parseval (orthonormal transform; odd sizes
  are zero-padded, which adds no energy) makes s1_d + s2_d = D exactly, so s2_d is computed as
  D - s1_d and the five tasks sum to the standard loss. The split is by spatial frequency of the
  error, not an attribution of distortion to latent scales (the decoder mixes all scales); coarse
  error is what s1, the coarse latent grid, mostly controls.
  With ``distortion: ms_ssim`` the same split is made at the same place, the first dyadic level,
  in MS-SSIM's own terms: -log MS-SSIM = sum_j w_j (-log cs_j) + w_5 (-log l_5 cs_5) over the five
  pyramid levels (per image and channel, averaged over the batch). The full-resolution term
  F = w_1 (-log cs_1) is the fine part, the terms of the half-resolution and coarser levels C the
  coarse part, and s1_d = D * C / (C + F), s2_d = D - s1_d: D's share that MS-SSIM's coarse levels
  account for in -log MS-SSIM (for small 1 - MS-SSIM, D ~ lmbda * (C + F), so s1_d ~ lmbda * C).
  The tasks still sum to the standard loss exactly, and both parts are differentiable.

What the fixed-ratio decomposition reduces to under FAMO's log weighting
-----------------------------------------------------------------------
Let every task be a fixed multiple of one of two totals, L_k = r_k T_{t(k)} with T in {D, R},
and take the lower bounds m = 0 (eps negligible). Then log L_k = log r_k + log T_{t(k)}, so

1. the parameter gradient of the surrogate (1/c) sum_k z_k log L_k is
   (1/c) sum_k z_k grad T_{t(k)} / T_{t(k)} = (1/c) [Z_D grad D / D + Z_R grad R / R]
   with Z_D = z_{s1_d} + z_{s2_d} and Z_R = z_{s1_b} + z_{s2_b} + z_{s3_b}: the direction of 2-task
   Balanced with weights (Z_D, Z_R). Only the detached normaliser differs,
   c_5 = sum_k z_k / (r_k T_{t(k)}) instead of c_2 = Z_D / D + Z_R / R, i.e. the gradient is
   (c_2 / c_5) times the 2-task one: a global scale that Adam ignores (up to eps and the clip).
   The ratios r_k enter nowhere else;
2. the log-loss drops delta_k = log L_k(t) - log L_k(t+1) = log T(t) - log T(t+1) are identical
   within each group, so the logit update cannot tell s1 from s2: logits of one group move
   together (from equal starting values they stay equal up to the per-task gamma).
3. If all five tasks were multiples of the SAME total, every delta_k is equal and the softmax
   vector-Jacobian product (diag(z) - z z^T) delta = z (delta - z.delta) vanishes: FAMO receives
   no signal at all and only gamma * w acts (weights stay uniform from w = 0). (In float32 the
   rounding of sum(z) leaves a residue of about 1e-8 * delta; Adam's normalisation on w can
   still turn that into steps of order w_lr, in the official code as here.)

With the official m = -1, log(r_k T + 1) no longer separates, and the ratios act as a fixed,
loss-level-dependent reweighting rather than as information about the scales. The measured
decomposition avoids all of this: its tasks move independently.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from pytorch_msssim import ms_ssim
from pytorch_msssim.ssim import _fspecial_gauss_1d, _ssim  # the per-level terms ms_ssim multiplies

from hpcm.config.run_config import DISTORTIONS, MS_SSIM_MIN_SIDE
from hpcm.config.tasks import HIERARCHICAL_TASKS, SEED_TASK_NAMES

DECOMPOSITIONS = ("fixed_ratio", "adaptive", "measured")
SEED_DISTORTION_RATIOS = (0.40, 0.35, 0.25)
SEED_BPP_RATIOS = (0.30, 0.40, 0.30)
_LN2 = math.log(2.0)
MS_SSIM_WEIGHTS = (
    0.0448,
    0.2856,
    0.3001,
    0.2363,
    0.1333,
)  # pytorch_msssim's defaults (Wang et al. 2003)
_MS_SSIM_WINDOW, _MS_SSIM_SIGMA = 11, 1.5


def _at_least_fp32(tensor: torch.Tensor) -> torch.Tensor:
    """fp16/bf16 (autocast) -> fp32 for the reductions; fp32/fp64 unchanged."""
    return tensor.float() if tensor.dtype in (torch.float16, torch.bfloat16) else tensor


def _check_images(output: Mapping, target: torch.Tensor) -> torch.Tensor:
    if "x_hat" not in output or "likelihoods" not in output:
        raise ValueError(f"model output needs keys 'x_hat' and 'likelihoods', got {sorted(output)}")
    x_hat = output["x_hat"]
    if x_hat.shape != target.shape or target.ndim != 4:
        raise ValueError(
            f"x_hat shape {tuple(x_hat.shape)} must equal target shape {tuple(target.shape)} "
            "(B,C,H,W)"
        )
    return x_hat


def bits(likelihoods: torch.Tensor) -> torch.Tensor:
    """-sum log2 p over all elements."""
    return _at_least_fp32(likelihoods).log().sum() / -_LN2


def check_ms_ssim_size(target: torch.Tensor) -> None:
    if min(target.shape[-2:]) < MS_SSIM_MIN_SIDE:
        raise ValueError(
            "MS-SSIM (pytorch_msssim: 5 scales, 11-tap window) needs images with a side of at "
            f"least {MS_SSIM_MIN_SIDE} px, got {tuple(target.shape[-2:])}; use patch_size >= 192 "
            "(and validation images that large) or distortion: mse"
        )


def rate_distortion(
    output: Mapping, target: torch.Tensor, lmbda: float, distortion: str = "mse"
) -> dict[str, torch.Tensor]:
    """The standard loss: keys loss, distortion, bpp_loss, y_bpp, z_bpp, mse, psnr (+ ms_ssim when
    ``distortion`` is ``ms_ssim``: then distortion = lmbda * (1 - MS-SSIM))."""
    if distortion not in DISTORTIONS:
        raise ValueError(f"unknown distortion {distortion!r}; valid: {', '.join(DISTORTIONS)}")
    x_hat = _check_images(output, target)
    likelihoods = output["likelihoods"]
    missing = [k for k in ("y", "z") if k not in likelihoods]
    if missing:
        raise ValueError(f"output['likelihoods'] lacks {missing}; got {sorted(likelihoods)}")
    num_pixels = target.shape[0] * target.shape[2] * target.shape[3]
    y_bpp = bits(likelihoods["y"]) / num_pixels
    z_bpp = bits(likelihoods["z"]) / num_pixels
    mse = F.mse_loss(_at_least_fp32(x_hat), _at_least_fp32(target))
    bpp_loss = y_bpp + z_bpp
    psnr = 10 * torch.log10(1.0 / mse.detach().clamp_min(1e-20))
    out = {"bpp_loss": bpp_loss, "y_bpp": y_bpp, "z_bpp": z_bpp, "mse": mse, "psnr": psnr}
    if distortion == "mse":
        out["distortion"] = lmbda * 255**2 * mse
    else:
        check_ms_ssim_size(target)
        out["ms_ssim"] = ms_ssim(_at_least_fp32(x_hat), _at_least_fp32(target), data_range=1.0)
        out["distortion"] = lmbda * (1 - out["ms_ssim"])
    out["loss"] = out["distortion"] + bpp_loss
    return out


def ms_ssim_log_terms(x_hat: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(5,) batch means of the five terms of -log MS-SSIM: w_j (-log cs_j) for the levels 1-4 and
    w_5 (-log ssim_5) for the coarsest, as ``pytorch_msssim.ms_ssim`` computes them (relu'd, then
    clamped to [1e-8, 1] so that the logarithm is finite; a term is >= 0)."""
    check_ms_ssim_size(target)
    x_hat, target = _at_least_fp32(x_hat), _at_least_fp32(target)
    win = _fspecial_gauss_1d(_MS_SSIM_WINDOW, _MS_SSIM_SIGMA).repeat([target.shape[1], 1, 1, 1])
    terms = []
    for level, weight in enumerate(MS_SSIM_WEIGHTS):
        ssim_value, cs = _ssim(x_hat, target, data_range=1.0, win=win, size_average=False)
        last = level == len(MS_SSIM_WEIGHTS) - 1
        value = (ssim_value if last else cs).relu().clamp(1e-8, 1.0)
        terms.append(-weight * value.log().mean())
        if not last:
            padding = [side % 2 for side in x_hat.shape[2:]]
            x_hat = F.avg_pool2d(x_hat, kernel_size=2, padding=padding)
            target = F.avg_pool2d(target, kernel_size=2, padding=padding)
    return torch.stack(terms)


def haar_coarse_band(error: torch.Tensor, levels: int = 1) -> torch.Tensor:
    """The LL band of ``levels`` levels of the orthonormal 2-D Haar transform of ``error`` (B, C, H,
    W).

    Each level zero-pads odd sizes (no energy added) and maps every 2x2 block (a b; c d) to
    LL = (a+b+c+d)/2, one 2x2 average pooling (cheaper, forward and backward, than four strided
    slices). The three detail coefficients of the block complete an orthonormal map, so by
    Parseval their energy is the block's energy minus LL^2 and need not be formed.
    """
    if error.ndim != 4:
        raise ValueError(f"error must be (B, C, H, W), got shape {tuple(error.shape)}")
    if levels < 1:
        raise ValueError(f"levels must be >= 1, got {levels}")
    band = error
    for _ in range(levels):
        if band.shape[-1] % 2 or band.shape[-2] % 2:
            band = F.pad(band, (0, band.shape[-1] % 2, 0, band.shape[-2] % 2))
        band = F.avg_pool2d(band, 2) * 2  # (a+b+c+d)/4*2: the powers of two scale exactly
    return band


def haar_band_energies(error: torch.Tensor, levels: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(coarse, detail) energies of the orthonormal Haar transform of ``error``: coarse is the LL
    band's energy, detail = sum(error^2) - coarse is every detail band's (Parseval)."""
    coarse = haar_coarse_band(error, levels).square().sum()
    return coarse, error.square().sum() - coarse


def _details(rd: dict[str, torch.Tensor], tasks: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
    out = dict(rd)
    out.update(zip(HIERARCHICAL_TASKS, tasks))
    out.update(zip(SEED_TASK_NAMES, tasks))
    return out


class HierarchicalLoss(nn.Module):
    """Seed Phase-3 decomposition with fixed ratios (see the module docstring)."""

    def __init__(
        self,
        lmbda: float = 0.013,
        distortion_ratios: Sequence[float] = SEED_DISTORTION_RATIOS,
        bpp_ratios: Sequence[float] = SEED_BPP_RATIOS,
        distortion: str = "mse",
    ):
        super().__init__()
        self.lmbda = float(lmbda)
        self.distortion = distortion
        self.register_buffer("distortion_ratios", _ratios(distortion_ratios, "distortion_ratios"))
        self.register_buffer("bpp_ratios", _ratios(bpp_ratios, "bpp_ratios"))

    def ratios(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.distortion_ratios, self.bpp_ratios

    def forward(
        self, output: Mapping, target: torch.Tensor, scale_bits: torch.Tensor | None = None
    ):
        rd = rate_distortion(output, target, self.lmbda, self.distortion)
        d_ratio, b_ratio = self.ratios()
        d, r = rd["distortion"], rd["bpp_loss"]
        tasks = [d * d_ratio[0], r * b_ratio[0], d * d_ratio[1], r * b_ratio[1], r * b_ratio[2]]
        return torch.stack(tasks), _details(rd, tasks)


class AdaptiveHierarchicalLoss(HierarchicalLoss):
    """Learnable ratios: softmax of ``distortion_logits`` / ``bpp_logits`` (nn.Parameters).

    The seed initialises the logits to the ratio values themselves (softmax([0.4, 0.35, 0.25]) is
    about [0.35, 0.33, 0.31], not the intended split); we initialise them to log(ratios) so the
    run starts at the seed's fixed ratios. Whoever trains the logits must add them to an
    optimizer (``ratio_parameters()``): under FAMO's log weighting with m = 0 they enter only as
    additive log r_k terms, which pull weight away from heavily weighted tasks (module docstring).
    """

    def __init__(
        self,
        lmbda: float = 0.013,
        distortion_ratios: Sequence[float] = SEED_DISTORTION_RATIOS,
        bpp_ratios: Sequence[float] = SEED_BPP_RATIOS,
        distortion: str = "mse",
    ):
        super().__init__(lmbda, distortion_ratios, bpp_ratios, distortion)
        self.distortion_logits = nn.Parameter(self.distortion_ratios.log().clone())
        self.bpp_logits = nn.Parameter(self.bpp_ratios.log().clone())

    def ratios(self) -> tuple[torch.Tensor, torch.Tensor]:
        return F.softmax(self.distortion_logits, 0), F.softmax(self.bpp_logits, 0)

    def ratio_parameters(self) -> list[nn.Parameter]:
        return [self.distortion_logits, self.bpp_logits]


class MeasuredHierarchicalLoss(nn.Module):
    """Exact per-scale rate and a Haar split of the distortion; tasks sum to the standard loss."""

    def __init__(
        self,
        lmbda: float = 0.013,
        levels: int = 1,
        rate_rtol: float = 1e-4,
        distortion: str = "mse",
    ):
        super().__init__()
        if distortion == "ms_ssim" and levels != 1:
            raise ValueError(
                f"the MS-SSIM split is defined at the first level only, got levels={levels}"
            )
        self.lmbda = float(lmbda)
        self.distortion = distortion
        self.levels = int(levels)
        self.rate_rtol = float(rate_rtol)
        # The scale map is a fixed function of the latent shape, so one check per shape proves
        # the partition; checking every step would cost a host sync per step on CUDA.
        self._checked_shapes: set[tuple[int, ...]] = set()

    def forward(
        self, output: Mapping, target: torch.Tensor, scale_bits: torch.Tensor | None = None
    ):
        if scale_bits is None:
            raise ValueError(
                "the measured decomposition needs scale_bits (B, 3) from "
                "model.scale_bits(likelihoods_y)"
            )
        rd = rate_distortion(output, target, self.lmbda, self.distortion)
        batch = target.shape[0]
        if scale_bits.shape != (batch, 3):
            raise ValueError(
                f"scale_bits must have shape ({batch}, 3), got {tuple(scale_bits.shape)}"
            )
        num_pixels = batch * target.shape[2] * target.shape[3]
        scale_bpp = _at_least_fp32(scale_bits).sum(0) / num_pixels
        if tuple(target.shape) not in self._checked_shapes:
            self._check_rate(scale_bpp.detach().sum(), rd["y_bpp"].detach())
            self._checked_shapes.add(tuple(target.shape))
        if self.distortion == "ms_ssim":
            # D's share of MS-SSIM's half-resolution and coarser levels in -log MS-SSIM (module
            # docstring)
            terms = ms_ssim_log_terms(output["x_hat"], target)
            coarse_share = terms[1:].sum() / terms.sum().clamp_min(1e-12)
            coarse_distortion = rd["distortion"] * coarse_share
        else:
            error = _at_least_fp32(output["x_hat"]) - _at_least_fp32(target)
            coarse_distortion = haar_coarse_band(error, self.levels).square().sum() * (
                self.lmbda * 255**2 / error.numel()
            )
        # Parseval (MSE) or the definition (MS-SSIM): s1_d + s2_d = D by construction.
        detail_distortion = rd["distortion"] - coarse_distortion
        tasks = [
            coarse_distortion,
            scale_bpp[0],
            detail_distortion,
            scale_bpp[1],
            scale_bpp[2] + rd["z_bpp"],
        ]
        return torch.stack(tasks), _details(rd, tasks)

    def _check_rate(self, scale_total: torch.Tensor, y_bpp: torch.Tensor) -> None:
        # A wrong scale map would silently break "tasks sum to the R-D loss"; one sync (both
        # values in a single transfer) to be sure.
        scale_value, y_value = torch.stack([scale_total.double(), y_bpp.double()]).tolist()
        if abs(scale_value - y_value) > self.rate_rtol * max(abs(y_value), 1e-12):
            raise ValueError(
                f"scale_bits sum to {scale_value:.6g} bpp but the y likelihoods give {y_value:.6g} "
                "bpp; scale_bits must partition the bits of y"
            )


def build_decomposition(name: str, lmbda: float, distortion: str = "mse") -> nn.Module:
    """Run-config ``decomposition`` (fixed_ratio | adaptive | measured) -> loss module."""
    if distortion not in DISTORTIONS:
        raise ValueError(f"unknown distortion {distortion!r}; valid: {', '.join(DISTORTIONS)}")
    if name == "fixed_ratio":
        return HierarchicalLoss(lmbda, distortion=distortion)
    if name == "adaptive":
        return AdaptiveHierarchicalLoss(lmbda, distortion=distortion)
    if name == "measured":
        return MeasuredHierarchicalLoss(lmbda, distortion=distortion)
    raise ValueError(f"unknown decomposition {name!r}; valid: {', '.join(DECOMPOSITIONS)}")


def _ratios(values: Sequence[float], what: str) -> torch.Tensor:
    tensor = torch.as_tensor([float(v) for v in values], dtype=torch.float32)
    if tensor.shape != (3,) or not bool((tensor > 0).all()):
        raise ValueError(f"{what} must be 3 positive numbers [s1, s2, s3], got {list(values)}")
    return tensor
