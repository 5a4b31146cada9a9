"""distortion: ms_ssim — the HPCM maintainer's loss lmbda * (1 - MS-SSIM) + bpp, its measured
five-task split, the size limit, and short training runs (HPCM_Tiny at 192 px on CPU)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from pytorch_msssim import MS_SSIM, ms_ssim

from hpcm.config import run_config
from hpcm.train import loop as train
from hpcm.train.losses import (
    MeasuredHierarchicalLoss,
    build_decomposition,
    ms_ssim_log_terms,
    rate_distortion,
)
from tests.train.tiny import TINY, cli_args

pytestmark = pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad=True")


def fake_output(batch=2, channels=3, side=176, noise=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    target = torch.rand(batch, channels, side, side, generator=g)
    x_hat = (target + noise * torch.randn(target.shape, generator=g)).requires_grad_(True)
    y_lik = torch.rand(batch, 8, side // 16, side // 16, generator=g).clamp_min(0.05)
    z_lik = torch.rand(batch, 4, 2, 2, generator=g).clamp_min(0.05)
    return {"x_hat": x_hat, "likelihoods": {"y": y_lik, "z": z_lik}}, target


def test_ms_ssim_loss_equals_pytorch_msssim_on_fixed_inputs():
    out, target = fake_output()
    lmbda = 8.73
    rd = rate_distortion(out, target, lmbda, "ms_ssim")
    # independently: the maintainer's formula with pytorch_msssim's functional and module forms
    reference = ms_ssim(out["x_hat"].detach(), target, data_range=1.0)
    module = MS_SSIM(data_range=1.0, channel=3)(out["x_hat"].detach(), target)
    n_pixels = 2 * 176 * 176
    bpp = sum(-torch.log2(lik).sum() for lik in out["likelihoods"].values()) / n_pixels
    assert 0.5 < float(reference) < 0.99  # a non-trivial operating point
    # measured: 0 difference under ATEN_CPU_CAPABILITY=avx2 and =default (the same library call)
    assert float(rd["ms_ssim"]) == pytest.approx(float(reference), rel=1e-6)
    assert float(rd["ms_ssim"]) == pytest.approx(float(module), rel=1e-6)
    assert float(rd["distortion"]) == pytest.approx(lmbda * (1 - float(reference)), rel=1e-6)
    assert float(rd["loss"]) == pytest.approx(lmbda * (1 - float(reference)) + float(bpp), rel=1e-6)
    rd["loss"].backward()  # differentiable in x_hat
    assert out["x_hat"].grad is not None and torch.isfinite(out["x_hat"].grad).all()


def test_mse_stays_the_default_distortion():
    out, target = fake_output(side=32)
    rd = rate_distortion(out, target, 0.013)
    mse = torch.mean((out["x_hat"].detach() - target) ** 2)
    assert float(rd["distortion"]) == pytest.approx(0.013 * 255**2 * float(mse), rel=1e-6)
    assert "ms_ssim" not in rd


def test_log_terms_multiply_to_pytorch_msssim():
    """For one image and one channel, MS-SSIM = exp(-sum of the five log terms) exactly."""
    out, target = fake_output(batch=1, channels=1, side=200, noise=0.08, seed=3)
    terms = ms_ssim_log_terms(out["x_hat"].detach(), target)
    reference = ms_ssim(out["x_hat"].detach(), target, data_range=1.0, win_size=11)
    assert terms.shape == (5,) and bool((terms > 0).all())
    # measured relative difference 2.8e-8 (avx2) and 8.3e-9 (default): float32 log/exp rounding
    assert math.exp(-float(terms.sum())) == pytest.approx(float(reference), rel=1e-5)


def test_small_images_are_refused_with_the_limit():
    out, target = fake_output(side=160)
    with pytest.raises(ValueError, match="at least 161 px.*patch_size >= 192"):
        rate_distortion(out, target, 8.73, "ms_ssim")
    with pytest.raises(ValueError, match="unknown distortion 'ssim'"):
        rate_distortion(out, target, 8.73, "ssim")


def test_run_config_refuses_small_patches_for_ms_ssim():
    with pytest.raises(
        run_config.ConfigError, match="'distortion' = 'ms_ssim' needs 'patch_size' >= 161"
    ):
        run_config.resolve({**TINY, "steps": 3, "distortion": "ms_ssim"})
    with pytest.raises(run_config.ConfigError, match="must be one of mse, ms_ssim"):
        run_config.resolve({**TINY, "steps": 3, "distortion": "psnr"})


def scale_bits_of(y_lik):
    bits = -torch.log2(y_lik)
    labels = torch.arange(y_lik.shape[1]) % 3
    return torch.stack([bits[:, labels == s].sum(dim=(1, 2, 3)) for s in range(3)], dim=1)


def test_measured_ms_ssim_tasks_sum_to_the_standard_loss():
    out, target = fake_output()
    loss = MeasuredHierarchicalLoss(8.73, distortion="ms_ssim")
    tasks, details = loss(out, target, scale_bits=scale_bits_of(out["likelihoods"]["y"]))
    rd = rate_distortion(out, target, 8.73, "ms_ssim")
    assert float(tasks.sum()) == pytest.approx(float(rd["loss"]), rel=1e-6)
    assert float(tasks[0] + tasks[2]) == pytest.approx(float(rd["distortion"]), rel=1e-6)
    assert 0 < float(tasks[0]) < float(rd["distortion"])
    # the share is D * C / (C + F) of the log terms, recomputed here from the terms
    terms = ms_ssim_log_terms(out["x_hat"].detach(), target)
    share = float(terms[1:].sum() / terms.sum())
    # measured relative difference 1.5e-8 (avx2) and 2.5e-9 (default)
    assert float(tasks[0]) == pytest.approx(float(rd["distortion"]) * share, rel=1e-5)
    # the split's gradients add up to the gradient of D
    grads = [
        torch.autograd.grad(t, out["x_hat"], retain_graph=True)[0] for t in (tasks[0], tasks[2])
    ]
    (d_grad,) = torch.autograd.grad(rd["distortion"], out["x_hat"])
    # float32: the two parts cancel in places; measured max difference 7.7e-9 against a max |grad|
    # of 7.7e-4 (1e-5 of it)
    torch.testing.assert_close(
        grads[0] + grads[1], d_grad, rtol=1e-4, atol=1e-3 * float(d_grad.abs().max())
    )


def test_measured_ms_ssim_split_separates_fine_from_coarse_errors():
    """A full-resolution checkerboard error vanishes after the first 2x pooling (fine: s2_d); a
    constant offset changes only the coarsest level's luminance (coarse: s1_d)."""
    g = torch.Generator().manual_seed(1)
    target = 0.25 + 0.5 * torch.rand(1, 3, 192, 192, generator=g)
    checker = ((torch.arange(192)[:, None] + torch.arange(192)[None, :]) % 2 * 2 - 1).float() * 0.05
    loss = build_decomposition("measured", 8.73, "ms_ssim")
    shares = {}
    for name, x_hat in (("checkerboard", target + checker), ("offset", target + 0.1)):
        out = {
            "x_hat": x_hat,
            "likelihoods": {
                "y": torch.full((1, 8, 12, 12), 0.5),
                "z": torch.full((1, 4, 3, 3), 0.5),
            },
        }
        tasks, _ = loss(out, target, scale_bits=scale_bits_of(out["likelihoods"]["y"]))
        shares[name] = float(tasks[0] / (tasks[0] + tasks[2]))
    assert shares["checkerboard"] < 0.01 and shares["offset"] > 0.99


@pytest.mark.parametrize("variant", ["baseline", "phase1", "phase3"])
def test_three_steps_train_with_ms_ssim(tmp_path: Path, variant):
    """adam, Balanced (distortion task lmbda * (1 - MS-SSIM)) and the measured decomposition."""
    out = tmp_path / variant
    code = train.main(
        cli_args(
            out,
            variant=variant,
            distortion="ms_ssim",
            lmbda=8.73,
            patch_size=192,
            steps=3,
            val_every=3,
            checkpoint_every=3,
        )
    )
    assert code == train.EXIT_OK
    import pandas as pd

    metrics = pd.read_csv(out / "metrics.csv")
    train_rows = metrics.dropna(subset=["loss"])
    assert list(train_rows["step"]) == [1, 2, 3]
    # distortion is lmbda * (1 - MS-SSIM): between 0 and lmbda, unlike lmbda * 255^2 * MSE
    assert ((train_rows["distortion"] > 0) & (train_rows["distortion"] < 8.73)).all()
    assert metrics["val_distortion"].dropna().between(0, 8.73).all()
    assert (out / "done").exists()
    saved = run_config.read_run_yaml(out)
    assert saved["distortion"] == "ms_ssim"
