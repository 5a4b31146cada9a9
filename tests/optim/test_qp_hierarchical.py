"""QP weights (closed forms), the QP optimizer option, HierarchicalBalanced, CautiousAdam
details."""

from __future__ import annotations

import io

import pytest
import torch

from hpcm.optim import (
    Balanced,
    CautiousAdam,
    HierarchicalBalanced,
    build_optimizer,
    qp_task_weights,
)
from hpcm.optim.qp import equality_qp_weights, gram_matrix, two_task_weights

DT = torch.float64


def gram_of(*vectors):
    g = torch.stack([torch.as_tensor(v, dtype=DT) for v in vectors])
    return g @ g.T


# ----------------------------------------------------------------------------- QP closed forms
def test_two_task_closed_form_orthogonal_gradients():
    # min |w1 g1 + w2 g2|^2 with g1 ⟂ g2: w1 = |g2|^2 / (|g1|^2 + |g2|^2)
    w = qp_task_weights(gram_of([3.0, 0.0], [0.0, 1.0]))
    assert w.tolist() == pytest.approx([0.1, 0.9])


def test_two_task_closed_form_general_and_kkt():
    g1, g2 = torch.tensor([1.0, 2.0, -1.0], dtype=DT), torch.tensor([0.5, -1.0, 2.0], dtype=DT)
    gram = gram_of(g1, g2)
    w1 = float((g2 @ g2 - g1 @ g2) / ((g1 - g2) @ (g1 - g2)))
    assert two_task_weights(gram).tolist() == pytest.approx([w1, 1 - w1])
    # The general KKT solver agrees with the closed form.
    assert equality_qp_weights(gram).tolist() == pytest.approx([w1, 1 - w1])


def test_clipping_and_renormalisation():
    # g1 = 2 g2: unconstrained optimum w = (-1, 2) -> clipped to (0, 1).
    assert two_task_weights(gram_of([2.0, 2.0], [1.0, 1.0])).tolist() == pytest.approx([-1.0, 2.0])
    assert qp_task_weights(gram_of([2.0, 2.0], [1.0, 1.0])).tolist() == pytest.approx([0.0, 1.0])


def test_three_orthogonal_tasks_inverse_norm_weights():
    w = qp_task_weights(gram_of([1.0, 0, 0], [0, 2.0, 0], [0, 0, 4.0]))
    inv = torch.tensor([1.0, 1 / 4, 1 / 16], dtype=DT)
    assert w.tolist() == pytest.approx((inv / inv.sum()).tolist())


def test_degenerate_gram_matrices_give_uniform_weights():
    assert qp_task_weights(gram_of([1.0, 2.0], [1.0, 2.0])).tolist() == pytest.approx([0.5, 0.5])
    assert qp_task_weights(torch.zeros(3, 3, dtype=DT)).tolist() == pytest.approx([1 / 3] * 3)
    assert qp_task_weights(gram_of([1.0, 1.0], [1.0, 1.0], [1.0, 1.0])).tolist() == pytest.approx(
        [1 / 3] * 3
    )
    assert qp_task_weights(gram_of([2.0])).tolist() == [1.0]
    with pytest.raises(ValueError, match="square"):
        qp_task_weights(torch.zeros(2, 3, dtype=DT))
    with pytest.raises(ValueError, match="non-finite"):
        qp_task_weights(torch.full((2, 2), float("nan"), dtype=DT))


def test_gram_matrix_over_parameters_with_missing_grads():
    grads = [[torch.tensor([1.0, 0.0]), torch.tensor([2.0])], [None, torch.tensor([3.0])]]
    assert gram_matrix(grads).tolist() == [[5.0, 6.0], [6.0, 9.0]]


# ----------------------------------------------------------------------------- QP optimizer
def _problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(3, 4, generator=g, dtype=DT).requires_grad_(True)
    x = torch.randn(6, 4, generator=g, dtype=DT)
    y = torch.randn(6, 3, generator=g, dtype=DT)

    def losses():
        out = x @ weight.T
        return torch.stack([10 * ((out - y) ** 2).mean(), (out**2).mean() + 0.1])

    return weight, losses


def test_qp_option_gradient_equals_independent_solution():
    weight, losses = _problem()
    opt = Balanced([weight], weighting="qp", max_norm=0.0, min_losses=-1.0)
    values = losses()
    opt.backward_with_task_balancing(values, [weight])
    grad = weight.grad.clone()
    # Independent: log-loss gradients, 2-task closed form, clip, renormalised combination.
    raw = [torch.autograd.grad(losses()[i], weight)[0] for i in range(2)]
    gaps = values.detach() + 1.0 + 1e-8
    g1, g2 = (raw[i].flatten() / gaps[i] for i in range(2))
    w1 = float(((g2 @ g2 - g1 @ g2) / ((g1 - g2) @ (g1 - g2))).clamp(0, 1))
    w = torch.tensor([w1, 1 - w1], dtype=DT)
    a = (w / gaps) / (w / gaps).sum()
    torch.testing.assert_close(grad, a[0] * raw[0] + a[1] * raw[1], rtol=1e-6, atol=1e-12)
    assert list(opt.get_task_weights().values()) == pytest.approx([w1, 1 - w1], abs=1e-6)
    # get_weighted_loss path (one more backward) gives the same gradient.
    weight.grad = None
    opt.get_weighted_loss(losses()).backward()
    torch.testing.assert_close(weight.grad, grad, rtol=1e-6, atol=1e-12)
    assert not opt.needs_second_forward
    opt.update_task_weights(losses().detach())  # documented no-op


def test_qp_optimizer_trains_and_skips_non_finite():
    weight, losses = _problem()
    opt = build_optimizer("qp", [weight], lr=1e-2)
    start = losses().sum().item()
    for _ in range(30):
        opt.zero_grad()
        opt.backward_with_task_balancing(losses(), [weight])
        opt.step()
    assert losses().sum().item() < start
    opt.zero_grad()
    before = weight.detach().clone()
    opt.backward_with_task_balancing(torch.tensor([float("nan"), 1.0], dtype=DT), [weight])
    opt.step()
    assert torch.equal(before, weight.detach()) and opt.skipped_steps == 1


# ----------------------------------------------------------------------------- hierarchical
def test_hierarchical_modulation_and_per_task_gammas_by_hand():
    weight = torch.zeros(2, requires_grad=True)
    opt = HierarchicalBalanced(
        [weight],
        gamma_s1=0.008,
        gamma_s2=0.006,
        gamma_s3=0.004,
        scale_weights=[0.3, 0.4, 0.3],
        min_losses=0.0,
        max_norm=0.0,
    )
    assert opt.task_modulation.tolist() == pytest.approx([0.3, 0.3, 0.4, 0.4, 0.3])
    assert opt.task_gammas.tolist() == pytest.approx([0.008, 0.008, 0.006, 0.006, 0.004])
    logits = torch.tensor([0.2, -0.1, 0.3, 0.0, -0.4])
    with torch.no_grad():
        opt.w.copy_(logits)
    coeff = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    losses = (coeff * (1 + weight.sum())) + torch.tensor(
        [1.0, 2.0, 3.0, 4.0, 5.0]
    )  # w=0 -> 2,4,6,8,10
    opt.get_weighted_loss(losses).backward()
    z = torch.softmax(logits, 0)
    zm = z * torch.tensor([0.3, 0.3, 0.4, 0.4, 0.3])
    zm = zm / zm.sum()
    values = torch.tensor([2.0, 4.0, 6.0, 8.0, 10.0])
    a = (zm / values) / (zm / values).sum()
    assert weight.grad.tolist() == pytest.approx([float((a * coeff).sum())] * 2, rel=1e-6)
    # One logit step by hand: VJP with per-task gammas, then Adam's first step (lr * sign).
    after = torch.tensor([1.5, 3.0, 5.0, 7.0, 9.5])
    opt.step()
    opt.update_task_weights(after)
    delta = torch.log(values + 1e-8) - torch.log(after + 1e-8)
    grad_w = z * (delta - (z * delta).sum()) + opt.task_gammas * logits
    expected = logits - 0.025 * grad_w / (grad_w.abs() + 1e-8 * torch.sqrt(torch.tensor(0.001)))
    assert opt.w.detach().tolist() == pytest.approx(expected.tolist(), abs=1e-6)
    contributions = opt.get_scale_contributions()
    z_now = torch.softmax(opt.w.detach(), 0)
    assert contributions == pytest.approx(
        {"s1": float(z_now[0] + z_now[1]), "s2": float(z_now[2] + z_now[3]), "s3": float(z_now[4])}
    )
    assert sum(contributions.values()) == pytest.approx(1.0)
    assert list(opt.get_task_weights()) == [
        "s1_distortion",
        "s1_bpp",
        "s2_distortion",
        "s2_bpp",
        "s3_bpp",
    ]


def test_equal_scale_weights_reduce_to_balanced_with_task_gammas():
    def run(make):
        weight = torch.linspace(-1, 1, 6, dtype=DT).requires_grad_(True)
        opt = make(weight)
        for k in range(6):
            opt.zero_grad()
            losses = torch.stack(
                [(weight**2).sum() * (i + 1) + (weight * k).sum() ** 2 / 5 + i for i in range(5)]
            )
            opt.backward_with_task_balancing(losses, [weight])
            opt.step()
            opt.update_task_weights(
                torch.stack([(weight**2).sum() * (i + 1) + i for i in range(5)]).detach()
            )
        return weight.detach(), opt.w.detach()

    hw, hz = run(
        lambda p: HierarchicalBalanced(
            [p], lr=1e-2, scale_weights=[0.2, 0.2, 0.2], gamma_s1=0.01, gamma_s2=0.01, gamma_s3=0.01
        )
    )
    bw, bz = run(lambda p: Balanced([p], lr=1e-2, n_tasks=5, gamma=0.01))
    torch.testing.assert_close(hw, bw, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(hz, bz, rtol=1e-5, atol=1e-7)


def test_set_scale_gammas_and_state_round_trip():
    weight = torch.ones(3, requires_grad=True)
    opt = HierarchicalBalanced([weight], scale_weights=[0.5, 0.3, 0.2])
    opt.set_scale_gammas(0.001, 0.002, 0.003)
    assert opt.scale_gammas == pytest.approx({"s1": 0.001, "s2": 0.002, "s3": 0.003})
    opt.zero_grad()
    opt.backward_with_task_balancing(
        torch.stack([weight.sum() * (i + 1) for i in range(5)]), [weight]
    )
    opt.step()
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    fresh = HierarchicalBalanced([torch.ones(3, requires_grad=True)])
    fresh.load_state_dict(torch.load(buffer, weights_only=False))
    assert fresh.scale_weights == [0.5, 0.3, 0.2]
    assert fresh.scale_gammas == pytest.approx(opt.scale_gammas)
    with pytest.raises(ValueError, match="n_tasks=5"):
        HierarchicalBalanced([weight], n_tasks=2)
    with pytest.raises(ValueError, match="scale_weights"):
        opt.set_scale_weights([0.5, 0.5])
    with pytest.raises(ValueError, match="shape"):
        opt.get_weighted_loss(torch.ones(2))


# ----------------------------------------------------------------------------- CautiousAdam details
def test_cautious_scale_is_capped_at_ten():
    p = torch.zeros(100, requires_grad=True)
    opt = CautiousAdam([p], lr=1.0)
    p.grad = torch.zeros(100)
    p.grad[0] = 1.0  # one agreeing element: mean(phi) = 0.01 -> 1/0.01 = 100 -> capped at 10
    opt.step()
    # step 1: m = 0.1 g, v = 0.001 g^2, update = lr/(1-0.9) * m * 10 / (sqrt(v)/sqrt(0.001) + eps)
    assert float(p.detach()[0]) == pytest.approx(-10.0 / (1 + 1e-8), rel=1e-6)
    assert float(p.detach()[1:].abs().max()) == 0.0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_parameters_update_via_fp32_grads(dtype):
    p = torch.ones(4, dtype=dtype, requires_grad=True)
    q = torch.ones(4, requires_grad=True)
    grad = torch.tensor([0.5, -1.0, 2.0, 0.25])
    a, b = CautiousAdam([p], lr=0.1), CautiousAdam([q], lr=0.1)
    for _ in range(3):
        p.grad = grad.to(dtype)
        q.grad = grad.to(dtype).float()
        a.step()
        b.step()
    assert p.dtype == dtype and a.state[p]["exp_avg"].dtype == dtype
    torch.testing.assert_close(p.detach().float(), q.detach(), rtol=2e-2, atol=0)
    assert not torch.equal(q.detach(), torch.ones(4))


def test_weight_decay_is_decoupled_and_cautious_flag():
    p = torch.full((3,), 2.0, requires_grad=True)
    opt = CautiousAdam([p], lr=0.1, weight_decay=0.5, cautious=False)
    p.grad = torch.zeros(3)
    opt.step()
    assert p.detach().tolist() == pytest.approx([2.0 * (1 - 0.05)] * 3)
    with pytest.raises(ValueError, match="beta"):
        CautiousAdam([p], betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="weight_decay"):
        CautiousAdam([p], weight_decay=-1)


@pytest.mark.parametrize("amsgrad", [False, True])
def test_cautious_adam_state_round_trip_is_exact(amsgrad):
    def run(split):
        g = torch.Generator().manual_seed(5)
        p = torch.randn(4, 3, generator=g).requires_grad_(True)
        opt = CautiousAdam([p], lr=1e-2, amsgrad=amsgrad, weight_decay=0.01)
        grads = [torch.randn(4, 3, generator=g) for _ in range(12)]
        for k, grad in enumerate(grads):
            if split is not None and k == split:
                buffer = io.BytesIO()
                torch.save({"p": p.detach().clone(), "opt": opt.state_dict()}, buffer)
                buffer.seek(0)
                saved = torch.load(buffer)
                p = saved["p"].clone().requires_grad_(True)
                opt = CautiousAdam([p], lr=1e-2, amsgrad=amsgrad, weight_decay=0.01)
                opt.load_state_dict(saved["opt"])
            p.grad = grad
            opt.step()
        return p.detach()

    assert torch.equal(run(None), run(5))


def test_build_optimizer_names_and_gamma_property():
    p = torch.zeros(2, requires_grad=True)
    assert isinstance(build_optimizer("cautious_adam", [p], 1e-3), CautiousAdam)
    assert (
        build_optimizer("adam", [p], 1e-3).defaults["fused"] is True
    )  # training relies on found_inf
    hier = build_optimizer(
        "hierarchical_balanced",
        [p],
        1e-3,
        gammas=[0.004, 0.006, 0.008],
        scale_weights=[0.2, 0.3, 0.5],
    )
    assert hier.scale_gammas == pytest.approx({"s1": 0.004, "s2": 0.006, "s3": 0.008})
    assert hier.gamma == pytest.approx(0.006)  # the seed's average gamma
    balanced = build_optimizer("balanced", [p], 1e-3, gamma=0.001, update_mode="next_batch")
    balanced.gamma = 0.0025
    assert balanced.task_gammas.tolist() == pytest.approx([0.0025, 0.0025])
    with pytest.raises(ValueError, match="gamma"):
        balanced.gamma = -1.0
    with pytest.raises(ValueError, match="hierarchical_balanced"):
        build_optimizer("sgd", [p], 1e-3)
