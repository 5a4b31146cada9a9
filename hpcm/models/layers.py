"""Building blocks of HPCM (convolutions, residual blocks, window cross-attention).

Module and attribute names (``branch``, ``pconv``, ``conv_q`` ...) are part of the state-dict
interface: they reproduce the key layout of the official lyq133/LIC-HPCM checkpoints.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def conv1x1(in_ch: int, out_ch: int) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, kernel_size=1, stride=1)


def conv2x2_down(in_ch: int, out_ch: int) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, kernel_size=2, stride=2)


def deconv2x2_up(in_ch: int, out_ch: int) -> nn.ConvTranspose2d:
    return nn.ConvTranspose2d(in_ch, out_ch, kernel_size=2, stride=2)


def conv4x4_down(in_ch: int, out_ch: int) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, kernel_size=4, stride=2, padding=1)


def deconv4x4_up(in_ch: int, out_ch: int) -> nn.ConvTranspose2d:
    return nn.ConvTranspose2d(in_ch, out_ch, kernel_size=4, stride=2, padding=1)


def dwconv3x3(ch: int) -> nn.Conv2d:
    return nn.Conv2d(ch, ch, kernel_size=3, stride=1, padding=1, groups=ch)


class PartialConv3x3(nn.Module):
    """3x3 conv on the first ``partial`` channels only; the others pass through unchanged."""

    def __init__(self, channels: int, partial: int):
        super().__init__()
        self.channels = channels
        self.partial = partial
        self.pconv = nn.Conv2d(partial, partial, 3, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        head, rest = torch.split(x, [self.partial, self.channels - self.partial], dim=1)
        return torch.cat((self.pconv(head), rest), dim=1)


class _ResidualMLP(nn.Module):
    """x + project(act(expand(spatial(x)))): the shared shape of PConvRB and DWConvRB."""

    def __init__(self, spatial: nn.Module, channels: int, mlp_ratio: int):
        super().__init__()
        hidden = channels * mlp_ratio
        # In place: the expand conv's output is read by nothing else, and its backward does not need
        # it; values and gradients are bit-equal, and a forward saves a fresh tensor per block
        # (the CPU forward speed-up is measured in docs/results-log.md, CPU runs 5-14).
        act = nn.LeakyReLU(inplace=True)
        self.branch = nn.Sequential(
            spatial, conv1x1(channels, hidden), act, conv1x1(hidden, channels)
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.branch(x)


class PConvRB(_ResidualMLP):
    """Residual block: partial 3x3 conv -> 1x1 expand -> LeakyReLU -> 1x1 project."""

    def __init__(self, channels: int, partial_ratio: int = 4, mlp_ratio: int = 4):
        if channels % partial_ratio:
            raise ValueError(
                f"PConvRB channels {channels} not divisible by partial_ratio {partial_ratio}"
            )
        super().__init__(PartialConv3x3(channels, channels // partial_ratio), channels, mlp_ratio)


class DWConvRB(_ResidualMLP):
    """Residual block: depthwise 3x3 -> 1x1 expand (x2) -> LeakyReLU -> 1x1 project."""

    def __init__(self, channels: int, mlp_ratio: int = 2):
        super().__init__(dwconv3x3(channels), channels, mlp_ratio)


class SpatialPrior(nn.Module):
    """Entropy-parameter head: ``branch_2(branch_1(a) * q)`` with a per-step channel vector q.

    ``branch_1`` is ``n_before`` DWConvRB(3M); ``branch_2`` is ``n_after`` DWConvRB(3M) and a 1x1
    conv 3M -> 2M producing (scales, means).
    """

    def __init__(self, M: int, n_before: int, n_after: int):
        super().__init__()
        self.branch_1 = nn.Sequential(*(DWConvRB(3 * M) for _ in range(n_before)))
        self.branch_2 = nn.Sequential(
            *(DWConvRB(3 * M) for _ in range(n_after)), conv1x1(3 * M, 2 * M)
        )

    def forward(self, x: Tensor, quant_step: Tensor) -> Tensor:
        return self.branch_2(self.branch_1(x) * quant_step)


def window_partition(x: Tensor, window: int) -> Tensor:
    """(B, C, H, W) -> (B * nH * nW, C, window*window): non-overlapping windows, row-major."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // window, window, w // window, window)
    x = x.permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b * (h // window) * (w // window), c, window * window)


def window_merge(x: Tensor, window: int, batch: int, height: int, width: int) -> Tensor:
    """Inverse of :func:`window_partition`."""
    c = x.shape[1]
    x = x.reshape(batch, height // window, width // window, c, window, window)
    x = x.permute(0, 3, 1, 4, 2, 5)
    return x.reshape(batch, c, height, width)


class CrossAttentionCell(nn.Module):
    """Progressive context fusion: WinAttn(Q = Wq psi, K = Wk C, V = Wv C) + Wo psi.

    Multi-head attention over the positions of each non-overlapping ``window`` x ``window`` window.
    All projections are 1x1 convolutions (the official ``kernel_size=1``), so they are applied to
    the whole map before windowing, which is the same computation and cheaper to express.
    """

    def __init__(self, channels: int, window_size: int, num_heads: int):
        super().__init__()
        if channels % num_heads:
            raise ValueError(
                f"attention channels {channels} not divisible by num_heads {num_heads}"
            )
        self.channels = channels
        self.num_heads = num_heads
        self.head_dim = channels // num_heads
        self.window_size = window_size
        self.conv_q = conv1x1(channels, channels)
        self.conv_k = conv1x1(channels, channels)
        self.conv_v = conv1x1(channels, channels)
        self.conv_out = conv1x1(channels, channels)

    def forward(self, x_t: Tensor, h_prev: Tensor) -> Tensor:
        b, c, h, w = x_t.shape
        win = self.window_size
        if h % win or w % win:
            raise ValueError(
                f"attention window {win} does not divide the latent grid {h}x{w}; "
                "pad the image to the model's pad_multiple"
            )

        def heads(t: Tensor) -> Tensor:
            # (B*nW, C, L) -> (B*nW, heads, L, head_dim); channel c = head * head_dim + d
            t = window_partition(t, win)
            return t.reshape(t.shape[0], self.num_heads, self.head_dim, -1).transpose(2, 3)

        q = heads(self.conv_q(x_t))
        k = heads(self.conv_k(h_prev))
        v = heads(self.conv_v(h_prev))
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(d)) v
        out = out.transpose(2, 3).reshape(out.shape[0], c, win * win)
        return window_merge(out, win, b, h, w) + self.conv_out(x_t)


class Transform(nn.Module):
    """A plain stack of layers kept under the attribute ``branch`` (official key layout)."""

    def __init__(self, *layers: nn.Module):
        super().__init__()
        self.branch = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.branch(x)


def analysis_transform(
    M: int,
    channels: tuple[int, int, int],
    blocks: tuple[int, int, int],
    partial_ratio: int,
    mlp_ratio: int,
) -> Transform:
    """g_a: conv4x4 down to c0, then per stage PConvRB blocks and a 2x2 down conv (total stride
    16)."""
    layers: list[nn.Module] = [conv4x4_down(3, channels[0])]
    widths = (*channels, M)
    for stage, count in enumerate(blocks):
        layers += [PConvRB(widths[stage], partial_ratio, mlp_ratio) for _ in range(count)]
        layers.append(conv2x2_down(widths[stage], widths[stage + 1]))
    return Transform(*layers)


def synthesis_transform(
    M: int,
    channels: tuple[int, int, int],
    blocks: tuple[int, int, int],
    partial_ratio: int,
    mlp_ratio: int,
) -> Transform:
    """g_s: mirror of g_a, ending in a 4x4 transposed conv to RGB (no clamp)."""
    widths = (M, *reversed(channels))
    layers: list[nn.Module] = []
    for stage, count in enumerate(blocks):
        layers.append(deconv2x2_up(widths[stage], widths[stage + 1]))
        layers += [PConvRB(widths[stage + 1], partial_ratio, mlp_ratio) for _ in range(count)]
    layers.append(deconv4x4_up(widths[-1], 3))
    return Transform(*layers)


def hyper_analysis(M: int, N: int, blocks: int, partial_ratio: int, mlp_ratio: int) -> Transform:
    """h_a: PConvRB(M), 2x2 down to N, ``blocks`` PConvRB(N), 2x2 down (z at y/4)."""
    return Transform(
        PConvRB(M, partial_ratio, mlp_ratio),
        conv2x2_down(M, N),
        *(PConvRB(N, partial_ratio, mlp_ratio) for _ in range(blocks)),
        conv2x2_down(N, N),
    )


def hyper_synthesis(M: int, N: int, blocks: int, partial_ratio: int, mlp_ratio: int) -> Transform:
    """h_s: 2x2 up, ``blocks`` PConvRB(N), 2x2 up to 2M (scales, means), PConvRB(2M)."""
    return Transform(
        deconv2x2_up(N, N),
        *(PConvRB(N, partial_ratio, mlp_ratio) for _ in range(blocks)),
        deconv2x2_up(N, 2 * M),
        PConvRB(2 * M, partial_ratio, mlp_ratio),
    )
