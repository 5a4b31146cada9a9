"""Overhead of the study's optimizers (issue 3): the trainer's step time and peak memory, vs Adam.

    python benchmarks/optimizer_overhead.py          # CPU: HPCM_Tiny, 2 x 64 px, 1 thread
    python benchmarks/optimizer_overhead.py --model HPCM_Base --patch-size 256 --batch-size 8
        --device cuda --bf16

Every variant is ``hpcm.train.loop.Run.train_step`` (the code ``python -m hpcm.train`` runs; data
loading excluded, it runs in worker processes during training) on the same initial weights and the
same batch: adam (the baseline, torch's fused kernel), cautious_adam, balanced in both weight-update
modes, qp, and hierarchical_balanced with each decomposition (``--hier-mode``, next_batch by
default, against balanced in that mode).

Timing: ``--rounds`` rounds; in each, every variant runs ``--steps`` steps (order rotated per
round). On a shared machine load drifts between rounds, so each round's variant/Adam ratio is
taken within the round and the median over rounds is reported (with the median step time). With
one CPU thread (the default) the clock is the thread's CPU time (``step_clock``).
Peak memory: CUDA ``max_memory_allocated``; on CPU the peak RSS of a fresh process running two
steps of one variant (``--no-memory`` skips it). A second table times ``optimizer.step()`` alone
on fixed gradients (min of repeats): the optimizers' own cost without forward/backward noise.

Goals (issue 3): balanced next_batch within 3 % of Adam; hierarchical within 2 % of balanced.
The small default problem is the hard case: the update's cost is proportional to the number of
parameters, forward/backward to parameters x pixels, so larger batches and crops dilute it.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hpcm.config import run_config  # noqa: E402
from hpcm.data import images as data  # noqa: E402
from hpcm.optim import Balanced, CautiousAdam  # noqa: E402
from hpcm.train import loop as train  # noqa: E402
from hpcm.util.io import atomic_write_text  # noqa: E402

DECOMPOSITIONS = ("fixed_ratio", "adaptive", "measured")
JSON_FORMAT = "hpcm-optimizer-overhead/1"  # what hpcm tables --overhead-json reads


def build(args: argparse.Namespace, overrides: dict) -> train.Run:
    """A training run as ``python -m hpcm.train`` builds it (no output folder is written)."""
    cfg = run_config.resolve(
        {
            "model": args.model,
            "patch_size": args.patch_size,
            "batch_size": args.batch_size,
            "steps": 1000,
            "device": args.device,
            "bf16": args.bf16,
            "num_workers": 0,
            "wandb_mode": "disabled",
            "quiet": True,
            **overrides,
        }
    )
    run = train.Run(cfg, Path("/nonexistent-benchmark-run"))
    run.open_data()
    run.build(None)
    return run


def step_clock(device: torch.device):
    """CPU with one torch thread: the calling thread's CPU time, which other load on a shared
    machine does not inflate (every op runs on this thread); otherwise wall-clock time."""
    return (
        time.thread_time
        if device.type == "cpu" and torch.get_num_threads() == 1
        else time.perf_counter
    )


def time_steps(run: train.Run, x: torch.Tensor, steps: int) -> float:
    """Seconds for ``steps`` training steps (schedules applied as the trainer applies them)."""
    clock = step_clock(run.device)
    if run.cuda:
        torch.cuda.synchronize()
    start = clock()
    for _ in range(steps):
        run.step += 1
        run.train_step(run.step, x)
    if run.cuda:
        torch.cuda.synchronize()
    return clock() - start


def variants(hier_mode: str) -> dict[str, dict]:
    """Run-config overrides of each variant (``hpcm.config.run_config`` keys)."""
    table = {
        "adam": {"optimizer": "adam"},
        "cautious_adam": {"optimizer": "cautious_adam"},
        "balanced same_batch": {"optimizer": "balanced", "update_mode": "same_batch"},
        "balanced next_batch": {"optimizer": "balanced", "update_mode": "next_batch"},
        "qp": {"optimizer": "qp"},
    }
    for decomposition in DECOMPOSITIONS:
        table[f"hier {decomposition} {hier_mode}"] = {
            "optimizer": "hierarchical_balanced",
            "decomposition": decomposition,
            "gamma_strategy": "hierarchical",
            "update_mode": hier_mode,
        }
    return table


def first_batch(run, args) -> torch.Tensor:
    loader = data.train_loader(
        run.train_set, args.patch_size, args.batch_size, seed=0, total_steps=1
    )
    x = next(iter(loader)).to(run.device)
    return x.contiguous(memory_format=torch.channels_last) if run.cuda else x


def time_variants(args, table: dict[str, dict]) -> tuple[dict[str, dict], str]:
    """Per variant: step times of every round, median and min, peak memory; and the device."""
    runs = {name: build(args, overrides) for name, overrides in table.items()}
    first = next(iter(runs.values()))
    x = first_batch(first, args)
    peaks = {}
    for name, run in runs.items():
        if run.cuda:
            torch.cuda.reset_peak_memory_stats()
        time_steps(run, x, args.warmup)
        peaks[name] = torch.cuda.max_memory_allocated() / 2**20 if run.cuda else float("nan")
    # Every timed block starts from the same weights and RNG state: the forward/backward work is
    # then the same for every variant (the GGM's incomplete-gamma evaluations, for one, cost more
    # or less with the values), and only the optimizers' own work differs.
    initial = copy.deepcopy(first.model.state_dict())
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    for round_index in range(args.rounds):
        shift = round_index % len(names)  # rotate the order: no variant always runs first
        for name in names[shift:] + names[:shift]:
            runs[name].model.load_state_dict(initial)
            torch.manual_seed(round_index)
            seconds[name].append(time_steps(runs[name], x, args.steps) / args.steps)
    results = {
        name: {
            "rounds_s": values,
            "median_s": statistics.median(values),
            "min_s": min(values),
            "peak_mb": peaks[name],
        }
        for name, values in seconds.items()
    }
    return results, first.device.type


def paired_ratio(results: dict, name: str, reference: str) -> float:
    """Median over rounds of name's step time / reference's step time in the same round."""
    return statistics.median(
        a / b for a, b in zip(results[name]["rounds_s"], results[reference]["rounds_s"])
    )


def time_update_only(args) -> dict[str, float]:
    """Min time of ``optimizer.step()`` alone on fixed gradients of the model's parameters."""
    from hpcm.models import build_model

    torch.manual_seed(0)
    device = torch.device(
        "cuda"
        if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
        else "cpu"
    )
    params = [
        p.detach().to(device).requires_grad_(True) for p in build_model(args.model).parameters()
    ]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    makers = {
        "adam (fused)": lambda: torch.optim.Adam(params, lr=1e-4, fused=True),
        "adam (foreach)": lambda: torch.optim.Adam(params, lr=1e-4, foreach=True),
        "cautious_adam (default)": lambda: CautiousAdam(params, lr=1e-4),
        "cautious_adam (foreach)": lambda: CautiousAdam(params, lr=1e-4, foreach=True),
        # without a preceding clip, Balanced.step checks every gradient itself (one more pass)
        "balanced.step (default)": lambda: Balanced(params, lr=1e-4),
    }
    clock = step_clock(
        device
    )  # the step timings' clock: the "% of an Adam step" column compares like with like
    results = {}
    for name, make in makers.items():
        opt, times = make(), []
        for repeat in range(args.update_reps + 2):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = clock()
            opt.step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if repeat >= 2:
                times.append(clock() - start)
        results[name] = min(times)
    return results


def cpu_peak_rss(args, name: str) -> float:
    """Peak RSS (MiB) of a fresh process running two steps of one variant."""
    command = [
        sys.executable,
        __file__,
        "--model",
        args.model,
        "--batch-size",
        str(args.batch_size),
        "--patch-size",
        str(args.patch_size),
        "--device",
        "cpu",
        "--threads",
        str(args.threads),
        "--hier-mode",
        args.hier_mode,
        "--memory-child",
        name,
    ]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"memory run of {name!r} failed:\n{result.stderr[-2000:]}")
    return float(json.loads(result.stdout.strip().splitlines()[-1])["peak_rss_mb"])


def memory_child(args) -> None:
    run = build(args, variants(args.hier_mode)[args.memory_child])
    x = first_batch(run, args)
    # Reset the RSS high-water mark (Linux clear_refs "5"): the peak then covers the steps, not
    # the imports and model construction that every variant shares.
    Path("/proc/self/clear_refs").write_text("5")
    time_steps(run, x, 2)
    status = Path("/proc/self/status").read_text().splitlines()
    peak_kib = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
    print(json.dumps({"peak_rss_mb": peak_kib / 1024}))


def report(results: dict, update_only: dict[str, float], args, device: str) -> None:
    print(
        f"\nmodel {args.model}, batch {args.batch_size} x 3 x {args.patch_size}^2, device "
        f"{device}, {args.rounds} rounds x {args.steps} steps, torch {torch.__version__}, threads "
        f"{torch.get_num_threads()}"
    )
    print(f"{'variant':<30}{'ms/step':>9}{'min ms':>9}{'x Adam':>9}{'peak MiB':>10}")
    for name, r in results.items():
        ratio = paired_ratio(results, name, "adam")
        print(
            f"{name:<30}{r['median_s'] * 1e3:>9.1f}{r['min_s'] * 1e3:>9.1f}{ratio:>9.3f}"
            f"{r['peak_mb']:>10.1f}"
        )
    print("x Adam: median over rounds of (variant step time / Adam step time in the same round)")
    if update_only:
        adam = results["adam"]["median_s"]
        print(f"\noptimizer.step() alone on fixed gradients (min of {args.update_reps}):")
        for name, seconds in update_only.items():
            print(
                f"  {name:<28}{seconds * 1e3:>8.2f} ms  ({seconds / adam * 100:5.2f} % of an Adam "
                "training step)"
            )
    balanced = f"balanced {args.hier_mode}"
    pairs = [("balanced next_batch", "adam", 1.03)]
    pairs += [(name, balanced, 1.02) for name in results if name.startswith("hier ")]
    print("\ngoals (issue 3):")
    for name, reference, goal in pairs:
        ratio = paired_ratio(results, name, reference)
        print(
            f"  {name} / {reference} = {ratio:.3f}  (goal <= {goal:.2f}: "
            f"{'met' if ratio <= goal else 'NOT met'})"
        )


def json_document(
    results: dict, table: dict[str, dict], update_only: dict[str, float], args, device: str
) -> dict:
    """The ``--json`` output: one self-describing record per variant (``hpcm tables`` reads it)."""
    return {
        "format": JSON_FORMAT,
        "setup": {
            "model": args.model,
            "batch_size": args.batch_size,
            "patch_size": args.patch_size,
            "device": device,
            "threads": torch.get_num_threads(),
            "rounds": args.rounds,
            "steps": args.steps,
        },
        "variants": {
            name: {
                "optimizer": table[name]["optimizer"],
                "decomposition": table[name].get("decomposition", ""),
                "update_mode": table[name].get("update_mode", ""),
                "median_s": r["median_s"],
                "min_s": r["min_s"],
                "rounds_s": r["rounds_s"],
                "ratio_vs_adam": paired_ratio(results, name, "adam"),
                "peak_mb": None if math.isnan(r["peak_mb"]) else r["peak_mb"],
            }  # None: --no-memory
            for name, r in results.items()
        },
        "update_only_s": update_only,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="HPCM_Tiny")
    parser.add_argument("--patch-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per variant and round")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (1: steadier on a shared machine)"
    )
    parser.add_argument("--hier-mode", choices=("same_batch", "next_batch"), default="next_batch")
    parser.add_argument(
        "--no-memory", action="store_true", help="skip the CPU peak-RSS subprocesses"
    )
    parser.add_argument(
        "--update-reps", type=int, default=30, help="repeats of the update-only timing (0 skips)"
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_child:
        memory_child(args)
        return 0
    table = variants(args.hier_mode)
    results, device = time_variants(args, table)
    if device == "cpu" and not args.no_memory:
        for name in table:
            results[name]["peak_mb"] = cpu_peak_rss(args, name)
    update_only = time_update_only(args) if args.update_reps > 0 else {}
    report(results, update_only, args, device)
    if args.json:
        atomic_write_text(
            args.json,
            json.dumps(
                json_document(results, table, update_only, args, device), indent=2, allow_nan=False
            ),
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
