"""Pad images of any size to the model's multiple (centred zeros, as the official test.py) and
back."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def pad_image(x: Tensor, multiple: int) -> tuple[Tensor, tuple[int, int, int, int]]:
    """Zero-pad ``x`` (B, C, H, W) centred to multiples of ``multiple``.

    Returns the padded tensor and ``pad = (left, right, top, bottom)`` for :func:`crop_image`.
    """
    if x.dim() != 4:
        raise ValueError(f"pad_image expects a 4-D tensor (B, C, H, W), got shape {tuple(x.shape)}")
    if multiple < 1:
        raise ValueError(f"multiple must be >= 1, got {multiple}")
    h, w = x.shape[-2:]
    if h == 0 or w == 0:
        raise ValueError(f"cannot pad an empty image of size {h}x{w}")
    H = -(-h // multiple) * multiple
    W = -(-w // multiple) * multiple
    left, top = (W - w) // 2, (H - h) // 2
    pad = (left, W - w - left, top, H - h - top)
    return F.pad(x, pad, mode="constant", value=0.0), pad


def crop_image(x: Tensor, pad: tuple[int, int, int, int]) -> Tensor:
    """Undo :func:`pad_image`: remove ``pad = (left, right, top, bottom)`` from ``x``."""
    left, right, top, bottom = (int(p) for p in pad)
    if min(left, right, top, bottom) < 0:
        raise ValueError(f"pad must be non-negative, got {pad}")
    h, w = x.shape[-2:]
    if left + right >= w or top + bottom >= h:
        raise ValueError(f"pad {pad} removes the whole {h}x{w} image")
    return x[..., top : h - bottom, left : w - right]
