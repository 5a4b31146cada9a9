"""CautiousAdam with several param groups (Phase 4): the same numbers as one group, and the CPU
flat moment buffers kept per group instead of rebuilt by the other group every step."""

from __future__ import annotations

import torch

from hpcm.optim import CautiousAdam, cautious_native


def test_two_groups_step_like_one_group_and_keep_their_flat_buffers():
    torch.manual_seed(0)
    shapes = [(4, 3), (5,), (2, 2, 2), (7,)]
    start = [torch.randn(s) for s in shapes]
    grads = [[torch.randn(s) for s in shapes] for _ in range(4)]
    one = [p.clone().requires_grad_() for p in start]
    two = [p.clone().requires_grad_() for p in start]
    opt_one = CautiousAdam(one, lr=1e-2)
    opt_two = CautiousAdam([{"params": two[:2]}, {"params": two[2:], "lr": 1e-2}], lr=1e-2)
    buffers = None
    for step_grads in grads:
        for params in (one, two):
            for p, g in zip(params, step_grads):
                p.grad = g.clone()
        opt_one.step()
        opt_two.step()
        if cautious_native.unavailable_reason() is None:
            current = {k: flat.buffers["exp_avg"] for k, flat in opt_two._flat_moments.items()}
            assert len(current) == 2  # one per group
            if buffers is not None:
                assert all(current[k] is buffers[k] for k in current), "a group's flat buffer was rebuilt"
            buffers = current
    for a, b in zip(one, two):
        assert torch.equal(a, b)
