"""The fast paths of CautiousAdam / Balanced agree exactly with the plain per-tensor loop.

The list-kernel update (``foreach``) rewrites two steps of the official maths (mask mean as
count/numel, m*(phi*s) as (m*s)*phi); both are exact, so the two paths must agree bit for bit.
So must the C kernel (``fused=True``, the CPU default); ``sync_free`` is tested in
test_sync_free.py. (A torch path on flat buffers was removed: benchmarks/cautious_paths.py
measured it at 9.0 ms against the kernel's 3.1 ms, and it only ran where the kernel could not.)
"""

from __future__ import annotations

import io

import pytest
import torch

import hpcm.optim.cautious_adam as cautious_module
from hpcm.optim import Balanced, CautiousAdam
from tests.optim.kernel import needs_kernel

SHAPES = [(7, 5), (13,), (3, 4, 2, 2), (1,), (33,)]


def make_params(seed: int = 0, dtype=torch.float32) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [
        torch.randn(shape, generator=generator, dtype=dtype).requires_grad_(True)
        for shape in SHAPES
    ]


def run_steps(params, opt, steps: int, seed: int = 1, skip_first_grad_until: int = 0) -> None:
    """Random gradients; the first parameter gets no gradient for the first steps (step counts
    differ)."""
    generator = torch.Generator().manual_seed(seed)
    for t in range(steps):
        for i, p in enumerate(params):
            grad = torch.randn(p.shape, generator=generator, dtype=torch.float32).to(p.dtype)
            grad[..., 0] = 0.0  # exact zeros: m*g == 0 is outside the mask
            p.grad = None if (i == 0 and t < skip_first_grad_until) else grad
        opt.step()


FAST_PATHS = {"foreach": dict(foreach=True), "native": dict(fused=True)}


@pytest.mark.parametrize(
    "fast",
    [pytest.param(name, marks=needs_kernel if name == "native" else ()) for name in FAST_PATHS],
)
@pytest.mark.parametrize("cautious", [True, False])
@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("skip", [0, 3], ids=["same_steps", "differing_steps"])
def test_fast_paths_equal_single_tensor_path_bitwise(fast, cautious, amsgrad, weight_decay, skip):
    """foreach=True: list kernels; fused=True (CPU): the C kernel while steps agree."""
    results = []
    for options in (dict(foreach=False), FAST_PATHS[fast]):
        params = make_params()
        opt = CautiousAdam(
            params,
            lr=1e-2,
            weight_decay=weight_decay,
            amsgrad=amsgrad,
            cautious=cautious,
            **options,
        )
        run_steps(params, opt, steps=12, skip_first_grad_until=skip)
        results.append((params, opt))
    (p_single, o_single), (p_foreach, o_foreach) = results
    for a, b in zip(p_single, p_foreach):
        assert torch.equal(a, b)
        for key in o_single.state[a]:
            assert torch.equal(
                torch.as_tensor(o_single.state[a][key]), torch.as_tensor(o_foreach.state[b][key])
            )


@pytest.mark.parametrize("host_scales", [False, True])
def test_device_and_host_rescale_variants_equal_single_tensor_path(monkeypatch, host_scales):
    """The accelerator branch (rescales kept on the device) is exercised on CPU too."""
    original = cautious_module.foreach_update

    def forced(*args, **kwargs):
        return original(*args, **kwargs, host_scales=host_scales)

    reference = make_params()
    run_steps(
        reference, CautiousAdam(reference, lr=1e-2, foreach=False), steps=8, skip_first_grad_until=2
    )
    monkeypatch.setattr(cautious_module, "foreach_update", forced)
    params = make_params()
    run_steps(params, CautiousAdam(params, lr=1e-2), steps=8, skip_first_grad_until=2)
    assert all(torch.equal(a, b) for a, b in zip(reference, params))


def test_mixed_dtypes_are_grouped_and_each_group_matches():
    """float32 and float64 parameters in one group: each dtype bucket gives the per-tensor
    result."""

    def build():
        return make_params(0) + make_params(1, dtype=torch.float64)

    reference, params = build(), build()
    run_steps(reference, CautiousAdam(reference, lr=1e-2, foreach=False), steps=6)
    run_steps(params, CautiousAdam(params, lr=1e-2), steps=6)
    assert all(a.dtype == b.dtype and torch.equal(a, b) for a, b in zip(reference, params))


def test_balanced_step_single_sync_keeps_skip_behaviour():
    """step(task_losses=...) re-stores finite losses and still skips non-finite gradients."""
    params = make_params()
    opt = Balanced(params, lr=1e-2, max_norm=0.0, update_mode="next_batch")
    for p in params:
        p.grad = torch.ones_like(p)
    opt._skip_next_step = False
    losses = torch.tensor([2.0, 3.0])
    opt.step(task_losses=losses)
    assert not opt.last_step_skipped and torch.equal(opt.prev_loss, losses)
    before = [p.detach().clone() for p in params]
    params[2].grad[0, 0, 0, 0] = float("nan")
    opt.step(task_losses=torch.tensor([5.0, float("inf")]))
    assert opt.last_step_skipped and opt.skipped_steps == 1
    assert torch.equal(opt.prev_loss, losses)  # non-finite task_losses are not stored
    assert all(torch.equal(a, b.detach()) for a, b in zip(before, params))


def test_default_path_state_dict_resume_equals_uninterrupted():
    """A saved and reloaded state continues identically on the CPU default path (the kernel)."""
    reference = make_params()
    run_steps(reference, CautiousAdam(reference, lr=1e-2), steps=10, seed=5)
    first = make_params()
    opt = CautiousAdam(first, lr=1e-2)
    generator_steps = 4
    run_steps(first, opt, steps=generator_steps, seed=5)
    buffer = io.BytesIO()
    torch.save({"params": [p.detach() for p in first], "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer)
    resumed = [p.clone().requires_grad_(True) for p in saved["params"]]
    opt2 = CautiousAdam(resumed, lr=1e-2)
    opt2.load_state_dict(saved["opt"])
    # replay the same gradient stream: skip the first generator_steps draws
    generator = torch.Generator().manual_seed(5)
    for t in range(10):
        grads = []
        for p in resumed:
            grad = torch.randn(p.shape, generator=generator, dtype=torch.float32)
            grad[..., 0] = 0.0
            grads.append(grad)
        if t < generator_steps:
            continue
        for p, g in zip(resumed, grads):
            p.grad = g
        opt2.step()
    assert all(torch.equal(a, b) for a, b in zip(reference, resumed))
    # the state entries stay per-parameter tensors of the parameter's shape
    assert all(opt2.state[p]["exp_avg"].shape == p.shape for p in resumed)


def test_default_path_follows_replaced_state_entries():
    """A state entry replaced from outside is the one the next step updates, not ignored."""
    params, reference = make_params(), make_params()
    opt, opt_ref = CautiousAdam(params, lr=1e-2), CautiousAdam(reference, lr=1e-2, foreach=False)
    run_steps(params, opt, steps=3)
    run_steps(reference, opt_ref, steps=3)
    for p, q in zip(params, reference):
        opt.state[p]["exp_avg"] = opt.state[p]["exp_avg"].clone() * 0.5
        opt_ref.state[q]["exp_avg"].mul_(0.5)
    run_steps(params, opt, steps=3, seed=2)
    run_steps(reference, opt_ref, steps=3, seed=2)
    assert all(torch.equal(a, b) for a, b in zip(reference, params))
