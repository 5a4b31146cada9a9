"""The moments of a CPU bucket in one flat buffer per key: the memory layout of the C kernel.

The per-parameter ``state`` entries are views into the buffers, so ``state_dict`` is unchanged,
and the kernel (``cautious_native``) walks every tensor of the bucket in one call.

The buffers are rebuilt (values copied in) whenever the state entries are no longer views into
them, e.g. after ``load_state_dict`` or when the set of parameters with gradients changes.
"""

from __future__ import annotations

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
