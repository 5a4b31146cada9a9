"""Data-parallel scaling (issue 11, point 6): training steps/s on 1 and 2 processes, same global
batch.

    nice python benchmarks/ddp_scaling.py    # CPU, gloo: HPCM_Tiny, global batch 4 x 64 px
    python benchmarks/ddp_scaling.py --device cuda --model HPCM_Base --patch-size 256
        --batch-size 16

Each measurement launches the trainer's own step (``hpcm.train.loop.Run.train_step``: forward,
all-gather of the losses, backward, gradient all-reduce, clip, step) in fresh processes: one plain
process, then ``torchrun --standalone --nproc-per-node 2`` (gloo on CPU, NCCL on CUDA), each with
one intra-op thread on CPU. Data loading is excluded (fixed batches: each rank its rows of the
global batch). ``--warmup`` steps, then ``--steps`` timed steps (wall clock between two barriers).

Strong scaling (the global batch stays ``--batch-size``): speed-up = steps/s(2) / steps/s(1),
efficiency = speed-up / 2. Rounds alternate 1 and 2 processes; the ratio is taken within each round
(load on a shared machine drifts between rounds) and the median and range over ``--rounds`` are
printed. CUDA runs need 2 visible GPUs; with fewer the script says so and measures CPU only.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from hpcm.config import run_config  # noqa: E402
from hpcm.train import distributed, loop  # noqa: E402


def worker(args: argparse.Namespace) -> None:
    """One process of a measurement: print (rank 0) steps/s as JSON."""
    torch.set_num_threads(1)
    cfg = run_config.resolve(
        {
            "model": args.model,
            "patch_size": args.patch_size,
            "batch_size": args.batch_size,
            "steps": args.warmup + args.steps,
            "optimizer": args.optimizer,
            "device": args.device,
            "num_workers": 0,
            "wandb_mode": "disabled",
            "quiet": True,
        }
    )
    processes = distributed.Processes.start(cfg, loop.pick_device(cfg.device, "--device"))
    run = loop.Run(cfg, Path("."), processes)
    run.open_data()
    run.build(None)
    rows = args.batch_size // processes.world_size
    generator = torch.Generator().manual_seed(0)
    batch = torch.rand(args.batch_size, 3, args.patch_size, args.patch_size, generator=generator)
    x = batch[processes.rank * rows : (processes.rank + 1) * rows].to(run.device)
    if run.cuda:
        x = x.contiguous(memory_format=torch.channels_last)
    for _ in range(args.warmup):
        run.train_step(run.step + 1, x)
    synchronize(run)
    processes.barrier()
    start = time.perf_counter()
    for _ in range(args.steps):
        run.train_step(run.step + 1, x)
    synchronize(run)
    processes.barrier()
    elapsed = time.perf_counter() - start
    if processes.is_writer:
        print(json.dumps({"world_size": processes.world_size, "steps_per_s": args.steps / elapsed}))
    processes.close()


def synchronize(run: loop.Run) -> None:
    if run.cuda:
        torch.cuda.synchronize(run.device)


def measure(args: argparse.Namespace, world_size: int) -> float:
    """steps/s of one fresh measurement on ``world_size`` processes."""
    options = [
        "--worker",
        "--model",
        args.model,
        "--patch-size",
        str(args.patch_size),
        "--batch-size",
        str(args.batch_size),
        "--optimizer",
        args.optimizer,
        "--device",
        args.device,
        "--warmup",
        str(args.warmup),
        "--steps",
        str(args.steps),
    ]
    script = str(Path(__file__).resolve())
    command = (
        [sys.executable, script]
        if world_size == 1
        else [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            str(world_size),
            script,
        ]
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command + options, cwd=REPO, env=env, capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(
            f"measurement on {world_size} process(es) failed:\n{result.stderr[-3000:]}"
        )
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    return json.loads(lines[-1])["steps_per_s"]


def scaling(args: argparse.Namespace) -> None:
    one, two, ratios = [], [], []
    for _ in range(args.rounds):
        one.append(measure(args, 1))
        two.append(measure(args, 2))
        ratios.append(two[-1] / one[-1])
    efficiency = [r / 2 for r in ratios]
    backend = "NCCL" if args.device.startswith("cuda") else "gloo"
    print(
        f"{args.model}, {args.optimizer}, global batch {args.batch_size} x {args.patch_size} px, "
        f"{args.device} ({backend}), {args.steps} timed steps after {args.warmup}, {args.rounds} "
        "rounds; median [min, max]:"
    )
    for name, values in (
        ("1 process   steps/s", one),
        ("2 processes steps/s", two),
        ("speed-up (2 vs 1)", ratios),
        ("efficiency (speed-up / 2)", efficiency),
    ):
        print(
            f"  {name:26s} {statistics.median(values):7.3f}  [{min(values):.3f}, {max(values):.3f}]"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="HPCM_Tiny")
    parser.add_argument("--patch-size", type=int, default=64)
    parser.add_argument(
        "--batch-size", type=int, default=4, help="global batch (split over the processes)"
    )
    parser.add_argument("--optimizer", default="adam", choices=run_config.OPTIMIZERS)
    parser.add_argument("--device", default="cpu", help="cpu, or cuda (each rank its own GPU)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    if args.device.startswith("cuda"):
        available = torch.cuda.device_count()
        if available < 2:
            print(
                f"GPU scaling not measured: {available} CUDA device(s) visible, 2 needed; "
                "measuring CPU (gloo)"
            )
            args.device = "cpu"
    scaling(args)
    if args.device == "cpu":
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if gpus >= 2:
            print("several GPUs are visible: run again with --device cuda for the GPU numbers")
        else:
            print(f"GPU scaling not measured here: {gpus} CUDA device(s) visible (2 needed)")


if __name__ == "__main__":
    main()
