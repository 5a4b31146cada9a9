"""Entropy coder: table build time, rANS throughput, and code length versus the ideal rate.

    python benchmarks/entropy_coder.py [--symbols 200000] [--seed 0] [--threads 1]

Symbols are i.i.d. draws of a generalized Gaussian (beta 1.5) rounded to integers; the ideal rate
is -sum log2 P(symbol) under the continuous-scale model, the actual one is the rANS stream built
with the official 60-level scale table (the coder uses the first table scale >= sigma).

The last part times what the model pays per compress()/decompress() call on top of the coding
itself: getting the coder lists of the tables (``coder_tables``), and coding one HPCM_Base
256x256 y stream (320 x 16 x 16 symbols, sigma 0.12-64) in its 11 steps (1/32, 1/32, 3 x 1/16,
6 x 1/8 of the symbols) with one coder call per step, as decompress() must, or in one call.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import scipy.stats
import torch
from torch import nn

from hpcm.models.coder import (
    CoderTables,
    coder_tables,
    decode_symbols,
    encode_symbols,
    make_decoder,
    make_encoder,
    register_coder_buffers,
    update_coder_buffers,
)
from hpcm.models.entropy import GGM, build_indexes_conditional, get_scale_table

REGIMES = {  # name: (lowest scale, highest scale)
    "low rate, sigma 0.12-0.3": (0.12, 0.3),
    "sigma 0.12-1": (0.12, 1.0),
    "sigma 0.2-20": (0.2, 20.0),
    "sigma 0.12-64": (0.12, 64.0),
}
STEP_SHARES = (1 / 32, 1 / 32) + (1 / 16,) * 3 + (1 / 8,) * 6  # HPCM's 11 coding steps
BASE_256_Y_SYMBOLS = 320 * 16 * 16


def gg_symbols(
    rng: np.random.Generator, low: float, high: float, n: int
) -> tuple[np.ndarray, np.ndarray]:
    """(scales, rounded generalized-Gaussian draws) with log-uniform scales in [low, high]."""
    scales = np.exp(rng.uniform(np.log(low), np.log(high), n))
    return scales, np.round(scipy.stats.gennorm.rvs(1.5, scale=scales, random_state=rng))


def median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def per_call_overhead(table: torch.Tensor, seed: int, repeats: int) -> None:
    holder = nn.Module()  # carries the coder buffers as the model does
    register_coder_buffers(holder)
    ggm = GGM()
    update_coder_buffers(holder, ggm, torch.linspace(0.2, 8, 256), table)
    start = time.perf_counter()
    coder_tables(holder, "y")
    first = (time.perf_counter() - start) * 1e3
    again = median_ms(lambda: coder_tables(holder, "y"), repeats)
    print(
        f"coder_tables(y): first call {first:.3f} ms, next calls {again:.4f} ms (median of "
        f"{repeats})"
    )

    tables = coder_tables(holder, "y")
    scales, symbols = gg_symbols(np.random.default_rng(seed), 0.12, 64.0, BASE_256_Y_SYMBOLS)
    sym_t = torch.from_numpy(symbols).float()
    indexes = build_indexes_conditional(torch.from_numpy(scales).float(), table)
    bounds = np.cumsum([0] + [round(share * BASE_256_Y_SYMBOLS) for share in STEP_SHARES])
    steps = [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]

    def encode(pushes: list[slice]) -> bytes:
        encoder = make_encoder()
        for s in pushes:
            encode_symbols(encoder, sym_t[s], indexes[s], tables)
        return encoder.flush()

    def decode_steps(stream: bytes) -> torch.Tensor:
        decoder = make_decoder(stream)
        return torch.cat([decode_symbols(decoder, indexes[s], tables) for s in steps])

    stream = encode(steps)
    if encode([slice(0, BASE_256_Y_SYMBOLS)]) != stream or not torch.equal(
        decode_steps(stream), sym_t
    ):
        raise SystemExit("11-step coding: one push and 11 pushes differ, or decoding failed")
    print(
        f"one Base 256x256 y stream ({BASE_256_Y_SYMBOLS} symbols, {len(stream)} B), median of "
        f"{repeats}:"
    )
    print(f"  encode, 11 calls {median_ms(lambda: encode(steps), repeats):8.2f} ms")
    print(
        "  encode, 1 call   "
        f"{median_ms(lambda: encode([slice(0, BASE_256_Y_SYMBOLS)]), repeats):8.2f} ms"
    )
    print(f"  decode, 11 calls {median_ms(lambda: decode_steps(stream), repeats):8.2f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--symbols", type=int, default=200_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument(
        "--repeats", type=int, default=20, help="timed repeats of the per-call part"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)")

    ggm, table = GGM(), get_scale_table(0.12, 64, 60)
    start = time.perf_counter()
    tables = CoderTables.from_tensors(*ggm.get_quantized_cdf(table))
    print(
        f"y tables (60 scales, max length {max(tables.cdf_lengths)}): "
        f"{time.perf_counter() - start:.3f} s"
    )

    print(
        f"{'regime':<26}{'ideal B':>10}{'actual B':>10}{'gap %':>8}"
        f"{'enc Msym/s':>12}{'dec Msym/s':>12}"
    )
    for name, (low, high) in REGIMES.items():
        rng = np.random.default_rng(args.seed)
        scales, symbols = gg_symbols(rng, low, high, args.symbols)
        dist = scipy.stats.gennorm(1.5, scale=scales)
        ideal = -np.log2(dist.cdf(symbols + 0.5) - dist.cdf(symbols - 0.5)).sum() / 8
        sym_t = torch.from_numpy(symbols)
        indexes = build_indexes_conditional(torch.from_numpy(scales).float(), table)

        start = time.perf_counter()
        encoder = make_encoder()
        encode_symbols(encoder, sym_t, indexes, tables)
        stream = encoder.flush()
        encode_s = time.perf_counter() - start
        start = time.perf_counter()
        decoded = decode_symbols(make_decoder(stream), indexes, tables)
        decode_s = time.perf_counter() - start
        if not torch.equal(decoded.double(), sym_t):
            raise SystemExit(f"{name}: decoded symbols differ from the encoded ones")
        gap = (len(stream) - ideal) / ideal * 100
        print(
            f"{name:<26}{ideal:>10.0f}{len(stream):>10d}{gap:>8.3f}"
            f"{args.symbols / encode_s / 1e6:>12.2f}{args.symbols / decode_s / 1e6:>12.2f}"
        )
    per_call_overhead(table, args.seed, args.repeats)


if __name__ == "__main__":
    main()
