"""Real entropy coding for HPCM: coder buffers on the model, and rANS push/pull of symbols.

The coder is compressai's 64-bit rANS (``compressai.ans``) with 16-bit CDFs. A symbol outside its
table's range is sent as the table's overflow (escape) symbol followed by bypass-coded raw bits, so
any integer up to ``MAX_ABS_SYMBOL`` in magnitude decodes exactly.

Buffers (official names, registered on the *model itself*, i.e. state-dict keys without a prefix;
empty float tensors until ``update``, as in the official ``BB.init``):
    ``scale_table`` (levels,), ``quantized_cdf_y`` (levels, L+2) int32, ``cdf_length_y`` (levels,)
    int32, ``offset_y`` (levels,) int32, and ``quantized_cdf_z`` / ``cdf_length_z`` / ``offset_z``
    with one row per z channel.

API
---
``register_coder_buffers(model)``                     call once in ``__init__``.
``update_coder_buffers(model, ggm, scales_hyper, scale_table=None) -> None``
    builds all tables (z: one per channel from ``scales_hyper``; y: one per scale of the table,
    default ``get_scale_table(0.12, 64, 60)``) from the given parameters, every time it is called.
    Deciding whether tables are stale is the caller's job: ``HPCM.update(scale_table, force)`` keeps
    them while ``scales_hyper`` is unchanged and calls this only when a rebuild is needed.
``resize_coder_buffers(model, state_dict)``           call at the start of the model's
    ``load_state_dict`` so that checkpoints saved with (or without) tables load.
``coder_tables(model, "y" | "z") -> CoderTables``     Python lists for the coder; raises a clear
    error when ``update()`` was not called. Built once and reused while the model holds the same,
    unmodified buffers (``update()``, ``load_state_dict`` and ``.to()`` make it rebuild).
``encode_symbols(encoder, symbols, indexes, tables)`` push symbols into a shared
    ``compressai.ans.BufferedRansEncoder`` (``make_encoder()``; ``encoder.flush()`` gives the
    bytes). The encoder only buffers, so several pushes give the bytes of one push of their
    concatenation.
``encode_stream(symbols, indexes, tables) -> bytes``  a fresh encoder, one push, flushed.
``decode_symbols(decoder, indexes, tables) -> Tensor`` pull the same step from a
    ``compressai.ans.RansDecoder`` (``make_decoder(bytes)``), in the same order as encoded;
    returns float32 integers shaped like ``indexes`` on ``indexes``' device.

How the model uses it (as the official ``HPCM_Base.compress``/``decompress``):
    z:  z_res = round(z - means_hyper); idx = build_indexes_z(z_res.shape);
        z_string = encode_stream(z_res, idx, coder_tables(model, "z"))
        decode: z_res = decode_symbols(dec_z, build_indexes_z((1, N, h, w)), tables_z);
        z_hat = z_res + means_hyper.
    y:  the 11 steps' symbols and indexes
        (build_indexes_conditional(scales_step, model.scale_table)), concatenated in step order,
        in one stream per image: encode_stream(y_q, idx, tables_y).
        Decode goes step by step with ``decode_symbols`` (each step's indexes depend on the last).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Mapping

import torch
import torch.nn as nn
from torch import Tensor

from hpcm.models.compressai_ext import BufferedRansEncoder, RansDecoder
from hpcm.models.entropy import GGM, get_scale_table

__all__ = [
    "CODER_BUFFER_NAMES",
    "MAX_ABS_SYMBOL",
    "CoderTables",
    "register_coder_buffers",
    "update_coder_buffers",
    "resize_coder_buffers",
    "coder_tables",
    "make_encoder",
    "make_decoder",
    "encode_symbols",
    "encode_stream",
    "decode_symbols",
]

CODER_BUFFER_NAMES = (
    "scale_table",
    "quantized_cdf_z",
    "cdf_length_z",
    "offset_z",
    "quantized_cdf_y",
    "cdf_length_y",
    "offset_y",
)

# compressai bypass-codes the int32 value 2|v| (+-1) in 4-bit chunks and its loop is only safe
# while that stays below 2**28; a latent this large means a broken model anyway.
MAX_ABS_SYMBOL = 2**26


@dataclass(frozen=True)
class CoderTables:
    """CDF tables as the Python lists compressai's coder takes.

    Each CDF row is cut to its ``cdf_length``: the coder never reads past it, and pybind11 copies
    every list on every call, so the zero padding of the short rows (6x the used entries for the
    60-level y table) would only cost time.
    """

    cdfs: list[list[int]]
    cdf_lengths: list[int]
    offsets: list[int]

    @property
    def num_tables(self) -> int:
        return len(self.cdf_lengths)

    @classmethod
    def from_tensors(
        cls, quantized_cdf: Tensor, cdf_length: Tensor, offset: Tensor
    ) -> "CoderTables":
        if quantized_cdf.dim() != 2 or quantized_cdf.numel() == 0:
            raise ValueError(
                f"quantized_cdf must be a non-empty 2-D table, got {tuple(quantized_cdf.shape)}"
            )
        n = quantized_cdf.shape[0]
        if cdf_length.shape != (n,) or offset.shape != (n,):
            raise ValueError(
                f"cdf_length {tuple(cdf_length.shape)} and offset {tuple(offset.shape)} must be "
                f"({n},)"
            )
        lengths = cdf_length.int().tolist()
        if min(lengths) < 3 or max(lengths) > quantized_cdf.shape[1]:
            raise ValueError(f"cdf_length values must lie in [3, {quantized_cdf.shape[1]}]")
        rows = quantized_cdf.int().tolist()
        return cls([row[:n] for row, n in zip(rows, lengths)], lengths, offset.int().tolist())


def register_coder_buffers(module: nn.Module) -> None:
    """Register the official coder buffers, empty until ``update_coder_buffers``."""
    for name in CODER_BUFFER_NAMES:
        module.register_buffer(name, torch.Tensor())


def update_coder_buffers(
    module: nn.Module, ggm: GGM, scales_hyper: Tensor, scale_table: Tensor | None = None
) -> None:
    """Build z tables (one per channel of ``scales_hyper``) and y tables (one per table scale)."""
    if scale_table is None:
        scale_table = get_scale_table()
    scale_table = scale_table.detach()
    if scale_table.dim() != 1 or scale_table.numel() < 2:
        raise ValueError(
            f"scale_table must be 1-D with >= 2 entries, got {tuple(scale_table.shape)}"
        )
    if not bool((scale_table[1:] > scale_table[:-1]).all()):
        raise ValueError("scale_table must be strictly increasing")
    device = scales_hyper.device
    tables = {
        "z": ggm.get_quantized_cdf(scales_hyper.detach().reshape(-1)),
        "y": ggm.get_quantized_cdf(scale_table.to(device)),
    }
    module.register_buffer("scale_table", scale_table.to(device))
    for which, (cdf, length, offset) in tables.items():
        module.register_buffer(f"quantized_cdf_{which}", cdf.to(device))
        module.register_buffer(f"cdf_length_{which}", length.to(device))
        module.register_buffer(f"offset_{which}", offset.to(device))


def resize_coder_buffers(module: nn.Module, state_dict: Mapping[str, Tensor]) -> None:
    """Give the coder buffers the shapes/dtypes found in ``state_dict`` so ``load_state_dict`` fits.

    torch cannot load a (levels, L+2) table into an empty buffer; CompressAI resizes first, we do
    too.
    """
    for name in CODER_BUFFER_NAMES:
        if name not in state_dict:
            continue
        current = getattr(module, name, None)
        if current is None:
            raise KeyError(f"buffer {name!r} is not registered on {type(module).__name__}")
        src = state_dict[name]
        device = current.device
        module.register_buffer(name, torch.empty(src.shape, dtype=src.dtype, device=device))


# (module, "y" | "z") -> (host copies of the three buffers, CoderTables). An entry is valid while
# the module's buffers hold the same values: compared by content, because some writes bump no
# version counter (``buf.data = t``, ``buf.data[...] = v``, numpy views, inference tensors). The
# tables are tens of KB: a comparison costs microseconds on CPU, one small copy per call on CUDA,
# against a list conversion of ~0.4 ms.
_TABLES_CACHE: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def coder_tables(module: nn.Module, which: str) -> CoderTables:
    """The y or z tables of ``module`` as coder lists; clear error when ``update()`` was not run."""
    if which not in ("y", "z"):
        raise ValueError(f"which must be 'y' or 'z', got {which!r}")
    buffers = tuple(
        getattr(module, f"{name}_{which}") for name in ("quantized_cdf", "cdf_length", "offset")
    )
    if buffers[0].numel() == 0:
        raise RuntimeError(
            f"entropy coder tables (quantized_cdf_{which}) are empty: call model.update() "
            "before compress()/decompress()"
        )
    values = tuple(t.detach().to("cpu") for t in buffers)
    cached = _TABLES_CACHE.setdefault(module, {}).get(which)
    if cached is not None:
        snapshot, tables = cached
        if all(
            a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
            for a, b in zip(snapshot, values)
        ):
            return tables
    tables = CoderTables.from_tensors(*values)
    _TABLES_CACHE[module][which] = (tuple(v.clone() for v in values), tables)
    return tables


def make_encoder() -> BufferedRansEncoder:
    """A fresh buffered rANS encoder; push steps with ``encode_symbols``, then ``flush()``."""
    return BufferedRansEncoder()


def make_decoder(string: bytes) -> RansDecoder:
    """A rANS decoder positioned at the start of ``string``."""
    if not isinstance(string, (bytes, bytearray)):
        raise TypeError(f"bitstream must be bytes, got {type(string).__name__}")
    decoder = RansDecoder()
    decoder.set_stream(bytes(string))
    return decoder


def _check_indexes(indexes: Tensor, tables: CoderTables) -> list[int]:
    if indexes.dtype.is_floating_point or indexes.dtype == torch.bool:
        raise TypeError(f"indexes must be an integer tensor, got {indexes.dtype}")
    flat = indexes.reshape(-1).to(device="cpu", dtype=torch.int64)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= tables.num_tables):
        raise ValueError(
            f"indexes must lie in [0, {tables.num_tables - 1}], got [{int(flat.min())}, "
            f"{int(flat.max())}]"
        )
    return flat.numpy().tolist()  # numpy's tolist is ~1.7x faster than torch's


def encode_symbols(
    encoder: BufferedRansEncoder, symbols: Tensor, indexes: Tensor, tables: CoderTables
) -> None:
    """Push integer-valued ``symbols`` (any dtype) coded with table ``indexes`` (same shape)."""
    if symbols.shape != indexes.shape:
        raise ValueError(
            f"symbols {tuple(symbols.shape)} and indexes {tuple(indexes.shape)} differ in shape"
        )
    flat = symbols.detach().reshape(-1).to("cpu")
    if flat.dtype.is_floating_point:
        if not bool(torch.isfinite(flat).all()):
            raise ValueError("symbols contain NaN or inf")
        if not bool((flat == torch.round(flat)).all()):
            raise ValueError("symbols must be integers (round the residual first)")
    values = flat.to(torch.int64)
    if values.numel() and int(values.abs().max()) > MAX_ABS_SYMBOL:
        raise ValueError(
            f"symbol magnitude {int(values.abs().max())} exceeds the coder's escape range "
            f"{MAX_ABS_SYMBOL}"
        )
    encoder.encode_with_indexes(
        values.numpy().tolist(),
        _check_indexes(indexes, tables),
        tables.cdfs,
        tables.cdf_lengths,
        tables.offsets,
    )


def encode_stream(symbols: Tensor, indexes: Tensor, tables: CoderTables) -> bytes:
    """The rANS bytes of ``symbols`` coded with table ``indexes``: one push into a fresh encoder."""
    encoder = make_encoder()
    encode_symbols(encoder, symbols, indexes, tables)
    return encoder.flush()


def decode_symbols(decoder: RansDecoder, indexes: Tensor, tables: CoderTables) -> Tensor:
    """Pull ``indexes.numel()`` symbols; float32 tensor shaped like ``indexes``, on its device."""
    values = decoder.decode_stream(
        _check_indexes(indexes, tables), tables.cdfs, tables.cdf_lengths, tables.offsets
    )
    return torch.tensor(values, dtype=torch.float32, device=indexes.device).reshape(indexes.shape)
