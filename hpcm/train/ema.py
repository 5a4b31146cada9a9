"""Exponential moving average of the model weights (run-config key ``ema_decay``; 0 = off).

``torch.optim.swa_utils.AveragedModel`` with ``get_ema_multi_avg_fn(decay)``: after every optimizer
step ``ema = decay * ema + (1 - decay) * weights`` (one ``_foreach_lerp_``), starting from the
weights the run starts with (fresh init, ``init_checkpoint``), so after T steps
``ema_T = decay**T * w_0 + sum_t (1 - decay) * decay**(T - t) * w_t``.

Parameters are averaged; buffers are not (``use_buffers=False``): HPCM's buffers are constants and
entropy-coder tables, not running statistics, and AveragedModel copies them from the live model at
every update. The averaged copy lives on the model's device; its ``n_averaged`` counter stays on
the CPU (AveragedModel's default), so reading it is no device synchronisation.

The official Balanced R-D trainer (``balanced-rd/train_balanced.py`` in
yutendo0714/LIC-HPCM-Balanced) uses ``torch_ema.ExponentialMovingAverage(net.parameters(),
decay=0.999)`` with torch_ema's default
``use_num_updates=True``: its effective decay is ``min(0.999, (1 + n) / (10 + n))`` at update n, a
warm-up that reaches 0.999 after 8,990 updates. This module keeps the constant decay of
``get_ema_multi_avg_fn`` (no warm-up); see docs/workflow.md for the rest of the comparison.
"""

from __future__ import annotations

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn


def build_ema(model: torch.nn.Module, decay: float) -> AveragedModel | None:
    """The moving average of ``model``'s parameters, starting at their current values; None when
    decay is 0."""
    if decay == 0:
        return None
    if not 0 < decay < 1:
        raise ValueError(f"ema_decay = {decay!r}: must be 0 (off) or in (0, 1)")
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=False)
    ema.module.requires_grad_(False)  # never trained, only averaged (and validated under no_grad)
    ema.update_parameters(
        model
    )  # n_averaged 0: a copy, so the average starts at w_0 (as torch_ema's shadow)
    return ema
