"""Overhead of the study's optimizers: time of one training step and peak memory, vs Adam.

One model, one batch, every variant on its own copy of the same initial weights:
  adam, cautious_adam, balanced (same_batch, next_batch), qp, and hierarchical_balanced with each
  decomposition (fixed_ratio, adaptive, measured). Steps are timed round-robin (one step of each
  variant per round) so that load drifts on a shared machine hit all variants alike; the median
  per variant is reported with its ratio to Adam. Peak memory: CUDA max_memory_allocated per
  variant; on CPU the peak RSS during two steps in a fresh subprocess per variant (``--no-memory``
  skips it). A second table times ``optimizer.step()`` alone on fixed gradients (min of many
  short repeats), which isolates the optimizers' own cost from forward/backward noise.

    python benchmarks/optimizer_overhead.py --model HPCM_Tiny --batch-size 2 --patch-size 64

Goals (issue 3): balanced next_batch within 3 % of Adam; hierarchical within 2 % of balanced
(same update mode; ``--hier-mode``).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hpcm.losses import build_decomposition, rate_distortion  # noqa: E402
from hpcm.optim import Balanced, CautiousAdam, HierarchicalBalanced  # noqa: E402

VARIANTS = (
    "adam", "cautious_adam", "balanced_same_batch", "balanced_next_batch", "qp",
    "hier_fixed_ratio", "hier_adaptive", "hier_measured",
)
CLIP = 1.0


def load_model(name: str, device: torch.device) -> torch.nn.Module:
    try:
        from hpcm.models import build_model
    except ImportError as error:
        raise SystemExit(f"hpcm.models.build_model is not available ({error}); the benchmark needs the HPCM model")
    model = build_model(name)
    return model.to(device).train()


def make_step(variant: str, model: torch.nn.Module, x: torch.Tensor, args) -> Callable[[], None]:
    """A closure running one full training iteration of ``variant`` on batch ``x``."""
    params = [p for p in model.parameters() if p.requires_grad]
    lmbda = args.lmbda

    if variant in ("adam", "cautious_adam"):
        # adam as the training baseline builds it (hpcm.train): the fused kernel.
        opt = torch.optim.Adam(params, lr=1e-4, fused=True) if variant == "adam" else CautiousAdam(params, lr=1e-4)

        def step():
            opt.zero_grad(set_to_none=True)
            rate_distortion(model(x), x, lmbda)["loss"].backward()
            norm = torch.nn.utils.clip_grad_norm_(params, CLIP)
            if torch.isfinite(norm):  # the official HPCM loop skips non-finite batches (a sync)
                opt.step()
        return step

    if variant.startswith("hier_"):
        decomposition = build_decomposition(variant.removeprefix("hier_"), lmbda).to(x.device)
        opt = HierarchicalBalanced(params, lr=1e-4, update_mode=args.hier_mode)

        def task_losses():
            out = model(x)
            bits = model.scale_bits(out["likelihoods"]["y"]) if variant == "hier_measured" else None
            return decomposition(out, x, bits)[0]
    else:
        mode = "next_batch" if variant == "balanced_next_batch" else "same_batch"
        opt = Balanced(params, lr=1e-4, update_mode=mode, weighting="qp" if variant == "qp" else "famo")

        def task_losses():
            rd = rate_distortion(model(x), x, lmbda)
            return torch.stack([rd["distortion"], rd["bpp_loss"]])

    def step():
        opt.zero_grad(set_to_none=True)
        opt.backward_with_task_balancing(task_losses(), params)
        opt.step()
        if opt.needs_second_forward:
            with torch.no_grad():
                opt.update_task_weights(task_losses())
    return step


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_variants(args, device: torch.device) -> dict[str, dict[str, float]]:
    torch.manual_seed(0)
    base = load_model(args.model, device)
    x = torch.rand(args.batch_size, 3, args.patch_size, args.patch_size, device=device)
    steps = {}
    for variant in args.variants:
        model = copy.deepcopy(base)
        steps[variant] = (model, make_step(variant, model, x, args))
    times: dict[str, list[float]] = {v: [] for v in args.variants}
    peaks: dict[str, float] = {v: 0.0 for v in args.variants}
    rounds = args.warmup + args.steps
    for round_index in tqdm(range(rounds), desc="rounds", unit="round"):
        for variant, (_, step) in steps.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            synchronize(device)
            start = time.perf_counter()
            step()
            synchronize(device)
            if round_index >= args.warmup:
                times[variant].append(time.perf_counter() - start)
            if device.type == "cuda":
                peaks[variant] = max(peaks[variant], torch.cuda.max_memory_allocated(device) / 2**20)
    return {v: {"median_s": statistics.median(t), "min_s": min(t), "peak_mb": peaks[v] or float("nan")}
            for v, t in times.items()}


def time_update_only(args, device: torch.device) -> dict[str, float]:
    """Min time of ``optimizer.step()`` alone on fixed gradients: the optimizer's own cost,
    robust to load on a shared machine (short, repeated, minimum taken)."""
    torch.manual_seed(0)
    base = load_model(args.model, device)
    params = [p.detach().clone().requires_grad_(True) for p in base.parameters()]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    makers = {
        "adam (foreach)": lambda: torch.optim.Adam(params, lr=1e-4, foreach=True),
        "adam (fused)": lambda: torch.optim.Adam(params, lr=1e-4, fused=True),
        "cautious_adam": lambda: CautiousAdam(params, lr=1e-4),  # default path (flat buffers on CPU)
        "cautious (foreach)": lambda: CautiousAdam(params, lr=1e-4, foreach=True),
        "cautious (loop)": lambda: CautiousAdam(params, lr=1e-4, foreach=False),
        "balanced.step": lambda: Balanced(params, lr=1e-4),
    }
    results = {}
    for name, make in tqdm(makers.items(), desc="update-only", unit="optimizer"):
        opt, times = make(), []
        for rep in range(args.update_reps + 2):
            synchronize(device)
            start = time.perf_counter()
            opt.step()
            synchronize(device)
            if rep >= 2:
                times.append(time.perf_counter() - start)
        results[name] = min(times)
    return results


def cpu_peak_rss(args, variant: str) -> float:
    """Peak RSS (MiB) of a fresh process running two steps of one variant."""
    command = [sys.executable, __file__, "--model", args.model, "--batch-size", str(args.batch_size),
               "--patch-size", str(args.patch_size), "--lmbda", str(args.lmbda), "--device", "cpu",
               "--hier-mode", args.hier_mode, "--memory-child", variant]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"memory run of {variant} failed:\n{result.stderr[-2000:]}")
    return float(json.loads(result.stdout.strip().splitlines()[-1])["peak_rss_mb"])


def memory_child(args) -> None:
    torch.manual_seed(0)
    model = load_model(args.model, torch.device("cpu"))
    x = torch.rand(args.batch_size, 3, args.patch_size, args.patch_size)
    step = make_step(args.memory_child, model, x, args)
    # Reset the RSS high-water mark (Linux clear_refs "5") so the peak covers the steps, not the
    # imports and model construction that every variant shares.
    Path("/proc/self/clear_refs").write_text("5")
    for _ in range(2):
        step()
    status = Path("/proc/self/status").read_text().splitlines()
    peak_kib = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
    print(json.dumps({"peak_rss_mb": peak_kib / 1024}))


def report(results: dict[str, dict[str, float]], args, device: torch.device,
           update_only: dict[str, float]) -> None:
    adam = results.get("adam", {}).get("median_s")
    print(f"\nmodel {args.model}, batch {args.batch_size}x3x{args.patch_size}x{args.patch_size}, "
          f"device {device}, {args.steps} timed steps (median), torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}")
    print(f"{'variant':<22}{'step ms':>10}{'min ms':>10}{'x Adam':>9}{'peak MiB':>11}")
    for variant, r in results.items():
        ratio = r["median_s"] / adam if adam else float("nan")
        print(f"{variant:<22}{r['median_s'] * 1e3:>10.1f}{r['min_s'] * 1e3:>10.1f}{ratio:>9.3f}{r['peak_mb']:>11.1f}")
    if update_only:
        print(f"\noptimizer.step() alone on fixed gradients ({args.update_reps} reps, min), "
              f"as a share of Adam's median full step:")
        for name, seconds in update_only.items():
            share = seconds / adam if adam else float("nan")
            print(f"  {name:<20}{seconds * 1e3:>9.2f} ms  ({share * 100:.2f} % of an Adam step)")
    pairs = [("balanced_next_batch", "adam", 1.03)]
    hier_ref = "balanced_next_batch" if args.hier_mode == "next_batch" else "balanced_same_batch"
    pairs += [(v, hier_ref, 1.02) for v in results if v.startswith("hier_")]
    print("\ngoals:")
    for variant, reference, goal in pairs:
        if variant in results and reference in results:
            ratio = results[variant]["median_s"] / results[reference]["median_s"]
            ratio_min = results[variant]["min_s"] / results[reference]["min_s"]
            verdict = "met" if ratio <= goal else "NOT met"
            print(f"  {variant} / {reference} = {ratio:.3f} median, {ratio_min:.3f} min "
                  f"(goal <= {goal:.2f} on the median: {verdict})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="HPCM_Tiny")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--patch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--lmbda", type=float, default=0.013)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--hier-mode", choices=("same_batch", "next_batch"), default="next_batch")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--no-memory", action="store_true", help="skip the CPU peak-RSS subprocesses")
    parser.add_argument("--update-reps", type=int, default=20, help="repetitions of the update-only timing")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1 by default: steadier timings on a shared machine)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--memory-child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_child:
        memory_child(args)
        return
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if args.device == "auto" else args.device))
    if "adam" not in args.variants:
        args.variants = ["adam", *args.variants]
    results = time_variants(args, device)
    if device.type == "cpu" and not args.no_memory:
        for variant in tqdm(args.variants, desc="peak RSS", unit="variant"):
            results[variant]["peak_mb"] = cpu_peak_rss(args, variant)
    update_only = time_update_only(args, device) if args.update_reps > 0 else {}
    report(results, args, device, update_only)
    if args.json:
        from hpcm.io import atomic_write_text
        atomic_write_text(args.json, json.dumps({"steps": results, "update_only_s": update_only}, indent=2))


if __name__ == "__main__":
    main()
