"""Cautious Adam with the skip decision on the device: no host synchronisation per step.

The default path decides "skip this batch?" on the host (one ``.item()``), and keeps the step
counter as a Python int. On CUDA that sync stalls the launch queue every step. Here:

* ``ok`` is a 0-dim bool tensor (all gradients finite, and whatever the caller adds);
* the update runs in place, with the host path's list kernels, and is gated through its
  inputs, not by saving and restoring the state: the gradients enter as ``where(ok, g, 0)``
  (one ``cat`` and one ``where`` over all of them, so a NaN cannot leak), the moment decays and
  the step size are ``where(ok, value, neutral)`` 0-dim tensors (1 for the decays, 0 for the step
  size and the weight decay). A skipped step therefore computes m*1 + 0, v*1 + 0, p*1 + 0*d:
  every value is unchanged (up to the sign of a zero). An applied step performs exactly the host
  path's operations on the same values;
* the step counter is a float32 0-dim device tensor (exact up to 2^24 steps) that grows by ``ok``;
* the bias corrections are looked up, by that counter, in float64 tables computed on the host
  with Python's ``math`` (exactly the doubles of the default path), then rounded to float32 as
  the list kernels round a Python scalar. The table is extended (one host-to-device copy) when
  the number of attempted steps outgrows it, which happens once per doubling;
* when every tensor of a bucket is known (on the host) to be at the same step, one 0-dim factor
  serves the whole list, so each list kernel takes its multi-tensor fast path on CUDA; otherwise
  (a resumed state at mixed steps, parameters without gradients at some steps) the factors are
  per tensor.

The final ``p += step_size * direction`` is ``apply_step`` (shared with the host path's list
kernels, ``cautious_math.foreach_update``), so both round identically on every device.
"""

from __future__ import annotations

import math

import torch

from hpcm.optim.cautious_math import apply_step, scale_direction

TABLE_START = 1024


class BiasTables:
    """(1 - b1^k) and sqrt(1 - b2^k) for k = 0..size-1, in float64 on one device."""

    def __init__(self, beta1: float, beta2: float, device: torch.device):
        self.beta1, self.beta2, self.device = beta1, beta2, device
        self.size = 0
        self.bc1 = self.bc2_sqrt = None

    def ensure(self, max_step: int) -> None:
        if max_step < self.size:
            return
        size = max(TABLE_START, self.size)
        while size <= max_step:
            size *= 2
        steps = range(size)
        # step 0 never reaches an applied update (the counter is >= 1 when ok); 1.0 keeps it finite
        self.bc1 = torch.tensor([1 - self.beta1**k if k else 1.0 for k in steps], dtype=torch.float64,
                                device=self.device)
        self.bc2_sqrt = torch.tensor([math.sqrt(1 - self.beta2**k) if k else 1.0 for k in steps],
                                     dtype=torch.float64, device=self.device)
        self.size = size


def grads_finite(grads: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """0-dim bool on ``device``: every element of every gradient is finite (no sync)."""
    if not grads:
        return torch.ones((), dtype=torch.bool, device=device)
    norms = torch._foreach_norm(grads, 2.0)  # a norm is finite exactly when every element is
    return torch.isfinite(torch.stack([n.float().to(device) for n in norms])).all()


def gated_gradients(grads: list[torch.Tensor], ok: torch.Tensor) -> list[torch.Tensor]:
    """``where(ok, g, 0)`` for every gradient, with each result strided as its gradient.

    One ``cat`` of the gradients in memory order and one ``where``; each result is a view of the
    flat buffer, permuted back to its gradient's layout (channels_last stays channels_last, so
    the list kernels keep their fast path).
    """
    orders = [memory_order(g) for g in grads]
    flat = torch.cat([g.permute(order).reshape(-1) for g, order in zip(grads, orders)])
    flat = torch.where(ok, flat, torch.zeros((), dtype=flat.dtype, device=flat.device))
    out = []
    for chunk, g, order in zip(flat.split([g.numel() for g in grads]), grads, orders):
        permuted_shape = [g.shape[d] for d in order]
        out.append(chunk.view(permuted_shape).permute(inverse(order)))
    return out


def memory_order(t: torch.Tensor) -> list[int]:
    """The dims of a dense tensor from outermost to innermost in memory (a contiguous permutation)."""
    if t.is_contiguous():
        return list(range(t.dim()))
    order = sorted(range(t.dim()), key=lambda d: (-t.stride(d), -t.shape[d]))
    if not t.permute(order).is_contiguous():
        raise RuntimeError(f"sync_free CautiousAdam needs dense gradients, got strides {t.stride()} "
                           f"for shape {tuple(t.shape)}")
    return order


def inverse(order: list[int]) -> list[int]:
    result = [0] * len(order)
    for position, dim in enumerate(order):
        result[dim] = position
    return result


class GateConstants:
    """0-dim float32 constants on one device (built once: a fresh tensor per step would be a copy)."""

    def __init__(self, device: torch.device):
        self.device = device
        self._values: dict[float, torch.Tensor] = {}

    def __call__(self, value: float) -> torch.Tensor:
        tensor = self._values.get(value)
        if tensor is None:
            tensor = self._values[value] = torch.full((), value, dtype=torch.float32, device=self.device)
        return tensor


def sync_free_update(
    params, grads, exp_avgs, exp_avg_sqs, max_sqs, steps: torch.Tensor, ok: torch.Tensor,
    tables: BiasTables, constants: GateConstants, *, uniform: bool, amsgrad: bool, cautious: bool,
    beta1: float, beta2: float, lr: float, weight_decay: float, eps: float,
) -> None:
    """One Cautious Adam step in place, applied only where ``ok`` (see the module docstring).

    ``steps``: the tensors' step counters stacked (already advanced by ``ok``); ``uniform``: the
    host knows they are all equal, so ``steps[0]`` serves all.
    """
    def gate(value: float, neutral: float) -> torch.Tensor:
        return torch.where(ok, constants(value), constants(neutral))

    index = (steps[:1] if uniform else steps).long()
    # the host path's double scalars, rounded to float32 the same way
    bc2 = tables.bc2_sqrt[index].float()
    step_size = torch.where(ok, (-(lr / tables.bc1[index])).float(), constants(0.0))
    if uniform:
        bc2, step_size = bc2.view(()), step_size.view(())
    else:
        bc2, step_size = list(bc2.unbind(0)), list(step_size.unbind(0))
    grads = gated_gradients(grads, ok)
    if weight_decay != 0:
        torch._foreach_mul_(params, gate(1 - lr * weight_decay, 1.0))
    torch._foreach_mul_(exp_avgs, gate(beta1, 1.0))
    torch._foreach_add_(exp_avgs, grads, alpha=1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, gate(beta2, 1.0))
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
    if amsgrad:  # unchanged when skipped: max_sqs >= exp_avg_sqs already
        torch._foreach_maximum_(max_sqs, exp_avg_sqs)
    denom = torch._foreach_sqrt(max_sqs if amsgrad else exp_avg_sqs)
    torch._foreach_div_(denom, bc2)
    torch._foreach_add_(denom, eps)
    direction = scale_direction(exp_avgs, grads, cautious=cautious, host_scales=False)
    torch._foreach_div_(direction, denom)
    apply_step(params, direction, step_size)
