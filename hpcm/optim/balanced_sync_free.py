"""Device-side flags and gating of ``Balanced`` in ``sync_free`` mode (no per-step host sync).

Every decision the default path takes with ``if`` on a host bool is a 0-dim bool tensor here,
and every state change it guards goes through ``torch.where(flag, new, old)``, which selects
bit-exactly (NaN in the unselected branch does not leak).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch


class SyncFreeFlags:
    """The per-step decisions of ``Balanced`` as device bools (see ``balanced.py``)."""

    def __init__(self, device: torch.device, n_tasks: int):
        def flag(value: bool) -> torch.Tensor:
            return torch.full((), value, dtype=torch.bool, device=device)

        self.ok_losses = flag(True)  # the last get_weighted_loss losses are usable
        self.prev_valid = flag(False)  # prev_loss holds losses (the default path's "not None")
        self.pending = flag(False)  # next_batch: a step was taken since prev_loss was stored
        self.last_skipped = flag(False)
        self.below = flag(False)  # a finite loss at or below min_losses was seen (deferred error)
        self.below_losses = torch.zeros(n_tasks, device=device)


@contextmanager
def gated(apply: torch.Tensor, params: list[torch.Tensor], optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """Run an optimizer step whose effect (parameters and optimizer state) is kept only where ``apply``.

    A state entry created by the step (first step) is reverted to zeros, which torch Adam
    treats exactly as a fresh state. The optimizer's state must live on ``apply``'s device
    (torch Adam with ``capturable=True`` on CUDA), else ``where`` would copy to the host.
    """
    with torch.no_grad():
        before = [p.detach().clone() for p in params]
        saved = [{k: v.clone() for k, v in optimizer.state[p].items() if torch.is_tensor(v)} for p in params]
    yield
    with torch.no_grad():
        for p, old in zip(params, before):
            p.copy_(torch.where(apply, p, old))
        for p, old_state in zip(params, saved):
            for key, value in optimizer.state[p].items():
                if torch.is_tensor(value):
                    old = old_state.get(key)
                    value.copy_(torch.where(apply.to(value.device), value,
                                            torch.zeros_like(value) if old is None else old))
