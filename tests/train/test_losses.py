"""hpcm.train.losses: standard R-D loss, Haar split, the three five-task decompositions, FAMO
reduction."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hpcm.optim import Balanced, HierarchicalBalanced
from hpcm.train.losses import (
    AdaptiveHierarchicalLoss,
    HierarchicalLoss,
    MeasuredHierarchicalLoss,
    build_decomposition,
    haar_band_energies,
    rate_distortion,
)

# float(t) on graph-carrying scalars is intended in these value checks.
pytestmark = pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad=True")


def fake_output(batch=2, h=16, w=16, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    target = torch.rand(batch, 3, h, w, generator=g, dtype=dtype)
    x_hat = (target + 0.05 * torch.randn(batch, 3, h, w, generator=g, dtype=dtype)).requires_grad_(
        True
    )
    y_lik = (
        torch.rand(batch, 8, h // 4 or 1, w // 4 or 1, generator=g, dtype=dtype)
        .clamp_min(0.05)
        .requires_grad_(True)
    )
    z_lik = torch.rand(batch, 4, 2, 2, generator=g, dtype=dtype).clamp_min(0.05)
    return {"x_hat": x_hat, "likelihoods": {"y": y_lik, "z": z_lik}}, target


def split_scale_bits(y_lik):
    """A fixed element->scale labelling (like model.scale_bits): channel thirds."""
    bits = -torch.log2(y_lik)
    labels = torch.arange(y_lik.shape[1]) % 3
    return torch.stack([bits[:, labels == s].sum(dim=(1, 2, 3)) for s in range(3)], dim=1)


def test_rate_distortion_against_hand_computation():
    out, target = fake_output()
    rd = {k: v.detach() for k, v in rate_distortion(out, target, 0.013).items()}
    n_pix = 2 * 16 * 16
    mse = ((out["x_hat"].detach() - target) ** 2).mean()
    y_bits = sum(-math.log2(v) for v in out["likelihoods"]["y"].detach().flatten().tolist())
    z_bits = sum(-math.log2(v) for v in out["likelihoods"]["z"].flatten().tolist())
    assert float(rd["mse"]) == pytest.approx(float(mse), rel=1e-6)
    assert float(rd["distortion"]) == pytest.approx(0.013 * 255**2 * float(mse), rel=1e-6)
    assert float(rd["y_bpp"]) == pytest.approx(y_bits / n_pix, rel=1e-5)
    assert float(rd["z_bpp"]) == pytest.approx(z_bits / n_pix, rel=1e-5)
    assert float(rd["loss"]) == pytest.approx(float(rd["distortion"] + rd["bpp_loss"]), rel=1e-7)
    assert float(rd["psnr"]) == pytest.approx(10 * math.log10(1 / float(mse)), rel=1e-6)


def test_rate_distortion_shape_errors():
    out, target = fake_output()
    with pytest.raises(ValueError, match="x_hat shape"):
        rate_distortion(out, target[:, :, :8], 0.01)
    with pytest.raises(ValueError, match="lacks"):
        rate_distortion(
            {"x_hat": out["x_hat"], "likelihoods": {"y": out["likelihoods"]["y"]}}, target, 0.01
        )


def reference_haar_energies(e: np.ndarray, levels: int) -> tuple[float, float]:
    """The textbook orthonormal 2-D Haar transform, block by block in numpy: every 2x2 block
    (a b; c d) gives LL = (a+b+c+d)/2 and the details (a-b+c-d)/2, (a+b-c-d)/2, (a-b-c+d)/2."""
    band, detail = e, 0.0
    for _ in range(levels):
        band = np.pad(band, [(0, 0), (0, 0), (0, band.shape[2] % 2), (0, band.shape[3] % 2)])
        a, b = band[:, :, 0::2, 0::2], band[:, :, 0::2, 1::2]
        c, d = band[:, :, 1::2, 0::2], band[:, :, 1::2, 1::2]
        detail += float(
            (
                ((a - b + c - d) / 2) ** 2 + ((a + b - c - d) / 2) ** 2 + ((a - b - c + d) / 2) ** 2
            ).sum()
        )
        band = (a + b + c + d) / 2
    return float((band**2).sum()), detail


@pytest.mark.parametrize("shape", [(1, 1, 4, 4), (2, 3, 7, 5), (1, 2, 1, 1), (1, 3, 9, 12)])
@pytest.mark.parametrize("levels", [1, 2, 3])
def test_haar_energies_equal_the_explicit_transform_including_odd_sizes(shape, levels):
    e = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    coarse, detail = haar_band_energies(e, levels)
    ref_coarse, ref_detail = reference_haar_energies(e.numpy(), levels)
    assert float(coarse) == pytest.approx(ref_coarse, rel=1e-12)
    assert float(detail) == pytest.approx(ref_detail, rel=1e-10, abs=1e-12)
    assert ref_coarse + ref_detail == pytest.approx(float((e**2).sum()), rel=1e-12)  # Parseval


def test_haar_separates_constant_from_checkerboard():
    constant = torch.ones(1, 1, 4, 6, dtype=torch.float64)
    coarse, detail = haar_band_energies(constant)
    assert float(detail) == pytest.approx(0.0, abs=1e-15) and float(coarse) == pytest.approx(24.0)
    checker = (-1.0) ** (torch.arange(4).view(4, 1) + torch.arange(6).view(1, 6)).double()
    coarse, detail = haar_band_energies(checker.view(1, 1, 4, 6))
    assert float(coarse) == pytest.approx(0.0, abs=1e-15) and float(detail) == pytest.approx(24.0)


@pytest.mark.parametrize("dtype,rel", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
@pytest.mark.parametrize("hw", [(16, 16), (12, 20), (9, 13)])
def test_measured_tasks_sum_to_standard_loss(dtype, rel, hw):
    out, target = fake_output(h=hw[0], w=hw[1], dtype=dtype)
    tasks, details = MeasuredHierarchicalLoss(0.0067)(
        out, target, split_scale_bits(out["likelihoods"]["y"])
    )
    rd = {k: v.detach() for k, v in rate_distortion(out, target, 0.0067).items()}
    assert tasks.shape == (5,)
    assert float(tasks.detach().sum()) == pytest.approx(float(rd["loss"]), rel=rel)
    assert float(tasks.detach()[0] + tasks.detach()[2]) == pytest.approx(
        float(rd["distortion"]), rel=rel
    )
    assert float(tasks.detach()[1:].sum() - tasks.detach()[2]) == pytest.approx(
        float(rd["bpp_loss"]), rel=rel
    )
    assert float(details["s3_b"].detach()) > float(rd["z_bpp"])  # z bits sit in s3_b
    # s1_d / s2_d are the coarse / detail band energies of the explicit transform, times
    # lambda*255^2/N
    error = (out["x_hat"] - target).detach().double().numpy()
    ref_coarse, ref_detail = reference_haar_energies(error, 1)
    factor = 0.0067 * 255**2 / error.size
    assert float(details["s1_d"]) == pytest.approx(ref_coarse * factor, rel=rel)
    assert float(details["s2_d"]) == pytest.approx(ref_detail * factor, rel=10 * rel)
    # Gradients flow into both the reconstruction and the likelihoods.
    tasks.sum().backward()
    assert out["x_hat"].grad is not None and out["likelihoods"]["y"].grad is not None


def test_measured_requires_consistent_scale_bits():
    out, target = fake_output()
    loss = MeasuredHierarchicalLoss(0.01)
    with pytest.raises(ValueError, match="scale_bits"):
        loss(out, target)
    with pytest.raises(ValueError, match="shape"):
        loss(out, target, torch.ones(2, 2))
    wrong = split_scale_bits(out["likelihoods"]["y"]) * torch.tensor([1.0, 1.0, 0.5])
    with pytest.raises(ValueError, match="partition"):
        loss(out, target, wrong)


def test_fixed_ratio_values_follow_the_seed():
    out, target = fake_output()
    tasks, details = HierarchicalLoss(0.013)(out, target)
    rd = rate_distortion(out, target, 0.013)
    d, r = float(rd["distortion"]), float(rd["bpp_loss"])
    assert tasks.tolist() == pytest.approx(
        [0.40 * d, 0.30 * r, 0.35 * d, 0.40 * r, 0.30 * r], rel=1e-6
    )
    assert float(details["s2_distortion"]) == pytest.approx(0.35 * d, rel=1e-6)


def test_adaptive_starts_at_seed_ratios_and_learns():
    out, target = fake_output()
    loss = AdaptiveHierarchicalLoss(0.013)
    tasks, _ = loss(out, target)
    fixed, _ = HierarchicalLoss(0.013)(out, target)
    torch.testing.assert_close(tasks, fixed, rtol=1e-6, atol=0)
    tasks[0].backward()
    assert loss.distortion_logits.grad is not None and loss.distortion_logits.grad.abs().sum() > 0
    assert {id(p) for p in loss.ratio_parameters()} == {id(p) for p in loss.parameters()}


def test_build_decomposition_names():
    assert isinstance(build_decomposition("measured", 0.01), MeasuredHierarchicalLoss)
    assert type(build_decomposition("fixed_ratio", 0.01)) is HierarchicalLoss
    with pytest.raises(ValueError, match="fixed_ratio"):
        build_decomposition("guess", 0.01)


# ----------------------------------------------------------------------------- FAMO reduction
def _toy(seed=0):
    g = torch.Generator().manual_seed(seed)
    weight = (torch.randn(3, 3, 3, 3, generator=g, dtype=torch.float64) * 0.2).requires_grad_(True)
    x = torch.rand(2, 3, 8, 8, generator=g, dtype=torch.float64)
    return weight, x


def _toy_output(weight, x):
    x_hat = torch.nn.functional.conv2d(x, weight, padding=1)
    y_lik = (
        torch.sigmoid(torch.nn.functional.conv2d(x, weight, padding=1)[:, :, ::4, ::4]) * 0.9 + 0.05
    )
    z_lik = torch.sigmoid(weight.sum() + torch.zeros(2, 2, 1, 1, dtype=torch.float64)) * 0.5 + 0.25
    return {"x_hat": x_hat, "likelihoods": {"y": y_lik, "z": z_lik}}


def test_fixed_ratio_under_famo_is_two_task_balanced():
    """Derivation point 1: with m = 0, 5 fixed-ratio tasks give (c_2/c_5) x 2-task Balanced, summed
    weights."""
    weight, x = _toy()
    logits = torch.tensor([0.3, -0.2, 0.1, 0.4, -0.5])
    hier = HierarchicalBalanced(
        [weight], min_losses=0.0, scale_weights=[1.0, 1.0, 1.0], max_norm=0.0
    )
    with torch.no_grad():
        hier.w.copy_(logits)
    tasks, _ = HierarchicalLoss(0.01)(_toy_output(weight, x), x)
    hier.get_weighted_loss(tasks).backward()
    grad_five = weight.grad.clone()

    weight.grad = None
    z = torch.softmax(logits, 0)
    two = Balanced([weight], min_losses=0.0, max_norm=0.0)
    with torch.no_grad():
        two.w.copy_(torch.log(torch.stack([z[0] + z[2], z[1] + z[3] + z[4]])))
    rd = rate_distortion(_toy_output(weight, x), x, 0.01)
    two.get_weighted_loss(torch.stack([rd["distortion"], rd["bpp_loss"]])).backward()
    d, r = float(rd["distortion"]), float(rd["bpp_loss"])
    z64 = z.double()
    c5 = float((z64 / tasks.detach()).sum())
    c2 = float(z64[[0, 2]].sum()) / d + float(z64[[1, 3, 4]].sum()) / r
    torch.testing.assert_close(grad_five, (c2 / c5) * weight.grad, rtol=1e-5, atol=1e-10)
    assert abs(c2 / c5 - 1) > 0.01  # the scale really differs; the direction is what is shared


def test_fixed_ratio_deltas_are_identical_within_groups_and_one_total_gives_no_signal():
    """Derivation points 2 and 3: equal log drops inside a group; one shared total -> zero VJP."""
    weight, x = _toy()
    loss = HierarchicalLoss(0.01)
    before, _ = loss(_toy_output(weight, x), x)
    with torch.no_grad():
        weight.mul_(0.9)
    after, _ = loss(_toy_output(weight, x), x)
    delta = (before.log() - after.log()).detach()
    assert float(delta[0]) == pytest.approx(float(delta[2]), rel=1e-10)  # distortion group
    assert float(delta[1]) == pytest.approx(float(delta[3]), rel=1e-10)  # rate group
    assert float(delta[1]) == pytest.approx(float(delta[4]), rel=1e-10)
    assert abs(float(delta[0] - delta[1])) > 1e-6  # the two groups do differ

    total_before = before.sum().detach()
    total_after = after.sum().detach()
    ratios = torch.tensor([0.1, 0.2, 0.3, 0.15, 0.25], dtype=torch.float64)
    opt = HierarchicalBalanced(
        [torch.zeros(1, requires_grad=True)],
        min_losses=0.0,
        gamma_s1=0.0,
        gamma_s2=0.0,
        gamma_s3=0.0,
    )
    with torch.no_grad():
        opt.w.copy_(torch.tensor([0.5, -0.3, 0.2, 0.0, 0.1]))
    opt.prev_loss = ratios * total_before
    opt.update_task_weights(ratios * total_after)
    # The logit gradient (first Adam moment / (1 - beta1)) is zero up to the float32 rounding of
    # z (sum z = 1 +- 1e-7); the same update on the real 5 tasks gets a gradient of order delta.
    signal_free = float(opt.w_opt.state[opt.w]["exp_avg"].abs().max()) / 0.1
    assert signal_free < 1e-7 * float(delta.abs().max())
    opt.w_opt.state.clear()
    opt.prev_loss = before.detach()
    opt.update_task_weights(after.detach())
    signal = float(opt.w_opt.state[opt.w]["exp_avg"].abs().max()) / 0.1
    assert signal > 1e-3 * float(delta.abs().max())


def test_measured_checks_the_partition_once_per_input_shape():
    # The scale map depends only on the latent shape: the first call at each shape is checked
    # (a host sync), later calls at that shape are not, so training makes no per-step sync.
    out, target = fake_output(h=16, w=16)
    loss = MeasuredHierarchicalLoss(0.01)
    loss(out, target, split_scale_bits(out["likelihoods"]["y"]))
    assert loss._checked_shapes == {tuple(target.shape)}
    out_new, target_new = fake_output(h=32, w=16)
    wrong = split_scale_bits(out_new["likelihoods"]["y"]) * torch.tensor([1.0, 1.0, 0.5])
    with pytest.raises(ValueError, match="partition"):
        loss(out_new, target_new, wrong)
