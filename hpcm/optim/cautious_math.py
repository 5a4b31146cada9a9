"""The arithmetic of one Cautious Adam step on tensor lists: the definition and its list-kernel form.

``single_tensor_update`` is the official per-tensor loop (``Balanced.step`` of the official code,
research/balanced.md section 2.4) and the definition every other update path is tested against,
bit for bit: ``foreach_update`` (list kernels: CUDA, and CPU buckets whose tensors are at
different steps), the C kernel (``cautious_native``, the CPU default) and the device-decided
``cautious_sync_free.sync_free_update``.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch

# Constants of the official code: the mask mean is clamped below, the rescale capped above.
MASK_MEAN_FLOOR = 1e-3
MASK_SCALE_CAP = 10.0


@lru_cache(maxsize=64)
def element_counts(numels: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Per-tensor sizes on the device, built once: a fresh ``torch.tensor(..., device=cuda)``
    every step would be a blocking host-to-device copy (a synchronisation)."""
    return torch.tensor(numels, dtype=dtype, device=device)


def single_tensor_update(
    params, grads, exp_avgs, exp_avg_sqs, max_sqs, steps, *,
    amsgrad: bool, cautious: bool, beta1: float, beta2: float, lr: float,
    weight_decay: float, eps: float,
) -> None:
    """The official per-tensor loop, written out plainly."""
    for i, param in enumerate(params):
        grad, exp_avg, exp_avg_sq, step = grads[i], exp_avgs[i], exp_avg_sqs[i], steps[i]
        if weight_decay != 0:
            param.mul_(1 - lr * weight_decay)
        exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        second = exp_avg_sq
        if amsgrad:
            torch.maximum(max_sqs[i], exp_avg_sq, out=max_sqs[i])
            second = max_sqs[i]
        denom = (second.sqrt() / math.sqrt(1 - beta2**step)).add_(eps)
        step_size = lr / (1 - beta1**step)
        if cautious:
            mask = (exp_avg * grad > 0).to(grad.dtype)
            scale = (1 / mask.mean().clamp_(min=MASK_MEAN_FLOOR)).clamp_(max=MASK_SCALE_CAP)
            direction = exp_avg * (mask * scale)
        else:
            direction = exp_avg
        param.add_(direction / denom, alpha=-step_size)


def foreach_update(
    params, grads, exp_avgs, exp_avg_sqs, max_sqs, steps, *,
    amsgrad: bool, cautious: bool, beta1: float, beta2: float, lr: float,
    weight_decay: float, eps: float, host_scales: bool | None = None,
) -> None:
    """Same maths on tensor lists: a few list kernels instead of ~10 launches per tensor.

    Bitwise equal to ``single_tensor_update`` on CPU: every element sees the same IEEE operations
    in the same order. (On an accelerator the final ``p += s * d`` is ``apply_step``'s two
    roundings, shared with the sync-free path; the per-tensor ``add(alpha=)`` may be fused there.) Two rewrites are exact: the mask mean is count/numel (a sum of 0/1 values
    is exact below 2^24 elements per tensor, as torch's mean is sum/numel), and
    m * (phi * s) is computed as (m * s) * phi (phi is exactly 0 or 1, so both round once).

    ``host_scales`` (default: on CPU only) reads the per-tensor rescales as Python floats, which
    is free on CPU and lets each rescale be a scalar argument; on an accelerator they stay on the
    device (no host synchronisation) and multiply as 0-dim tensors.
    """
    if host_scales is None:
        host_scales = params[0].device.type == "cpu"
    if weight_decay != 0:
        torch._foreach_mul_(params, 1 - lr * weight_decay)
    torch._foreach_mul_(exp_avgs, beta1)
    torch._foreach_add_(exp_avgs, grads, alpha=1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
    if amsgrad:
        torch._foreach_maximum_(max_sqs, exp_avg_sqs)
    denom = torch._foreach_sqrt(max_sqs if amsgrad else exp_avg_sqs)
    # One scalar when every tensor is at the same step (the usual case): a scalar list costs a
    # wrapped-tensor copy per tensor on CPU.
    same_step = len(set(steps)) == 1
    torch._foreach_div_(denom, math.sqrt(1 - beta2**steps[0]) if same_step
                        else [math.sqrt(1 - beta2**s) for s in steps])
    torch._foreach_add_(denom, eps)
    direction = scale_direction(exp_avgs, grads, cautious=cautious, host_scales=host_scales)
    torch._foreach_div_(direction, denom)
    if same_step:
        apply_step(params, direction, -(lr / (1 - beta1**steps[0])))
    else:  # one call per distinct step
        for step in sorted(set(steps)):
            index = [i for i, s in enumerate(steps) if s == step]
            apply_step([params[i] for i in index], [direction[i] for i in index], -(lr / (1 - beta1**step)))


def scale_direction(exp_avgs, grads, *, cautious: bool, host_scales: bool) -> list[torch.Tensor]:
    """m * phi * s per tensor (a new list): the Cautious mask and its rescale, or m itself.

    phi = 1[m*g > 0] is computed as clamp(sign(m*g), 0): exactly 0 or 1. ``host_scales`` reads
    the per-tensor rescales as Python floats (free on CPU); otherwise they stay on the device.
    """
    if not cautious:
        return torch._foreach_mul(exp_avgs, 1.0)
    mask = torch._foreach_mul(exp_avgs, grads)
    torch._foreach_sign_(mask)
    torch._foreach_clamp_min_(mask, 0.0)
    if host_scales:  # per-tensor sums are cheaper than the generic norm kernel on CPU
        counts = torch.stack([m.sum() for m in mask])
    else:  # the L1 norm of a 0/1 tensor is its count of ones (one fused kernel on CUDA)
        counts = torch.stack(torch._foreach_norm(mask, 1))
    numels = element_counts(tuple(m.numel() for m in mask), counts.dtype, counts.device)
    scales = (1 / (counts / numels).clamp_(min=MASK_MEAN_FLOOR)).clamp_(max=MASK_SCALE_CAP)
    direction = torch._foreach_mul(exp_avgs, scales.tolist() if host_scales else list(scales.unbind(0)))
    torch._foreach_mul_(direction, mask)
    return direction


def apply_step(params: list[torch.Tensor], direction: list[torch.Tensor],
               step_size: float | torch.Tensor | list[torch.Tensor]) -> None:
    """params += step_size * direction, rounded the same way whatever form ``step_size`` takes.

    The host paths pass a Python float, the sync-free path a float32 device tensor (0-dim, or one
    per tensor). On CPU, ``add(alpha=s)`` and ``addcmul(d, s)`` round alike (one fused multiply-add
    where ATen's CPU capability has it, two roundings where it has not), as the per-tensor
    definition does. On an accelerator the compiler decides whether ``p + s * d`` inside one
    kernel is fused, and the two kernels need not agree; there both forms are two list kernels,
    ``d *= s`` then ``p += d`` (two roundings, the same on every path of that device).
    """
    if params[0].device.type == "cpu":
        if isinstance(step_size, float):
            torch._foreach_add_(params, direction, alpha=step_size)
        else:
            factors = step_size if isinstance(step_size, list) else [step_size] * len(params)
            torch._foreach_addcmul_(params, direction, factors)
        return
    if isinstance(step_size, float):
        step_size = torch.full((), step_size, dtype=direction[0].dtype, device=direction[0].device)
    torch._foreach_mul_(direction, step_size)
    torch._foreach_add_(params, direction)
