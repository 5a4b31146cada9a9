"""Speed of the HPCM presets: forward, forward+backward (one training step), compress, decompress.

    python benchmarks/model_speed.py                          # CPU: HPCM_Tiny, HPCM_Small
    python benchmarks/model_speed.py --size 64 64 --presets HPCM_Tiny
    python benchmarks/model_speed.py --presets HPCM_Base --size 256 256 --batch 1
    python benchmarks/model_speed.py --threads 1 --skip-training   # coding only (compress, decompress)
    python benchmarks/model_speed.py --device cuda --bf16     # CUDA: channels_last, bf16 autocast
    python benchmarks/model_speed.py --presets HPCM_Base --size 256 256 --official .scratch/LIC-HPCM

``--official PATH`` points at a local copy of lyq133/LIC-HPCM; the same measurements are made on
its ``HPCM`` (Base / Large only) with identical weights and inputs and printed as ratios
official / ours. On a CPU-only machine that copy must be runnable on CPU (its hard-coded
``device='cuda'`` removed, its ``_CXX`` / ``unbounded_ans`` extensions built or replaced by
compressai's; see tests/fixtures/README_hpcm_golden.md). Official coding needs image sizes that are
multiples of 256.

Times are medians over ``--repeats`` runs after one warm-up, in milliseconds; "train step" is
forward + rate-distortion loss + backward (no optimizer step), on a batch of ``--batch`` images.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Callable

import torch

from hpcm.models import build_model
from hpcm.models.coder import CODER_BUFFER_NAMES
from hpcm.models.entropy import get_scale_table


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    fn()  # warm-up: mask caches, cuDNN autotuning, allocator
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def rd_loss(out: dict, x: torch.Tensor) -> torch.Tensor:
    pixels = x.shape[0] * x.shape[2] * x.shape[3]
    bpp = sum(-torch.log2(l.float()).sum() for l in out["likelihoods"].values()) / pixels
    return 0.013 * 255**2 * torch.mean((out["x_hat"].float() - x.float()) ** 2) + bpp


def measure(model: torch.nn.Module, x: torch.Tensor, args, device: torch.device) -> dict[str, float]:
    """Forward (eval), train step (train mode, backward), compress and decompress of image 0."""
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=args.bf16)
    results = {}

    model.eval()
    if not args.skip_training:
        with torch.no_grad(), autocast:
            results["forward"] = median_ms(lambda: model(x), device, args.repeats)

        model.train()

        def train_step():
            model.zero_grad(set_to_none=True)
            with autocast:
                out = model(x)
            rd_loss(out, x).backward()

        results["train step"] = median_ms(train_step, device, args.repeats)
        model.eval()
        model.zero_grad(set_to_none=True)

    if not args.skip_coding:
        model.update(get_scale_table(0.12, 64, 60))
        image = x[:1]
        with torch.no_grad():
            enc = model.compress(image)
            results["compress"] = median_ms(lambda: model.compress(image), device, args.repeats)
            results["decompress"] = median_ms(
                lambda: model.decompress(enc["strings"], enc["shape"]), device, args.repeats
            )
    return results


def load_official(path: str, name: str, ours: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """The official HPCM of ``name`` from a local copy, with our weights copied in."""
    if name not in ("HPCM_Base", "HPCM_Large"):
        raise ValueError(f"the official code has no {name}; compare HPCM_Base or HPCM_Large")
    sys.path.insert(0, path)
    module = __import__(f"src.models.{name}", fromlist=["HPCM"])
    official = module.HPCM().to(device)
    weights = {k: v for k, v in ours.state_dict().items() if k not in CODER_BUFFER_NAMES}
    official.load_state_dict(weights, strict=False)  # coder tables: built by update() in measure()
    return official


class _OfficialAdapter(torch.nn.Module):
    """Gives the official model our update()/compress() signatures for :func:`measure`."""

    def __init__(self, official: torch.nn.Module):
        super().__init__()
        self.official = official

    def forward(self, x):
        return self.official(x)

    def update(self, scale_table):
        return self.official.update(scale_table)

    def compress(self, x):
        return self.official.compress(x)

    def decompress(self, strings, shape):
        return self.official.decompress(strings, shape)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=None, help="default: Tiny+Small on CPU, all on CUDA")
    parser.add_argument("--size", nargs=2, type=int, default=(128, 128), metavar=("H", "W"))
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast for forward / train step (CUDA)")
    parser.add_argument("--no-channels-last", action="store_true", help="CUDA: keep NCHW")
    parser.add_argument("--skip-coding", action="store_true")
    parser.add_argument("--skip-training", action="store_true", help="no forward / train step columns")
    parser.add_argument("--official", default=None, help="path to a local lyq133/LIC-HPCM copy")
    args = parser.parse_args()

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    if args.threads:
        torch.set_num_threads(args.threads)
    presets = args.presets or (
        ["HPCM_Tiny", "HPCM_Small", "HPCM_Base", "HPCM_Large"] if device.type == "cuda" else ["HPCM_Tiny", "HPCM_Small"]
    )
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    channels_last = device.type == "cuda" and not args.no_channels_last
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    print(f"device={device} threads={torch.get_num_threads()} batch={args.batch} size={tuple(args.size)} "
          f"bf16={args.bf16} channels_last={channels_last} repeats={args.repeats}")

    columns = ["forward", "train step", "compress", "decompress"]
    print(f"{'model':<22}{'params M':>10}" + "".join(f"{c + ' ms':>16}" for c in columns))
    torch.manual_seed(0)
    for name in presets:
        model = build_model(name).to(device, memory_format=memory_format)
        params = sum(p.numel() for p in model.parameters()) / 1e6
        h, w = args.size
        if h % model.pad_multiple or w % model.pad_multiple:
            print(f"{name:<22}{params:>10.3f}  skipped: size must be a multiple of {model.pad_multiple}")
            continue
        x = torch.rand(args.batch, 3, h, w, device=device).to(memory_format=memory_format)
        ours = measure(model, x, args, device)
        print(f"{name:<22}{params:>10.3f}" + "".join(f"{ours[c]:>16.1f}" if c in ours else f"{'-':>16}" for c in columns))
        if args.official:
            official = _OfficialAdapter(load_official(args.official, name, model, device))
            theirs = measure(official, x, args, device)
            print(f"{'  official':<22}{'':>10}" + "".join(f"{theirs.get(c, float('nan')):>16.1f}" for c in columns))
            print(f"{'  ratio official/ours':<22}{'':>10}"
                  + "".join(f"{theirs[c] / ours[c]:>16.2f}" if c in ours else f"{'-':>16}" for c in columns))


if __name__ == "__main__":
    main()
