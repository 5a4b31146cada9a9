"""Evaluate a run's training snapshots for the convergence table, in one process.

Each snapshot ``<run-dir>/epoch_<step>.pth.tar`` is evaluated exactly as ``python -m
hpcm.evaluate`` would (``hpcm.evaluate.bitstreams.evaluate``: real bitstreams, the same CSV), on
the first ``--limit`` images of the dataset; one process for all of a run's snapshots saves the
interpreter and library start-up of every further one (seconds each on a laptop CPU).

CLI::

    python -m hpcm.analysis.snapshots --run-dir results/train/phase1/lmbda0.0025/seed0
        --steps 250 500 750 --outputs a/step250.csv a/step500.csv a/step750.csv
        --dataset results/data/kodak --dataset-name kodak --limit 6 --model HPCM_Tiny
        --variant phase1 --lmbda 0.0025 --seed 0 [--device cpu]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from hpcm.evaluate.bitstreams import evaluate
from hpcm.util.cli import run_command

SNAPSHOT = "epoch_{step}.pth.tar"  # hpcm.train.checkpoints' snapshot name


def evaluate_snapshots(
    run_dir: str | Path,
    steps: Sequence[int],
    outputs: Sequence[str | Path],
    dataset: str | Path,
    dataset_name: str,
    limit: int,
    model: str,
    variant: str,
    lmbda: float,
    seed: int,
    device: str = "cpu",
) -> list[Path]:
    if len(steps) != len(outputs):
        raise ValueError(f"{len(steps)} steps but {len(outputs)} outputs: give one output per step")
    missing = [
        str(Path(run_dir) / SNAPSHOT.format(step=s))
        for s in steps
        if not (Path(run_dir) / SNAPSHOT.format(step=s)).is_file()
    ]
    if missing:
        raise FileNotFoundError(
            f"snapshot(s) not found: {', '.join(missing)} (was the run "
            "trained with snapshot_every and snapshot_keep: 0?)"
        )
    for step, output in zip(steps, outputs):
        evaluate(
            Path(run_dir) / SNAPSHOT.format(step=step),
            dataset,
            output,
            model_name=model,
            device=device,
            dataset_name=dataset_name,
            variant=variant,
            lmbda=lmbda,
            limit=limit,
            seed=seed,
        )
        print(f"step {step}: wrote {output}")
    return [Path(o) for o in outputs]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m hpcm.analysis.snapshots",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--steps", type=int, nargs="+", required=True)
    parser.add_argument("--outputs", nargs="+", required=True, help="one per-image CSV per step")
    parser.add_argument("--dataset", required=True, help="image folder")
    parser.add_argument("--dataset-name", required=True)
    parser.add_argument(
        "--limit", type=int, required=True, help="the first N images (sorted names)"
    )
    parser.add_argument("--model", required=True)
    parser.add_argument("--variant", required=True)
    parser.add_argument("--lmbda", type=float, required=True)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--device", default="cpu")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(
        lambda: evaluate_snapshots(
            args.run_dir,
            args.steps,
            args.outputs,
            args.dataset,
            args.dataset_name,
            args.limit,
            args.model,
            args.variant,
            args.lmbda,
            args.seed,
            args.device,
        )
    )


if __name__ == "__main__":
    sys.exit(main())
