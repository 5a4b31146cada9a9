"""CautiousAdam with several param groups (Phase 4): the same numbers as one group, and a
parameter left without gradient does not move, on every update path."""

from __future__ import annotations

import pytest
import torch

from hpcm.optim import CautiousAdam


def test_two_groups_step_like_one_group():
    torch.manual_seed(0)
    shapes = [(4, 3), (5,), (2, 2, 2), (7,)]
    start = [torch.randn(s) for s in shapes]
    grads = [[torch.randn(s) for s in shapes] for _ in range(4)]
    one = [p.clone().requires_grad_() for p in start]
    two = [p.clone().requires_grad_() for p in start]
    opt_one = CautiousAdam(one, lr=1e-2)
    opt_two = CautiousAdam([{"params": two[:2]}, {"params": two[2:], "lr": 1e-2}], lr=1e-2)
    for step_grads in grads:
        for params in (one, two):
            for p, g in zip(params, step_grads):
                p.grad = g.clone()
        opt_one.step()
        opt_two.step()
    for a, b in zip(one, two):
        assert torch.equal(a, b)


def _train_then_freeze(
    make_optimizer,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two steps with gradients on both tensors, then two with the first frozen (requires_grad off,
    grad None, as hpcm.train.phase4 freezes): (first after its last step, first at the end, second
    at the start and at the end)."""
    torch.manual_seed(1)
    frozen, trained = torch.randn(6, requires_grad=True), torch.randn(5, requires_grad=True)
    trained_start = trained.detach().clone()
    optimizer = make_optimizer([frozen, trained])
    for step in range(4):
        if step == 2:
            frozen.requires_grad_(False)
            kept = frozen.detach().clone()
        optimizer.zero_grad(set_to_none=True)
        loss = (trained**2).sum() + ((frozen**3).sum() if frozen.requires_grad else 0)
        loss.backward()
        optimizer.step()
    return kept, frozen.detach(), trained_start, trained.detach()


@pytest.mark.parametrize(
    "make_optimizer",
    [
        lambda p: torch.optim.Adam(p, lr=0.1, fused=True),
        lambda p: CautiousAdam(p, lr=0.1),  # CPU default: the C kernel (or foreach)
        lambda p: CautiousAdam(p, lr=0.1, foreach=True),
        lambda p: CautiousAdam(p, lr=0.1, foreach=False),
        lambda p: CautiousAdam(p, lr=0.1, sync_free=True),  # the CUDA path, run on CPU
    ],
    ids=[
        "torch_fused_adam",
        "cautious_default",
        "cautious_foreach",
        "cautious_single",
        "cautious_sync_free",
    ],
)
def test_a_parameter_without_gradient_does_not_move_on_its_momentum(make_optimizer):
    kept, end, trained_start, trained = _train_then_freeze(make_optimizer)
    assert torch.equal(kept, end)
    assert not torch.equal(trained, trained_start)  # the optimizer did step the other parameter
