"""rANS coding with the GGM tables: buffers, round trips with escapes, rate versus ideal, errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats
import torch
import torch.nn as nn

from hpcm.models.coder import (
    CODER_BUFFER_NAMES,
    MAX_ABS_SYMBOL,
    CoderTables,
    coder_tables,
    decode_symbols,
    encode_symbols,
    make_decoder,
    make_encoder,
    register_coder_buffers,
    resize_coder_buffers,
    update_coder_buffers,
)
from hpcm.models.entropy import GGM, build_indexes_conditional, build_indexes_z, get_scale_table


class TinyPriorModel(nn.Module):
    """The parts of the official base model that the coder touches."""

    def __init__(self, channels: int = 6) -> None:
        super().__init__()
        self.means_hyper = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.scales_hyper = nn.Parameter(
            torch.linspace(0.05, 6.0, channels).view(1, channels, 1, 1)
        )
        self.entropy_estimation = GGM()
        register_coder_buffers(self)

    def update(self, scale_table=None):
        update_coder_buffers(self, self.entropy_estimation, self.scales_hyper, scale_table)


@pytest.fixture(scope="module")
def model():
    m = TinyPriorModel()
    m.update()
    return m


def test_buffer_names_and_shapes_follow_official():
    fresh = TinyPriorModel()
    state = fresh.state_dict()
    for name in CODER_BUFFER_NAMES:  # registered empty, as the official BB.init does
        assert state[name].numel() == 0
    assert set(state) == set(CODER_BUFFER_NAMES) | {
        "means_hyper",
        "scales_hyper",
        "entropy_estimation.beta",
        "entropy_estimation.scale_lower_bound.bound",
        "entropy_estimation.likelihood_lower_bound.bound",
    }
    fresh.update()
    assert fresh.scale_table.shape == (60,)
    assert fresh.quantized_cdf_y.shape[0] == 60 and fresh.quantized_cdf_z.shape[0] == 6
    for which in ("y", "z"):
        for name in ("quantized_cdf", "cdf_length", "offset"):
            assert getattr(fresh, f"{name}_{which}").dtype == torch.int32
    # z tables are exactly the tables of the per-channel scales
    expected = fresh.entropy_estimation.get_quantized_cdf(fresh.scales_hyper.detach().view(-1))
    assert torch.equal(fresh.quantized_cdf_z, expected[0])


def test_state_dict_with_tables_loads_into_fresh_model(model):
    state = model.state_dict()
    fresh = TinyPriorModel()
    resize_coder_buffers(fresh, state)
    fresh.load_state_dict(state)
    for name in CODER_BUFFER_NAMES:
        assert torch.equal(getattr(fresh, name), state[name]), name


def test_update_rejects_bad_scale_table():
    with pytest.raises(ValueError, match="increasing"):
        TinyPriorModel().update(torch.tensor([1.0, 0.5, 2.0]))
    with pytest.raises(ValueError, match="1-D"):
        TinyPriorModel().update(torch.ones(2, 2))


def test_coding_before_update_is_a_clear_error():
    with pytest.raises(RuntimeError, match=r"update\(\)"):
        coder_tables(TinyPriorModel(), "y")
    with pytest.raises(ValueError, match="'y' or 'z'"):
        coder_tables(TinyPriorModel(), "x")


def _escape_symbols(
    tables: CoderTables, indexes: torch.Tensor, gen: torch.Generator
) -> torch.Tensor:
    """Random in-range symbols plus values just outside each table and huge ones (escape coding)."""
    offsets = torch.tensor(tables.offsets)[indexes.long()]
    lengths = torch.tensor(tables.cdf_lengths)[indexes.long()]
    span = (lengths - 2).float()  # in-range symbols: offset .. offset + span - 1
    symbols = offsets + torch.floor(torch.rand(indexes.shape, generator=gen) * span).long()
    flat = symbols.view(-1)
    flat_off, flat_len = offsets.view(-1), lengths.view(-1)
    flat[0], flat[1] = flat_off[0] - 1, flat_off[1] + flat_len[1] - 2  # first values that escape
    flat[2], flat[3] = flat_off[2] + flat_len[2] - 3, flat_off[3]  # last values that do not
    flat[4:10] = torch.tensor([10**6, -(10**6), MAX_ABS_SYMBOL, -MAX_ABS_SYMBOL, 12345, -777])
    return symbols.float()


def test_round_trip_with_escapes_shared_stream(model):
    """Several steps into one encoder, pulled back in order; bytes are deterministic."""
    gen = torch.Generator().manual_seed(0)
    tables_y, tables_z = coder_tables(model, "y"), coder_tables(model, "z")
    steps = []
    for shape in ((1, 8, 5, 7), (1, 8, 3, 3), (1, 16, 1, 1)):
        scales = torch.exp(torch.empty(shape).uniform_(math.log(0.05), math.log(80), generator=gen))
        idx = build_indexes_conditional(scales, model.scale_table)
        steps.append((idx, _escape_symbols(tables_y, idx, gen)))
    z_idx = build_indexes_z((1, 6, 4, 3))
    z_sym = _escape_symbols(tables_z, z_idx, gen)

    def encode() -> tuple[bytes, bytes]:
        enc_y, enc_z = make_encoder(), make_encoder()
        for idx, sym in steps:
            encode_symbols(enc_y, sym, idx, tables_y)
        encode_symbols(enc_z, z_sym, z_idx, tables_z)
        return enc_y.flush(), enc_z.flush()

    y_bytes, z_bytes = encode()
    assert (y_bytes, z_bytes) == encode()
    dec_y = make_decoder(y_bytes)
    for idx, sym in steps:
        decoded = decode_symbols(dec_y, idx, tables_y)
        assert decoded.dtype == torch.float32 and decoded.shape == sym.shape
        assert torch.equal(decoded, sym)
    assert torch.equal(decode_symbols(make_decoder(z_bytes), z_idx, tables_z), z_sym)


@pytest.mark.parametrize(
    ("low", "high", "on_table"),
    [(0.2, 20.0, False), (0.12, 64.0, True), (0.12, 1.0, False)],
    ids=["mid-scales", "table-scales", "low-rate"],
)
def test_code_length_close_to_ideal(model, low, high, on_table):
    """i.i.d. generalized-Gaussian symbols: bytes within 2 % of -sum log2 p plus 16 bytes."""
    rng = np.random.default_rng(7)
    n = 60_000
    table = model.scale_table.double()
    if on_table:
        grid = table[(table >= low) & (table <= high)]
        scales = grid[torch.from_numpy(rng.integers(0, len(grid), n))]
    else:
        scales = torch.from_numpy(np.exp(rng.uniform(np.log(low), np.log(high), n)))
    draws = scipy.stats.gennorm.rvs(1.5, scale=scales.numpy(), random_state=rng)
    symbols = torch.round(torch.from_numpy(draws))
    p = scipy.stats.gennorm(1.5, scale=scales.numpy())
    ideal_bytes = -np.log2(p.cdf(symbols.numpy() + 0.5) - p.cdf(symbols.numpy() - 0.5)).sum() / 8

    tables = coder_tables(model, "y")
    idx = build_indexes_conditional(scales.float(), model.scale_table)
    encoder = make_encoder()
    encode_symbols(encoder, symbols, idx, tables)
    stream = encoder.flush()
    assert len(stream) <= 1.02 * ideal_bytes + 16
    assert len(stream) >= ideal_bytes * 0.99  # a coder cannot beat the entropy by much
    assert torch.equal(decode_symbols(make_decoder(stream), idx, tables), symbols.float())


def test_encode_rejects_bad_input(model):
    tables = coder_tables(model, "y")
    idx = torch.zeros(2, 3, dtype=torch.int32)
    enc = make_encoder()
    with pytest.raises(ValueError, match="shape"):
        encode_symbols(enc, torch.zeros(3, 2), idx, tables)
    with pytest.raises(ValueError, match="integers"):
        encode_symbols(enc, torch.full((2, 3), 0.5), idx, tables)
    with pytest.raises(ValueError, match="NaN"):
        encode_symbols(enc, torch.full((2, 3), float("nan")), idx, tables)
    with pytest.raises(ValueError, match="escape range"):
        encode_symbols(enc, torch.full((2, 3), float(2 * MAX_ABS_SYMBOL)), idx, tables)
    with pytest.raises(ValueError, match=r"indexes must lie in \[0, 59\]"):
        encode_symbols(enc, torch.zeros(2, 3), torch.full((2, 3), 60), tables)
    with pytest.raises(TypeError, match="integer tensor"):
        encode_symbols(enc, torch.zeros(2, 3), torch.zeros(2, 3), tables)
    with pytest.raises(TypeError, match="bytes"):
        make_decoder("not bytes")
    with pytest.raises(ValueError, match="cdf_length"):
        CoderTables.from_tensors(model.quantized_cdf_y, model.cdf_length_y[:3], model.offset_y)


def _buffer_lists(module: nn.Module, which: str) -> tuple[list[list[int]], list[int], list[int]]:
    """The coder lists read straight from the buffers: each CDF row up to its cdf_length."""
    lengths = getattr(module, f"cdf_length_{which}").tolist()
    rows = getattr(module, f"quantized_cdf_{which}").tolist()
    return (
        [r[:n] for r, n in zip(rows, lengths)],
        lengths,
        getattr(module, f"offset_{which}").tolist(),
    )


def _lists(tables: CoderTables) -> tuple[list[list[int]], list[int], list[int]]:
    return tables.cdfs, tables.cdf_lengths, tables.offsets


def test_coder_table_rows_end_at_their_length(model):
    """A row is the whole CDF the coder reads: 0 first, strictly increasing, 2**16 last."""
    tables = coder_tables(model, "y")
    for row, n in zip(tables.cdfs, tables.cdf_lengths):
        assert len(row) == n and row[0] == 0 and row[-1] == 2**16
        assert all(b > a for a, b in zip(row, row[1:]))


def test_coder_tables_cached_until_the_buffers_change():
    m = TinyPriorModel()
    m.update()
    first = coder_tables(m, "y")
    assert coder_tables(m, "y") is first  # no second conversion while nothing changed

    m.update(get_scale_table(0.12, 64, 30))  # update registers new buffers
    assert coder_tables(m, "y").num_tables == 30
    assert _lists(coder_tables(m, "y")) == _buffer_lists(m, "y")

    # load_state_dict of equal shapes copies into the same tensors (only their versions change)
    other = TinyPriorModel()
    with torch.no_grad():
        other.scales_hyper.copy_(other.scales_hyper.flip(1))  # other z rows, same table width
    other.update(get_scale_table(0.12, 64, 30))
    before = _lists(coder_tables(m, "z"))
    buffer = m.quantized_cdf_z
    m.load_state_dict(other.state_dict())
    assert m.quantized_cdf_z is buffer
    assert _lists(coder_tables(m, "z")) == _buffer_lists(other, "z") != before

    with torch.no_grad():  # any in-place write
        m.offset_y -= 1
    assert coder_tables(m, "y").offsets == [v - 1 for v in other.offset_y.tolist()]

    with torch.inference_mode():  # inference tensors have no version counter
        m.update()
    offsets = m.offset_y.tolist()
    assert coder_tables(m, "y").offsets == offsets
    with torch.inference_mode():
        m.offset_y += 1
    assert coder_tables(m, "y").offsets == [v + 1 for v in offsets]

    # writes that bump no version counter: through .data, a numpy view, a swapped .data
    m.update()  # normal (not inference) tensors again
    cached = coder_tables(m, "y")
    m.offset_y.data[0] += 5
    assert _lists(coder_tables(m, "y")) == _buffer_lists(m, "y") != _lists(cached)
    m.offset_y.numpy()[1] += 7
    assert _lists(coder_tables(m, "y")) == _buffer_lists(m, "y")
    cached = coder_tables(m, "z")
    swapped = m.quantized_cdf_z.clone()
    swapped[0, 1] += 1
    m.quantized_cdf_z.data = swapped
    assert _lists(coder_tables(m, "z")) == _buffer_lists(m, "z") != _lists(cached)
