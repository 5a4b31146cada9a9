"""The fixed scale partition of HPCM: which latent element is coded at which scale and step.

y (M channels, Hy x Wy) is split into three scales by plain polyphase decimation whose phase depends
on the channel group (research notes hpcm.md section 1.4):

* s2 grid (Hy/2 x Wy/2): channel group g of 8 (M/8 channels each) keeps the y positions of one
  2x2 phase, ``S2_PHASE[g]``.
* s1 grid (Hy/4 x Wy/4): channel group k of 4 (M/4 channels each) keeps one 2x2 phase of the s2
  grid, ``S1_PHASE_ON_S2[k]``.
* s3: everything else, coded on the full y grid.

Coding steps (11): s1 in 2 checkerboard halves, s2 in 3 quarters, s3 in 6 eighths, with the
per-channel-group permutations of the official ``get_mask_two_parts`` / ``get_mask_four_parts`` /
``get_mask_eight_parts``. The pattern tables below are those masks written as coordinates.

Everything here depends only on (M, Hy, Wy), never on data or weights, and is cached per
(size, device, dtype) by :class:`PartitionCache`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

# 2x2 phases are numbered r * 2 + c (the channel order of F.pixel_unshuffle(t, 2)).
# s2 lattice of each of the 8 channel groups on y: (even,even), (odd,odd), (even,odd), (odd,even),
# twice.
S2_PHASE = (0, 3, 1, 2, 0, 3, 1, 2)
# s1 lattice of each of the 4 channel groups on the s2 grid (official get_mask_for_rec_s2: m0..m3).
S1_PHASE_ON_S2 = (0, 1, 2, 3)

# The eight 4x4 patterns of the official get_one_channel_eight_parts_mask, as (row, col) mod 4.
EIGHT_PATTERNS = (
    ((0, 0), (2, 2)),
    ((0, 2), (2, 0)),
    ((1, 1), (3, 3)),
    ((1, 3), (3, 1)),
    ((0, 1), (2, 3)),
    ((0, 3), (2, 1)),
    ((1, 0), (3, 2)),
    ((1, 2), (3, 0)),
)
# Official cat_list: eighth-part i gives channel group j the pattern EIGHT_ORDER[i][j]. Parts 0-1
# are the s2 lattice; parts 2..7 are coding steps 6..11.
EIGHT_ORDER = (
    (0, 2, 4, 6, 1, 3, 5, 7),
    (1, 3, 5, 7, 0, 2, 4, 6),
    (2, 4, 6, 0, 3, 5, 7, 1),
    (3, 5, 7, 1, 2, 4, 6, 0),
    (4, 6, 0, 2, 5, 7, 1, 3),
    (5, 7, 1, 3, 4, 6, 0, 2),
    (6, 0, 2, 4, 7, 1, 3, 5),
    (7, 1, 3, 5, 6, 0, 2, 4),
)
# Official get_mask_four_parts on the s2 grid: quarter i gives channel group j (of 4) the 2x2 phase
# FOUR_ORDER[i][j]. Quarter 0 is the s1 lattice; quarters 1..3 are coding steps 3..5.
FOUR_ORDER = ((0, 1, 2, 3), (3, 2, 1, 0), (2, 3, 0, 1), (1, 0, 3, 2))
# The official s2-stage hyperprior gather (get_s2_hyper_with_mask) removes, per channel group of 8,
# the first point of pattern QUIRK_S1_PATTERN[g] from the s2 lattice. For 6 of the 8 groups that is
# not the real s1 point, so some hyperprior values land two columns/rows away from "their" latent.
# The released weights were trained with this layout, so it is reproduced exactly.
QUIRK_S1_PATTERN = (0, 2, 4, 6, 1, 3, 5, 7)

NUM_STEPS = 11
STEPS_PER_SCALE = (2, 3, 6)


def check_channels(M: int) -> None:
    if M <= 0 or M % 8:
        raise ValueError(
            f"latent channels M={M} must be a positive multiple of 8 (8 channel groups)"
        )


def check_latent_size(height: int, width: int) -> None:
    if height <= 0 or width <= 0 or height % 4 or width % 4:
        raise ValueError(
            f"latent size {height}x{width} must be a positive multiple of 4 (image a multiple of "
            "64)"
        )


def _group_of(channels: int, groups: int) -> Tensor:
    return torch.arange(channels) // (channels // groups)


@dataclass
class Partition:
    """Index tables and masks of one (M, Hy, Wy, device, dtype)."""

    M: int
    height: int
    width: int
    idx_s2: (
        Tensor  # (M,) channel index into pixel_unshuffle(y, 2) selecting each channel's s2 phase
    )
    idx_s1: Tensor  # (M,) same on the s2 grid for the s1 phase
    quirk_gather: (
        Tensor  # (M, H2*W2) flat y index feeding the s2 grid's hyperprior (official layout)
    )
    s2_hyper_mask: Tensor  # (1, M, H2, W2): 1 at s2-grid positions that are not s1
    s3_hyper_mask: Tensor  # (1, M, Hy, Wy): 1 at y positions that are not in the s2 lattice
    step_masks: tuple[
        tuple[Tensor, ...], tuple[Tensor, ...], tuple[Tensor, ...]
    ]  # per scale, per step

    # ---- moving tensors between the three grids -------------------------------------------------
    def y_to_s2(self, t: Tensor) -> Tensor:
        return F.pixel_unshuffle(t, 2).index_select(1, self.idx_s2)

    def s2_to_s1(self, t: Tensor) -> Tensor:
        return F.pixel_unshuffle(t, 2).index_select(1, self.idx_s1)

    def y_to_s1(self, t: Tensor) -> Tensor:
        return self.s2_to_s1(self.y_to_s2(t))

    @staticmethod
    def _scatter(t: Tensor, idx: Tensor) -> Tensor:
        b, c, h, w = t.shape
        out = t.new_zeros(b, 4 * c, h, w).index_copy(1, idx, t)
        return F.pixel_shuffle(out, 2)

    def s1_to_s2(self, t: Tensor) -> Tensor:
        """Place s1-grid values at their s2-grid positions, zeros elsewhere."""
        return self._scatter(t, self.idx_s1)

    def s2_to_y(self, t: Tensor) -> Tensor:
        """Place s2-grid values at their y positions, zeros elsewhere."""
        return self._scatter(t, self.idx_s2)

    def s1_to_y(self, t: Tensor) -> Tensor:
        return self.s2_to_y(self.s1_to_s2(t))

    def s2_hyper(self, t: Tensor) -> Tensor:
        """Hyperprior parameters for the not-yet-coded s2 positions, in the official layout."""
        b = t.shape[0]
        flat = t.reshape(b, self.M, -1)
        gathered = torch.gather(flat, 2, self.quirk_gather.unsqueeze(0).expand(b, -1, -1))
        return gathered.view(b, self.M, self.height // 2, self.width // 2) * self.s2_hyper_mask

    def s3_hyper(self, t: Tensor) -> Tensor:
        """Hyperprior parameters at the y positions outside the s2 lattice."""
        return t * self.s3_hyper_mask


def _phase_index(M: int, phases_per_group: tuple[int, ...]) -> Tensor:
    groups = torch.tensor(phases_per_group)[_group_of(M, len(phases_per_group))]
    return torch.arange(M) * 4 + groups


def _phase_mask(M: int, h: int, w: int, phase_of_channel: Tensor) -> Tensor:
    """(1, M, h, w) mask that is 1 where (row % 2, col % 2) equals the channel's 2x2 phase."""
    rows = torch.arange(h).view(1, h, 1) % 2
    cols = torch.arange(w).view(1, 1, w) % 2
    return ((rows * 2 + cols) == phase_of_channel.view(M, 1, 1)).unsqueeze(0)


def _pattern_mask(M: int, h: int, w: int, pattern_of_channel: Tensor) -> Tensor:
    """(1, M, h, w) mask that is 1 where (row % 4, col % 4) is in the channel's 4x4 pattern."""
    table = torch.zeros(8, 4, 4, dtype=torch.bool)
    for p, points in enumerate(EIGHT_PATTERNS):
        for r, c in points:
            table[p, r, c] = True
    rows = (torch.arange(h) % 4).view(h, 1)
    cols = (torch.arange(w) % 4).view(1, w)
    return table[pattern_of_channel][:, rows, cols].unsqueeze(0)


def build_partition(
    M: int, height: int, width: int, device: torch.device, dtype: torch.dtype
) -> Partition:
    check_channels(M)
    check_latent_size(height, width)
    h2, w2, h1, w1 = height // 2, width // 2, height // 4, width // 4
    g8, g4, g2 = _group_of(M, 8), _group_of(M, 4), _group_of(M, 2)

    # s1 steps on the s1 grid: checkerboard, channel halves take opposite parities
    even = ((torch.arange(h1).view(h1, 1) + torch.arange(w1).view(1, w1)) % 2 == 0).view(
        1, 1, h1, w1
    )
    half = (g2 == 0).view(1, M, 1, 1)
    s1_steps = (even == half, even != half)
    # s2 steps 3..5 on the s2 grid
    s2_steps = tuple(_phase_mask(M, h2, w2, torch.tensor(FOUR_ORDER[i])[g4]) for i in (1, 2, 3))
    # s3 steps 6..11 on the y grid
    s3_steps = tuple(
        _pattern_mask(M, height, width, torch.tensor(EIGHT_ORDER[i])[g8]) for i in range(2, 8)
    )

    s1_on_s2 = _phase_mask(M, h2, w2, torch.tensor(S1_PHASE_ON_S2)[g4])
    s2_on_y = _phase_mask(M, height, width, torch.tensor(S2_PHASE)[g8])

    # Official get_s2_hyper_with_mask: the k-th (row-major) y position of "s2 lattice minus the
    # quirk s1 point" fills the k-th (row-major) s2-grid position that is not s1, per channel.
    quirk_first = torch.tensor([EIGHT_PATTERNS[QUIRK_S1_PATTERN[g]][0] for g in range(8)])[
        g8
    ]  # (M, 2)
    rows = (torch.arange(height) % 4).view(1, height, 1)
    cols = (torch.arange(width) % 4).view(1, 1, width)
    quirk_s1 = (rows == quirk_first[:, 0].view(M, 1, 1)) & (cols == quirk_first[:, 1].view(M, 1, 1))
    source = (s2_on_y[0] & ~quirk_s1).reshape(M, -1)
    dest = (~s1_on_s2[0]).reshape(M, -1)
    # every channel has the same number of source and destination points (3/16 of Hy*Wy)
    src_flat = torch.nonzero(source)[:, 1].view(M, -1)
    dst_flat = torch.nonzero(dest)[:, 1].view(M, -1)
    gather = torch.zeros(M, h2 * w2, dtype=torch.long).scatter_(1, dst_flat, src_flat)

    to = dict(device=device)
    return Partition(
        M=M,
        height=height,
        width=width,
        idx_s2=_phase_index(M, S2_PHASE).to(**to),
        idx_s1=_phase_index(M, S1_PHASE_ON_S2).to(**to),
        quirk_gather=gather.to(**to),
        s2_hyper_mask=(~s1_on_s2).to(device=device, dtype=dtype),
        s3_hyper_mask=(~s2_on_y).to(device=device, dtype=dtype),
        step_masks=tuple(
            tuple(m.to(device=device, dtype=dtype) for m in masks)
            for masks in (s1_steps, s2_steps, s3_steps)
        ),
    )


class BoundedCache:
    """A dict of at most ``max_entries`` built values; the oldest entry goes first.

    Evaluation sees a new image size per dataset image, so per-size caches must not grow without
    bound.
    """

    def __init__(self, max_entries: int = 16):
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries}")
        self.max_entries = max_entries
        self._cache: dict[tuple, object] = {}

    def __len__(self) -> int:
        return len(self._cache)

    def get(self, key: tuple, build: Callable[[], object]):
        value = self._cache.get(key)
        if value is None:
            if len(self._cache) >= self.max_entries:
                self._cache.pop(next(iter(self._cache)))
            value = _build_eagerly(build)
            self._cache[key] = value
        return value


# torch._disable_dynamo, not torch.compiler.disable: the public decorator imports torch._dynamo (and
# through it inductor and triton) when this module is imported, 2.5 s of CPU in every process that
# never compiles (each Snakemake job, each gpu_check run); torch's own lazy form, which torch uses
# on its own functions, imports it on the first call and is then the same torch._dynamo.disable.
@torch._disable_dynamo
def _build_eagerly(build: Callable[[], object]) -> object:
    """Run ``build`` outside torch.compile: the masks are built on the CPU (with data-dependent
    ``nonzero``) and then moved; traced, they became CPU graphs inside a CUDA training step, whose
    C++ code generation failed on the GPU (issue 15, docs/results-log.md GPU run 1)."""
    return build()


class PartitionCache(BoundedCache):
    """Builds each Partition once per (M, size, device, dtype); masks are never rebuilt per call."""

    def __init__(self, M: int, max_entries: int = 16):
        check_channels(M)
        super().__init__(max_entries)
        self.M = M

    def get(self, height: int, width: int, device: torch.device, dtype: torch.dtype) -> Partition:
        key = (height, width, str(device), dtype)
        return super().get(
            key, lambda: build_partition(self.M, height, width, torch.device(device), dtype)
        )


def label_maps(
    M: int, height: int, width: int, device: torch.device | None = None
) -> tuple[Tensor, Tensor]:
    """(scale_map, step_map): LongTensors (M, Hy, Wy) with values 1..3 and 1..11."""
    part = build_partition(M, height, width, torch.device("cpu"), torch.float32)
    lifts = (part.s1_to_y, part.s2_to_y, lambda t: t)
    step = torch.zeros(1, M, height, width)
    scale = torch.zeros(1, M, height, width)
    number = 0
    for s, masks in enumerate(part.step_masks):
        for mask in masks:
            number += 1
            placed = lifts[s](mask)
            step = step + placed * number
            scale = scale + placed * (s + 1)
    scale_map, step_map = scale[0].long(), step[0].long()
    if int(step_map.min()) < 1:  # every element must be coded exactly once
        raise AssertionError("scale partition does not cover the latent")
    return scale_map.to(device), step_map.to(device)
