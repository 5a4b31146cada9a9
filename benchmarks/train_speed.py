"""Training-step throughput of every variant, as steps/s and as a ratio to the Adam baseline.

    python benchmarks/train_speed.py                       # CPU: HPCM_Tiny, 2 x 64 px
    python benchmarks/train_speed.py --model HPCM_Base --patch-size 256 --batch-size 8 --device cuda --bf16

Each variant runs ``hpcm.train.Run.train_step`` (the exact code of ``python -m hpcm.train``) on one
fixed batch: warm-up steps first, then ``--steps`` timed steps (CUDA is synchronised before and after
the timed block only, so the numbers include any host sync the step itself forces). Data loading is
excluded: it runs in worker processes during training. Variants are interleaved over ``--rounds``
rounds and the best round is kept, which damps noise from other load on the machine. On CPU with
one torch thread (``--threads 1``) the clock is the thread's CPU time, which that load does not
inflate; otherwise wall-clock time.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hpcm import data, run_config, train  # noqa: E402

VARIANTS = {
    "baseline (adam)": {"variant": "baseline"},
    "cautious_adam": {"optimizer": "cautious_adam"},
    "phase1 same_batch": {"variant": "phase1"},
    "phase1 next_batch": {"variant": "phase1", "update_mode": "next_batch"},
    "qp": {"optimizer": "qp"},
    "phase3 measured": {"variant": "phase3"},
    "phase3 measured next_batch": {"variant": "phase3", "update_mode": "next_batch"},
    "phase3 fixed_ratio": {"variant": "phase3", "decomposition": "fixed_ratio"},
}


def build(args: argparse.Namespace, overrides: dict) -> train.Run:
    cfg = run_config.resolve({
        "model": args.model, "patch_size": args.patch_size, "batch_size": args.batch_size, "steps": 1000,
        "device": args.device, "bf16": args.bf16, "num_workers": 0, "wandb_mode": "disabled", "quiet": True,
        **overrides})
    run = train.Run(cfg, Path("/nonexistent-benchmark-run"))
    run.open_data()
    run.build(None)
    return run


def step_clock(device: torch.device):
    """CPU with one torch thread: the calling thread's CPU time, which other load on a shared
    machine does not inflate (every op runs on this thread); otherwise wall-clock time."""
    return time.thread_time if device.type == "cpu" and torch.get_num_threads() == 1 else time.perf_counter


def time_steps(run: train.Run, x: torch.Tensor, steps: int) -> float:
    clock = step_clock(run.device)
    if run.cuda:
        torch.cuda.synchronize()
    start = clock()
    for _ in range(steps):
        run.step += 1
        run.apply_schedules(run.step)
        run.train_step(x)
    if run.cuda:
        torch.cuda.synchronize()
    return clock() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="HPCM_Tiny")
    parser.add_argument("--patch-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per round")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    runs = {name: build(args, VARIANTS[name]) for name in args.variants}
    first = next(iter(runs.values()))
    loader = data.train_loader(first.train_set, args.patch_size, args.batch_size, seed=0, total_steps=1)
    x = next(iter(loader)).to(first.device)
    if first.cuda:
        x = x.contiguous(memory_format=torch.channels_last)
    for run in runs.values():
        time_steps(run, x, args.warmup)
    best = {name: float("inf") for name in runs}
    for _ in range(args.rounds):
        for name, run in runs.items():
            best[name] = min(best[name], time_steps(run, x, args.steps) / args.steps)

    print(f"device {first.device}, model {args.model}, batch {args.batch_size} x {args.patch_size}^2, "
          f"{args.steps} steps x {args.rounds} rounds (best round), torch threads {torch.get_num_threads()}")
    reference = best.get("baseline (adam)")
    print(f"{'variant':<28} {'s/step':>9} {'steps/s':>9} {'ratio to baseline':>18}")
    for name, seconds in best.items():
        ratio = f"{reference / seconds:.3f}" if reference else "n/a"
        print(f"{name:<28} {seconds:9.4f} {1 / seconds:9.3f} {ratio:>18}")
    print("ratio = baseline s/step / variant s/step (1.0 = as fast as Adam, 0.8 = 20 % slower)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
