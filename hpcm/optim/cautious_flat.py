"""Cautious Adam on one flat buffer per (device, dtype) bucket: the CPU fast path.

On CPU the ``torch._foreach_*`` ops are a Python-free loop over per-tensor kernels, so an update
of ~170 tensors costs ~15 ops x 170 dispatches (about 10 ms for HPCM_Tiny) while the arithmetic
itself is a fraction of that. Here the moments live in one contiguous buffer per bucket (the
per-parameter ``state`` entries are views into it, so ``state_dict`` is unchanged), the gradients
are concatenated once, and every elementwise step is one kernel over the whole bucket.

Bitwise equal to the per-tensor loop: the same IEEE operations in the same order per element
(elementwise kernels do not depend on where a tensor starts), the mask mean is a per-tensor sum
of 0/1 values (exact below 2^24 elements per tensor) divided by its size, and m * (phi * s)
becomes (phi * s) * m with phi * s computed first, exactly as the reference does.

The buffers are rebuilt (values copied in) whenever the state entries are no longer views into
them, e.g. after ``load_state_dict`` or when the set of parameters with gradients changes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

MOMENT_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")


@dataclass
class FlatMoments:
    """Flat moment buffers of one bucket and where each parameter's slice starts."""

    params: list[torch.Tensor]  # the bucket's parameters, in order
    buffers: dict[str, torch.Tensor]
    views: dict[str, list[torch.Tensor]]  # per key, the state entries made as views of the buffer
    offsets: list[int]
    numels: list[int]
    numels_float: torch.Tensor
    scratch: tuple[torch.Tensor, torch.Tensor] | None = None  # (gradient / direction, denominator)
    native_numels: Any = None  # the numels as a ctypes array for the C kernel (cautious_native)

    def serves(self, params: list[torch.Tensor], states: list[dict], keys: tuple[str, ...]) -> bool:
        """True for the same parameters whose state entries are still the views made here
        (``load_state_dict`` or a state entry replaced from outside makes it False)."""
        if len(params) != len(self.params) or any(p is not q for p, q in zip(params, self.params)):
            return False
        for key in keys:
            views = self.views.get(key)
            if views is None or any(state[key] is not view for state, view in zip(states, views)):
                return False
        return True


def build_flat_moments(params: list[torch.Tensor], states: list[dict], keys: tuple[str, ...]) -> FlatMoments:
    """Copy the moments into flat buffers and turn the state entries into views of them."""
    numels = [p.numel() for p in params]
    offsets = [0]
    for n in numels[:-1]:
        offsets.append(offsets[-1] + n)
    buffers, views = {}, {}
    for key in keys:
        buffer = torch.cat([state[key].reshape(-1) for state in states])
        views[key] = []
        for p, state, offset, n in zip(params, states, offsets, numels):
            state[key] = buffer[offset:offset + n].view(p.shape)
            views[key].append(state[key])
        buffers[key] = buffer
    device = params[0].device
    return FlatMoments(
        params=list(params), buffers=buffers, views=views, offsets=offsets, numels=numels,
        numels_float=torch.tensor(numels, dtype=params[0].dtype, device=device),
    )


def flat_update(
    flat: FlatMoments, params: list[torch.Tensor], grads: list[torch.Tensor], step: int, *,
    amsgrad: bool, cautious: bool, beta1: float, beta2: float, lr: float, weight_decay: float,
    eps: float, mask_mean_floor: float, mask_scale_cap: float,
) -> None:
    """One Cautious Adam step of a bucket whose parameters are all at the same ``step``."""
    exp_avg, exp_avg_sq = flat.buffers["exp_avg"], flat.buffers["exp_avg_sq"]
    if flat.scratch is None:
        # Two persistent work buffers: fresh bucket-sized temporaries are fresh pages from the
        # OS on every step (page faults cost more than the arithmetic).
        flat.scratch = (torch.empty_like(exp_avg), torch.empty_like(exp_avg))
    grad, denom = flat.scratch
    torch.cat([g.reshape(-1) for g in grads], out=grad)
    if weight_decay != 0:
        torch._foreach_mul_(params, 1 - lr * weight_decay)
    exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    second = exp_avg_sq
    if amsgrad:
        second = flat.buffers["max_exp_avg_sq"]
        torch.maximum(second, exp_avg_sq, out=second)
    torch.sqrt(second, out=denom).div_(math.sqrt(1 - beta2**step)).add_(eps)
    if cautious:
        direction = grad.mul_(exp_avg).gt_(0)  # 1.0 where m*g > 0, else 0.0 (g is not needed after)
        pieces = direction.split(flat.numels)
        # Per-tensor sums and scalar multiplies: cheaper on CPU than segment_reduce and
        # repeat_interleave (an index_select over the whole bucket); this path is CPU only,
        # so reading the scales as Python floats costs no device synchronisation.
        counts = torch.stack([piece.sum() for piece in pieces])
        scales = (1 / (counts / flat.numels_float).clamp_(min=mask_mean_floor)).clamp_(max=mask_scale_cap)
        torch._foreach_mul_(list(pieces), scales.tolist())  # phi * s
        direction.mul_(exp_avg)  # (phi * s) * m: the reference's m * (phi * s)
    else:
        direction = grad.copy_(exp_avg)
    direction.div_(denom)
    chunks = [chunk.view(p.shape) for chunk, p in zip(direction.split(flat.numels), params)]
    torch._foreach_add_(params, chunks, alpha=-(lr / (1 - beta1**step)))
