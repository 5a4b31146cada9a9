"""Entropy coder: table build time, rANS throughput, and code length versus the ideal rate.

    python benchmarks/entropy_coder.py [--symbols 200000] [--seed 0]

Symbols are i.i.d. draws of a generalized Gaussian (beta 1.5) rounded to integers; the ideal rate
is -sum log2 P(symbol) under the continuous-scale model, the actual one is the rANS stream built
with the official 60-level scale table (the coder uses the first table scale >= sigma).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import scipy.stats
import torch

from hpcm.models.coder import CoderTables, decode_symbols, encode_symbols, make_decoder, make_encoder
from hpcm.models.entropy import GGM, build_indexes_conditional, get_scale_table

REGIMES = {  # name: (lowest scale, highest scale)
    "low rate, sigma 0.12-0.3": (0.12, 0.3),
    "sigma 0.12-1": (0.12, 1.0),
    "sigma 0.2-20": (0.2, 20.0),
    "sigma 0.12-64": (0.12, 64.0),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--symbols", type=int, default=200_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    ggm, table = GGM(), get_scale_table(0.12, 64, 60)
    start = time.perf_counter()
    tables = CoderTables.from_tensors(*ggm.get_quantized_cdf(table))
    print(f"y tables (60 scales, max length {max(tables.cdf_lengths)}): {time.perf_counter() - start:.3f} s")

    print(f"{'regime':<26}{'ideal B':>10}{'actual B':>10}{'gap %':>8}{'enc Msym/s':>12}{'dec Msym/s':>12}")
    for name, (low, high) in REGIMES.items():
        rng = np.random.default_rng(args.seed)
        scales = np.exp(rng.uniform(np.log(low), np.log(high), args.symbols))
        symbols = np.round(scipy.stats.gennorm.rvs(1.5, scale=scales, random_state=rng))
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


if __name__ == "__main__":
    main()
