"""Training throughput of the trainer's own step on the CPU against the arithmetic limit (issue 24).

    python benchmarks/train_throughput.py                               # Tiny + Small, 2 threads
    python benchmarks/train_throughput.py --presets HPCM_Tiny --repeats 7 --json out.json
    python benchmarks/train_throughput.py --threads 1                   # load-proof thread time

Every setting is a set of run-config keys (``hpcm.config.run_config``) on top of the demo's
(batch 8 of 64x64 crops, Adam); each builds a ``hpcm.train`` Run exactly as ``python -m
hpcm.train`` does and times ``Run.train_step`` (zero_grad, forward, loss, backward, clip, Adam),
with the trainer's schedules applied. The first setting, ``default``, is today's default path
(contiguous, eager); every other setting runs interleaved with it, repeat by repeat (order
alternating), and its speed-up is the median (and IQR) of the paired per-repeat ratios of
pixels/s, so that load drifting on a shared machine hits both alike.

Arithmetic: one step's FLOPs from ``torch.utils.flop_counter`` (convolutions, matrix products,
attention) and the GEMM rate of the same threads, measured in the same run between the repeats
(a square float32 ``torch.mm``, the best a core does with this torch build). The limit is
FLOPs / GEMM rate, the step time if every FLOP ran at GEMM speed and nothing else took time; the
"of limit" column is the step's GFLOP/s over the GEMM's.

Times: wall clock (``time.perf_counter``) with more than one thread; with ``--threads 1`` the
thread's CPU time, which other processes on a busy machine do not inflate. On a busy machine,
``OMP_WAIT_POLICY=PASSIVE python benchmarks/train_throughput.py --clock cpu`` times the main
thread's CPU time with 2 threads too (see ``step_clock``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from model_speed import quartiles  # noqa: E402

from hpcm.config import run_config  # noqa: E402
from hpcm.models.presets import preset_config  # noqa: E402
from hpcm.train import loop as train  # noqa: E402


def recipe(config: str, keys: tuple[str, ...]) -> dict[str, Any]:
    """The throughput-relevant run keys of a study's `training` section (config files keep them)."""
    training = yaml.safe_load((REPO / config).read_text())["training"]
    return {key: training[key] for key in keys}


# The demo's crops and batch (config.yaml) in today's default layout: the reference of every ratio.
DEMO = recipe("config.yaml", ("batch_size", "patch_size"))
DEFAULT = {**DEMO, "memory_format": "contiguous"}
# The pilot's setting (workflow/configs/pilot.yaml). It keeps 64x64 crops although 128x128 moves
# more pixels per second: from scratch, at equal CPU time, more steps of 64x64 train further
# (docs/results.md, "Budget").
PILOT = recipe("workflow/configs/pilot.yaml", ("batch_size", "patch_size", "memory_format"))
CROP128 = {"batch_size": 8, "patch_size": 128, "memory_format": "channels_last"}
SETTINGS: dict[str, dict[str, Any]] = {
    "default": DEFAULT,
    "pilot": PILOT,
    "128 contiguous": {**CROP128, "memory_format": "contiguous"},
    "128": CROP128,
    "128 b16": {**CROP128, "batch_size": 16},
    # torch.compile (inductor, C++ on the CPU); its compilation is in the untimed warm-up
    "128 compiled": {**CROP128, "compile": True},
    "pilot compiled": {**PILOT, "compile": True},
}
GOAL_SPEEDUP, GOAL_OF_LIMIT = 4.0, 1 / 3  # issue 24, HPCM_Tiny at the pilot's setting, 2 cores
JSON_FORMAT = "hpcm-train-throughput/1"


def build_run(model: str, overrides: dict[str, Any]) -> train.Run:
    """A Run as ``python -m hpcm.train`` builds it (embedded samples; nothing is written)."""
    cfg = run_config.resolve(
        {
            "model": model,
            "steps": 1000,
            "device": "cpu",
            "num_workers": 0,
            "wandb_mode": "disabled",
            "quiet": True,
            **overrides,
        }
    )
    run = train.Run(cfg, Path("/nonexistent-train-throughput"))
    run.open_data()
    run.build(None)
    return run


def batch_for(run: train.Run) -> torch.Tensor:
    """A fixed batch of the run's shape and layout (the loop makes this conversion)."""
    generator = torch.Generator().manual_seed(0)
    size, count = run.cfg.patch_size, run.cfg.batch_size
    x = torch.rand(count, 3, size, size, generator=generator)
    return x.contiguous(memory_format=torch.channels_last) if run.channels_last else x


CLOCKS = {"wall": time.perf_counter, "cpu": time.thread_time}
_clock = {"name": "wall"}


def step_clock() -> Callable[[], float]:
    """The wall clock, or the calling thread's CPU time (``--clock cpu``, the default with one
    thread). With more threads and ``OMP_WAIT_POLICY=PASSIVE`` (idle OpenMP threads sleep
    instead of spinning) the main thread's CPU time is its serial work plus its share of every
    parallel region: on a busy machine an estimate, from below, of the quiet machine's wall time."""
    return CLOCKS[_clock["name"]]


def time_steps(run: train.Run, x: torch.Tensor, steps: int) -> float:
    """Seconds per step of the trainer's own step, schedules applied as the loop applies them."""
    clock = step_clock()
    start = clock()
    for _ in range(steps):
        run.step += 1
        run.train_step(run.step, x)
    return (clock() - start) / steps


def step_flops(run: train.Run, x: torch.Tensor) -> int:
    """FLOPs of one trainer step (torch.utils.flop_counter: convolutions, matmuls, attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        run.train_step(run.step, x)
    return counter.get_total_flops()


def gemm_rate(size: int = 1024, calls: int = 4) -> float:
    """FLOP/s of a square float32 matrix product on the current threads (best of ``calls``)."""
    a, b = torch.rand(size, size), torch.rand(size, size)
    out = torch.empty(size, size)
    torch.mm(a, b, out=out)  # warm-up (MKL buffers)
    clock, best = step_clock(), 0.0
    for _ in range(calls):
        start = clock()
        torch.mm(a, b, out=out)
        best = max(best, 2 * size**3 / max(clock() - start, 1e-9))
    return best


def for_model(model: str, settings: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The settings with crops raised to the model's smallest (HPCM_Small: 128 px, so its demo
    rows train 128 px crops; a note is printed)."""
    multiple = preset_config(model).pad_multiple
    adjusted = {}
    for label, keys in settings.items():
        size = keys["patch_size"]
        fitted = max(multiple, size // multiple * multiple)
        if fitted != size:
            print(
                f"{model}: '{label}' trains {fitted} px crops "
                f"({size} px is not a multiple of {multiple})"
            )
        adjusted[label] = {**keys, "patch_size": fitted}
    return adjusted


def measure(
    model: str, settings: dict[str, dict[str, Any]], repeats: int, steps: int
) -> dict[str, Any]:
    """Per setting: seconds per step of every repeat, FLOPs, and the GEMM rate between repeats."""
    runs = {label: build_run(model, keys) for label, keys in settings.items()}
    batches = {label: batch_for(run) for label, run in runs.items()}
    # also the first warm-up
    flops = {label: step_flops(run, batches[label]) for label, run in runs.items()}
    for label, run in runs.items():
        time_steps(run, batches[label], 1)  # second warm-up: allocator, oneDNN primitive caches
    seconds: dict[str, list[float]] = {label: [] for label in runs}
    gemm: list[float] = []
    labels = list(runs)
    for repeat in range(repeats):
        for label in labels if repeat % 2 == 0 else labels[::-1]:
            seconds[label].append(time_steps(runs[label], batches[label], steps))
        gemm.append(gemm_rate())
    return {
        "seconds": seconds,
        "flops": flops,
        "gemm_flop_s": gemm,
        "pixels": {
            label: run.cfg.batch_size * run.cfg.patch_size**2 for label, run in runs.items()
        },
    }


def summarise(result: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per setting: ms/step, pixels/s, speed-up over ``default`` (paired), GFLOP/s and
    the share of the limit."""
    seconds, pixels, flops = result["seconds"], result["pixels"], result["flops"]
    gemm = statistics.median(result["gemm_flop_s"])
    reference = [pixels["default"] / s for s in seconds["default"]]
    rows = []
    for label, values in seconds.items():
        rates = [pixels[label] / s for s in values]
        ratio, q1, q3 = quartiles([r / ref for r, ref in zip(rates, reference)])
        step = statistics.median(values)
        rows.append(
            {
                "setting": label,
                "ms_per_step": step * 1e3,
                "pixels_per_s": statistics.median(rates),
                "speedup": ratio,
                "speedup_q1": q1,
                "speedup_q3": q3,
                "gflop_per_step": flops[label] / 1e9,
                "gflop_s": flops[label] / step / 1e9,
                "of_limit": flops[label] / step / gemm,
                "limit_ms": flops[label] / gemm * 1e3,
            }
        )
    return rows


def print_table(
    model: str, rows: list[dict[str, Any]], gemm: float, settings: dict[str, dict[str, Any]]
) -> None:
    print(f"\n{model}: GEMM {gemm / 1e9:.1f} GFLOP/s (median between repeats)")
    print(
        f"{'setting':<20}{'keys':<44}{'ms/step':>9}{'kpx/s':>9}{'x default (IQR)':>20}"
        f"{'GFLOP':>8}{'GFLOP/s':>9}{'of limit':>10}"
    )
    for row in rows:
        keys = " ".join(f"{k}={v}" for k, v in settings[row["setting"]].items())
        keys = keys.replace("batch_size", "b").replace("patch_size", "p")
        keys = keys.replace("memory_format=", "")
        spread = f"{row['speedup']:.2f} ({row['speedup_q1']:.2f}-{row['speedup_q3']:.2f})"
        print(
            f"{row['setting']:<20}{keys:<44}{row['ms_per_step']:>9.1f}"
            f"{row['pixels_per_s'] / 1e3:>9.1f}{spread:>20}{row['gflop_per_step']:>8.2f}"
            f"{row['gflop_s']:>9.1f}{row['of_limit']:>10.1%}"
        )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--presets", nargs="+", default=["HPCM_Tiny", "HPCM_Small"])
    parser.add_argument(
        "--settings",
        nargs="+",
        default=list(SETTINGS),
        choices=list(SETTINGS),
        help="settings to time ('default' is always included: the reference)",
    )
    parser.add_argument(
        "--threads", type=int, default=2, help="torch intra-op threads (the goal: 2)"
    )
    parser.add_argument(
        "--clock",
        choices=list(CLOCKS),
        default=None,
        help="wall (default with > 1 thread) or cpu: the main thread's CPU time "
        "(default with 1 thread; with more, run under "
        "OMP_WAIT_POLICY=PASSIVE)",
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=1, help="steps per timed repeat")
    parser.add_argument("--json", default=None, help="also write every repeat and the summary here")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.steps < 1 or args.threads < 1:
        parser.error("--repeats, --steps and --threads must be >= 1")
    torch.set_num_threads(args.threads)
    _clock["name"] = args.clock or ("cpu" if args.threads == 1 else "wall")
    passive = os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE"
    if _clock["name"] == "cpu" and args.threads > 1 and not passive:
        parser.error(
            "--clock cpu with more than one thread needs OMP_WAIT_POLICY=PASSIVE in the "
            "environment (spinning OpenMP threads would count as work)"
        )
    settings = {"default": DEFAULT, **{k: SETTINGS[k] for k in args.settings if k != "default"}}
    print(
        f"threads={torch.get_num_threads()} repeats={args.repeats} steps/repeat={args.steps} "
        f"clock={step_clock().__name__} torch={torch.__version__} "
        f"cpu capability={torch.backends.cpu.get_cpu_capability()}"
    )
    record: dict[str, Any] = {
        "format": JSON_FORMAT,
        "args": vars(args),
        "settings": settings,
        "presets": {},
    }
    for model in args.presets:
        fitted = for_model(model, settings)
        result = measure(model, fitted, args.repeats, args.steps)
        rows = summarise(result)
        gemm = statistics.median(result["gemm_flop_s"])
        print_table(model, rows, gemm, fitted)
        record["presets"][model] = {**result, "settings": fitted, "rows": rows}
        if model == "HPCM_Tiny":
            for row in rows:
                if row["setting"] == "default":
                    continue
                met = row["speedup"] >= GOAL_SPEEDUP and row["of_limit"] >= GOAL_OF_LIMIT
                print(
                    f"goal (HPCM_Tiny, {row['setting']}): >= {GOAL_SPEEDUP:.0f}x default "
                    f"pixels/s and >= 1/3 of the limit: {'met' if met else 'NOT met'} "
                    f"({row['speedup']:.2f}x, {row['of_limit']:.1%})"
                )
    print(
        "speed-up: median (q1-q3) of per-repeat paired ratios to 'default'; "
        "of limit: GFLOP/s / GEMM GFLOP/s"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=1))
    return record


if __name__ == "__main__":
    main()
