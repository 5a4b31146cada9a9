"""MACs of one HPCM forward pass, in total and per part (encoder / decoder), with a defensible
counter.

``torch.utils.flop_counter.FlopCounterMode`` over one eval forward; MACs = FLOPs / 2. It counts
aten convolutions and matrix products (mm, addmm, bmm, baddbmm, attention kernels) and misses
element-wise work; benchmarks/complexity.py prints the figures and explains them against the
official 918.57 kMACs/px of HPCM-Base. The summary table (``hpcm.analysis.summary``) uses them.
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

OFFICIAL_KMACS_PER_PIXEL = {"HPCM_Base": 918.57}  # lyq133/LIC-HPCM issue #12 (DeepSpeed, 256x256)
OFFICIAL_SOURCE = "lyq133/LIC-HPCM issue #12 (DeepSpeed flops profiler, 256x256)"
ENCODER_ONLY = ("g_a", "h_a")  # the decoder never runs these
DECODER_ONLY = ("g_s",)  # the encoder never runs this


def count_macs(model: torch.nn.Module, height: int = 256, width: int = 256) -> dict[str, float]:
    """MACs of one eval forward of ``model`` on a (1, 3, height, width) input, in total and per
    part.

    Returns ``{"total", "encoder", "decoder", "context", "g_a", "h_a", "h_s", "g_s"}`` in MACs
    (not per pixel): ``context`` is everything outside the four transforms.
    """
    model = model.eval()
    x = torch.rand(1, 3, height, width, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    flops = counter.get_flop_counts()
    root = type(model).__name__
    total = sum(flops["Global"].values()) / 2
    parts = {
        name: sum(flops.get(f"{root}.{name}", {}).values()) / 2
        for name in ("g_a", "h_a", "h_s", "g_s")
    }
    context = total - sum(parts.values())
    return {
        "total": total,
        "encoder": total - sum(parts[n] for n in DECODER_ONLY),
        "decoder": total - sum(parts[n] for n in ENCODER_ONLY),
        "context": context,
        **parts,
    }


def per_pixel_kmacs(macs: dict[str, float], height: int, width: int) -> dict[str, float]:
    return {k: v / (height * width) / 1e3 for k, v in macs.items()}
