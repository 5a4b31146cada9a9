"""Coder diagnostics: how many latents fall outside the rANS tables (and are escape-coded).

The bitstream size tracks the estimated rate ``-log2 p`` only for symbols inside their table; an
escaped symbol costs the table's escape mass plus a bypass-coded value. Benchmarks and tests use
:func:`escaped_symbols` to check that precondition before comparing the two.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from hpcm.models.coder import CoderTables, coder_tables
from hpcm.models.hpcm import HPCM


@dataclass(frozen=True)
class EscapeCount:
    y_escaped: int
    y_total: int
    z_escaped: int
    z_total: int

    @property
    def any(self) -> bool:
        return self.y_escaped + self.z_escaped > 0


def _outside(symbols: Tensor, indexes: Tensor, tables: CoderTables) -> int:
    # a table of length L holds L - 2 symbols starting at its offset (then the escape symbol and
    # the closing CDF entry), i.e. symbols offset .. offset + L - 3
    rows = indexes.long()
    low = torch.tensor(tables.offsets)[rows]
    high = low + torch.tensor(tables.cdf_lengths)[rows] - 3
    values = symbols.long()
    return int(((values < low) | (values > high)).sum())


@torch.no_grad()
def escaped_symbols(model: HPCM, x: Tensor) -> EscapeCount:
    """Count the y and z symbols that ``model.compress(x)`` codes outside their tables (x padded to
    the model's multiple)."""
    images = model.coded_symbols(x)  # the very symbols and indexes compress() codes
    tables_y, tables_z = coder_tables(model, "y"), coder_tables(model, "z")
    y_escaped = y_total = z_escaped = z_total = 0
    for coded in images:
        y_escaped += _outside(coded.y_symbols, coded.y_indexes, tables_y)
        y_total += coded.y_symbols.numel()
        z_escaped += _outside(coded.z_symbols, coded.z_indexes, tables_z)
        z_total += coded.z_symbols.numel()
    return EscapeCount(y_escaped, y_total, z_escaped, z_total)
