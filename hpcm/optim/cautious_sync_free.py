"""Cautious Adam with the skip decision on the device: no host synchronisation per step.

The default path decides "skip this batch?" on the host (one ``.item()``), and keeps the step
counter as a Python int. On CUDA that sync stalls the launch queue every step. Here:

* ``ok`` is a 0-dim bool tensor (all gradients finite, and whatever the caller adds);
* the new moments and parameters are computed out of place and committed with
  ``torch.where(ok, new, old)`` (over the concatenated list, then one list copy), so a skipped
  step leaves every value bit-identical;
* the step counter is a float32 0-dim device tensor (exact up to 2^24 steps) that grows by ``ok``;
* the bias corrections are looked up, by that counter, in float64 tables computed on the host
  with Python's ``math`` (exactly the doubles of the default path), so the update is bitwise
  equal to ``_foreach_update`` (same IEEE operations per element; the scalar factors are the
  same doubles rounded to float32; ``add(alpha=a)`` and ``addcmul(a)`` are the same fused
  multiply-add). The table is extended (one host-to-device copy) when the number of attempted
  steps outgrows it, which happens once per doubling.
"""

from __future__ import annotations

import math

import torch

from hpcm.optim.cautious_math import element_counts

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
        # step 0 never reaches the update (the counter is >= 1 when ok); 1.0 keeps it finite
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


def sync_free_update(
    params, grads, exp_avgs, exp_avg_sqs, max_sqs, steps: torch.Tensor, ok: torch.Tensor,
    tables: BiasTables, *, amsgrad: bool, cautious: bool, beta1: float, beta2: float, lr: float,
    weight_decay: float, eps: float, mask_mean_floor: float, mask_scale_cap: float,
) -> None:
    """One Cautious Adam step; ``steps`` (one per tensor, already advanced by ``ok``) on the device."""
    index = steps.long()
    # the host path's double scalars, rounded to float32 the same way
    bc2 = list(tables.bc2_sqrt[index].float().unbind(0))
    neg_step_size = list((-(lr / tables.bc1[index])).float().unbind(0))
    new_m = torch._foreach_mul(exp_avgs, beta1)
    torch._foreach_add_(new_m, grads, alpha=1 - beta1)
    new_v = torch._foreach_mul(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(new_v, grads, grads, value=1 - beta2)
    second = new_v
    if amsgrad:
        second = torch._foreach_maximum(max_sqs, new_v)
    denom = torch._foreach_sqrt(second)
    torch._foreach_div_(denom, bc2)
    torch._foreach_add_(denom, eps)
    if cautious:
        mask = torch._foreach_mul(new_m, grads)
        torch._foreach_sign_(mask)
        torch._foreach_clamp_min_(mask, 0.0)
        counts = torch.stack([m.sum() for m in mask])
        numels = element_counts(tuple(m.numel() for m in mask), counts.dtype, counts.device)
        scales = (1 / (counts / numels).clamp_(min=mask_mean_floor)).clamp_(max=mask_scale_cap)
        direction = torch._foreach_mul(new_m, list(scales.unbind(0)))
        torch._foreach_mul_(direction, mask)
        del mask
    else:
        direction = torch._foreach_mul(new_m, 1.0)
    torch._foreach_div_(direction, denom)
    new_p = torch._foreach_mul(params, 1 - lr * weight_decay) if weight_decay != 0 else \
        [p.clone() for p in params]
    torch._foreach_addcmul_(new_p, direction, neg_step_size)
    targets = [(params, new_p), (exp_avgs, new_m), (exp_avg_sqs, new_v)]
    if amsgrad:
        targets.append((max_sqs, second))
    for olds, news in targets:
        commit_where(ok, olds, news)


def commit_where(ok: torch.Tensor, olds: list[torch.Tensor], news: list[torch.Tensor]) -> None:
    """olds <- where(ok, news, olds), exactly, in a few whole-list kernels.

    One ``where`` per tensor would be ~2 launches x (params + moments) per step on CUDA; a
    blend such as lerp is not exact (and NaN in a rejected update would leak through it).
    """
    chosen = torch.where(ok, torch.cat([t.reshape(-1) for t in news]), torch.cat([t.reshape(-1) for t in olds]))
    torch._foreach_copy_(olds, [c.view(o.shape) for c, o in zip(chosen.split([o.numel() for o in olds]), olds)])
