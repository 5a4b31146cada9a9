"""Op counts and CPU step time of the sync-free Balanced step vs Adam (issue 15, point a).

    python benchmarks/sync_free_ops.py                 # HPCM_Tiny, 2 x 64 px, 1 thread, CPU

The GPU cost of ``balanced next_batch`` is launches and device-to-device copies, not arithmetic
(docs/results-log.md, GPU run 2). With no GPU, this counts the ATen ops one ``Run.train_step``
issues on CPU (torch.profiler; the ops are the same ones CUDA would launch, so the counts are a
proxy for kernel launches): ``aten::copy_`` and ``aten::clone`` (the per-tensor copies),
``aten::item`` /
``aten::_local_scalar_dense`` (host reads = syncs on CUDA), and all leaf ops (ops with no child
op: roughly one kernel each). Variants: adam (torch's fused Adam), balanced next_batch with the
device-side decisions (``sync_free``, the CUDA path) and with the host path.

Then the CPU step-time ratio balanced / adam: ``--rounds`` interleaved rounds of ``--steps``
steps, thread CPU time, median and IQR of the per-round ratios.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hpcm.config import run_config  # noqa: E402
from hpcm.train import loop as train  # noqa: E402

VARIANTS = {  # name: (optimizer, update_mode, sync_free)
    "adam": ("adam", "same_batch", False),
    "balanced next_batch sync_free": ("balanced", "next_batch", True),
    "balanced next_batch host": ("balanced", "next_batch", False),
    "balanced same_batch sync_free": ("balanced", "same_batch", True),
}
COUNTED = ("aten::copy_", "aten::clone", "aten::cat", "aten::where", "aten::_local_scalar_dense")


def build(args: argparse.Namespace, optimizer: str, mode: str, sync_free: bool) -> train.Run:
    cfg = run_config.resolve(
        {
            "model": args.model,
            "patch_size": args.patch_size,
            "batch_size": args.batch_size,
            "steps": 1000,
            "device": "cpu",
            "num_workers": 0,
            "wandb_mode": "disabled",
            "quiet": True,
            "optimizer": optimizer,
            "update_mode": mode,
        }
    )
    run = train.Run(cfg, Path("/nonexistent-benchmark-run"))
    run.sync_free = sync_free  # what CUDA training sets; the optimizers run it on CPU as well
    run.open_data()
    run.build(None)
    return run


def count_ops(run: train.Run, x: torch.Tensor, steps: int) -> dict[str, float]:
    """Per-step counts of the ops in COUNTED, of leaf ops, and of ops under the optimizer step."""
    run.train_step(run.step + 1, x)  # state creation happens outside the counted steps
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            run.train_step(run.step + 1, x)
    events = prof.events()
    names = Counter(e.name for e in events)
    leaves = sum(1 for e in events if not e.cpu_children and e.name.startswith("aten::"))
    counts = {name: names.get(name, 0) / steps for name in COUNTED}
    counts["leaf aten ops"] = leaves / steps
    return counts


def step_seconds(run: train.Run, x: torch.Tensor, steps: int) -> float:
    start = time.thread_time()
    for _ in range(steps):
        run.train_step(run.step + 1, x)
    return (time.thread_time() - start) / steps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="HPCM_Tiny")
    parser.add_argument("--patch-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--profile-steps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    x = torch.rand(args.batch_size, 3, args.patch_size, args.patch_size)
    runs = {name: build(args, *spec) for name, spec in VARIANTS.items()}

    print(
        f"ops per Run.train_step ({args.model}, {args.batch_size} x {args.patch_size} px, CPU, "
        f"torch {torch.__version__}; {args.profile_steps} profiled steps)"
    )
    columns = [*COUNTED, "leaf aten ops"]
    print("| variant | " + " | ".join(columns) + " |")
    print("|---|" + "---|" * len(columns))
    for name, run in runs.items():
        counts = count_ops(run, x, args.profile_steps)
        print(f"| {name} | " + " | ".join(f"{counts[c]:.0f}" for c in columns) + " |")

    ratios: dict[str, list[float]] = {name: [] for name in runs if name != "adam"}
    names = list(runs)
    for name in names:
        step_seconds(runs[name], x, 1)  # warm-up
    for r in range(args.rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        times = {name: step_seconds(runs[name], x, args.steps) for name in order}
        for name in ratios:
            ratios[name].append(times[name] / times["adam"])
    print(
        f"\nCPU step time / adam ({args.rounds} interleaved rounds of {args.steps} steps, thread "
        "CPU time)"
    )
    for name, values in ratios.items():
        q1, med, q3 = statistics.quantiles(values, n=4)
        print(f"{name}: {statistics.median(values):.3f} (IQR {q1:.3f}-{q3:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
