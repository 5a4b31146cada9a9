"""One training update for every optimizer of ``build_optimizer``: backward, clip, skip, step.

The training loop calls only ``backward_and_step``; what differs between optimizers (the FAMO /
QP backward and its second forward, torch's fused Adam skipping on the device, CautiousAdam's
device-side skip on CUDA) stays here and in the optimizers, not in the loop.

A batch whose gradient norm (or, for the Balanced optimizers, whose task losses) is not finite
is skipped: the parameters and the optimizer state do not change.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from hpcm.optim.balanced import Balanced
from hpcm.optim.cautious_adam import CautiousAdam


def backward_and_step(
    optimizer: torch.optim.Optimizer,
    params: list[torch.Tensor],
    loss: torch.Tensor,
    task_losses: torch.Tensor | None,
    *,
    max_norm: float,
    reevaluate: Callable[[], torch.Tensor],
    average_gradients: Callable[[list[torch.Tensor | None]], None] | None = None,
) -> torch.Tensor | None:
    """Backward from ``loss`` (or the task vector ``task_losses`` for Balanced), clip, then step.

    ``reevaluate()`` returns the task losses of the updated model on the same batch (called,
    under no_grad, only by Balanced in ``same_batch`` mode). Returns a 0-dim float tensor on the
    device (1.0 when this step was skipped) for adam / cautious_adam, and None for the Balanced
    optimizers, which count their own skips (``skipped_steps``).

    ``average_gradients`` (data-parallel training, ``hpcm.train.distributed``) averages gradients
    over the processes in place, after the backward and before the clip, so the clip's norm and the
    skip decision are the same on every process.
    """
    if isinstance(optimizer, Balanced):
        balanced_step(optimizer, params, task_losses, reevaluate, average_gradients)
        return None
    loss.backward()
    if average_gradients is not None:
        average_gradients([p.grad for p in params])
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm or math.inf)
    found_inf = (~torch.isfinite(norm)).float()
    if isinstance(optimizer, CautiousAdam):
        if optimizer.sync_free:  # CUDA: the skip is decided on the device, from the clip's norm
            optimizer.sync_free_step(grads_are_finite=torch.isfinite(norm))
        elif not bool(found_inf):  # CPU: one scalar read (free there)
            optimizer.step()
    elif isinstance(optimizer, torch.optim.Adam) and optimizer.defaults.get("fused"):
        # torch's fused Adam skips on the device when ``found_inf`` is set (GradScaler's protocol)
        optimizer.found_inf = found_inf
        optimizer.step()
    else:
        raise TypeError(f"backward_and_step does not know {type(optimizer).__name__}; "
                        "build optimizers with hpcm.optim.build_optimizer")
    return found_inf


def balanced_step(optimizer: Balanced, params: list[torch.Tensor], task_losses: torch.Tensor,
                  reevaluate: Callable[[], torch.Tensor],
                  average_gradients: Callable[[list[torch.Tensor | None]], None] | None = None) -> None:
    """FAMO/QP backward (with the clip), the parameter step, and the official same-batch weight update."""
    optimizer.backward_with_task_balancing(task_losses, params, average_gradients=average_gradients)
    optimizer.step(task_losses=task_losses)
    # Also after a skipped step (the update then counts a skipped weight update): sync_free (CUDA)
    # cannot know on the host that the step was skipped, and the forward draws quantisation noise,
    # so both paths must run it to stay on the same random stream (bit-equal training).
    if optimizer.needs_second_forward:
        with torch.no_grad():
            new_tasks = reevaluate()
        optimizer.update_task_weights(new_tasks.detach())
