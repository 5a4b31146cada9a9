"""Coder diagnostics: how many latents fall outside the rANS tables (and are escape-coded).

The bitstream size tracks the estimated rate ``-log2 p`` only for symbols inside their table; an
escaped symbol costs the table's escape mass plus a bypass-coded value. Benchmarks and tests use
:func:`escaped_symbols` to check that precondition before comparing the two.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from hpcm.models.entropy import build_indexes_conditional, build_indexes_z
from hpcm.models.hpcm import HPCM, _Quantizer


@dataclass(frozen=True)
class EscapeCount:
    y_escaped: int
    y_total: int
    z_escaped: int
    z_total: int

    @property
    def any(self) -> bool:
        return self.y_escaped + self.z_escaped > 0


def _outside(symbols: Tensor, index: Tensor, offset: Tensor, cdf_length: Tensor) -> int:
    # a table of length L holds L - 2 symbols starting at its offset (then the escape symbol and
    # the closing CDF entry), i.e. symbols offset .. offset + L - 3
    low = offset.long()[index]
    high = low + cdf_length.long()[index] - 3
    return int(((symbols < low) | (symbols > high)).sum())


@torch.no_grad()
def escaped_symbols(model: HPCM, x: Tensor) -> EscapeCount:
    """Count the y and z symbols of ``x`` (padded to the model's multiple) that lie outside their tables."""
    if model.quantized_cdf_y.numel() == 0:
        raise RuntimeError("coder tables are empty: call model.update() first")
    model._check_input(x)
    y = model.g_a(x)
    z_res = torch.round(model.h_a(y) - model.means_hyper)
    params = model.h_s(z_res + model.means_hyper)
    part = model._partitions.get(*params.shape[-2:], params.device, params.dtype)
    quantizer = _Quantizer(part, y, training=False)
    model._progressive(params, quantizer)
    y_symbols = torch.round(quantizer.full(quantizer.res, part)).long()
    y_index = build_indexes_conditional(quantizer.full(quantizer.scales, part), model.scale_table).long()
    z_index = build_indexes_z(z_res.shape).long().to(z_res.device)
    return EscapeCount(
        y_escaped=_outside(y_symbols, y_index, model.offset_y, model.cdf_length_y),
        y_total=y_symbols.numel(),
        z_escaped=_outside(z_res.long(), z_index, model.offset_z, model.cdf_length_z),
        z_total=z_res.numel(),
    )
