"""One training update for every optimizer of ``build_optimizer``: backward, clip, skip, step.

The training loop calls only ``backward_and_step``, which reads top to bottom: the Balanced
optimizers (a task-loss vector, ``OptimizerSpec.task_weights``) take the FAMO / QP backward, the
parameter step and the task-weight update; every other optimizer takes the plain backward, the
clip and one step, skipped on the device where it can be (torch's fused Adam, CautiousAdam's
``sync_free`` path on CUDA) and after one host read otherwise.

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
    device (1.0 when this step was skipped) for the plain-loss optimizers, and None for the
    Balanced optimizers, which count their own skips (``skipped_steps``).

    ``average_gradients`` (data-parallel training, ``hpcm.train.distributed``) averages gradients
    over the processes in place, after the backward and before the clip, so the clip's norm and the
    skip decision are the same on every process.
    """
    if isinstance(optimizer, Balanced):
        if task_losses is None:
            raise ValueError(
                f"backward_and_step: {type(optimizer).__name__} weights task losses; "
                "pass the task vector (its spec's task_names) as task_losses"
            )
        # 1. the surrogate's backward (FAMO) or one backward per task and the QP weights; the
        #    gradient average; the clip to the optimizer's max_norm
        optimizer.backward_with_task_balancing(
            task_losses, params, average_gradients=average_gradients
        )
        # 2. the Cautious Adam step, skipped (and counted) on non-finite losses or gradients
        optimizer.step(task_losses=task_losses)
        # 3. same_batch FAMO: the logits' update from the updated model's losses on this batch.
        #    Also after a skipped step (the update then counts a skipped weight update): sync_free
        #    (CUDA) cannot know on the host that the step was skipped, and the forward draws
        #    quantisation noise, so both paths must run it to stay on the same random stream.
        if optimizer.needs_second_forward:
            with torch.no_grad():
                new_tasks = reevaluate()
            optimizer.update_task_weights(new_tasks.detach())
        return None

    loss.backward()
    if average_gradients is not None:
        average_gradients([p.grad for p in params])
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm or math.inf)
    found_inf = (~torch.isfinite(norm)).float()
    if isinstance(optimizer, CautiousAdam) and optimizer.sync_free:
        # CUDA: the skip is decided on the device, from the clip's norm
        optimizer.sync_free_step(grads_are_finite=torch.isfinite(norm))
    elif isinstance(optimizer, torch.optim.Adam) and optimizer.defaults.get("fused"):
        # torch's fused Adam skips on the device when ``found_inf`` is set (GradScaler's protocol)
        optimizer.found_inf = found_inf
        optimizer.step()
    elif not bool(found_inf):  # every other optimizer (CautiousAdam on CPU): one scalar read
        optimizer.step()
    return found_inf
