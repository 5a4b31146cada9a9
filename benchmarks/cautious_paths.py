"""Does each fast path of CautiousAdam earn its keep? ``optimizer.step()`` time per update path.

    python benchmarks/cautious_paths.py                 # CPU: HPCM_Tiny parameters, 1 thread
    python benchmarks/cautious_paths.py --device cuda   # the reference, foreach and sync_free paths

Every path runs ``optimizer.step()`` on the same parameters and fixed gradients. ``--rounds`` rounds
(order rotated per round); per round each path's time is the min of ``--reps`` steps, and its ratio
to the reference path (``foreach=False``, the official per-tensor loop, the definition) is taken
within the round. Printed: the median ratio over rounds and its spread (min..max), plus the median
milliseconds. torch's fused Adam is the yardstick of what one pass over the parameters costs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hpcm.models import build_model  # noqa: E402
from hpcm.optim import CautiousAdam  # noqa: E402


def paths(device: torch.device) -> dict[str, dict]:
    table = {
        "reference (foreach=False)": dict(foreach=False),
        "foreach": dict(foreach=True),
        "sync_free": dict(sync_free=True),
    }
    if device.type == "cpu":
        table["C kernel (fused=True)"] = dict(fused=True)
    return table


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="HPCM_Tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--reps", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    base = [p.detach().to(device) for p in build_model(args.model).parameters()]
    grads = [torch.randn_like(p) * 1e-3 for p in base]
    optimizers = {}
    for name, options in {**paths(device), "torch Adam (fused)": None}.items():
        params = [p.clone().requires_grad_(True) for p in base]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        optimizers[name] = (
            torch.optim.Adam(params, lr=1e-4, fused=True)
            if options is None
            else CautiousAdam(params, lr=1e-4, **options)
        )
        optimizers[name].step()  # first step: state allocation, kernel build
    clock = time.thread_time if device.type == "cpu" and args.threads == 1 else time.perf_counter
    seconds: dict[str, list[float]] = {name: [] for name in optimizers}
    names = list(optimizers)
    for round_index in range(args.rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            best = float("inf")
            for _ in range(args.reps):
                if device.type == "cuda":
                    torch.cuda.synchronize()
                start = clock()
                optimizers[name].step()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                best = min(best, clock() - start)
            seconds[name].append(best)
    reference = seconds[names[0]]
    print(
        f"{args.model} ({sum(p.numel() for p in base) / 1e6:.2f} M parameters, {len(base)} "
        f"tensors), device {device}, {torch.get_num_threads()} thread(s), torch "
        f"{torch.__version__}, {args.rounds} rounds x min of {args.reps} steps"
    )
    print(f"{'path':<34}{'ms/step':>9}{'x reference':>13}{'spread':>16}")
    for name, values in seconds.items():
        ratios = [v / r for v, r in zip(values, reference)]
        print(
            f"{name:<34}{statistics.median(values) * 1e3:>9.2f}{statistics.median(ratios):>13.3f}"
            f"{f'{min(ratios):.3f}..{max(ratios):.3f}':>16}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
