"""The one prepared GPU check (issue 15): exactness first, then the trainer's speed and memory.

    make gpu-check                                       # = python benchmarks/gpu_check.py (CUDA)
    python benchmarks/gpu_check.py --official .scratch/LIC-HPCM --out-dir "$OUT"
    python benchmarks/gpu_check.py --device cpu --quick  # this CPU machine: HPCM_Tiny, < 2 min

Sections, in order of importance (``--budget-s`` skips what no longer fits, with a printed note):

1. ``environment``: torch, CUDA, device name and capability, Python, numpy.
2. ``cross_device``: one Kodak-size image (768x512) compressed on the device and decoded on the
   CPU (same weights, one set of coder tables): bit-exact or the size of the mismatch; and whether
   the device's strings equal the CPU's. With ``--device cpu`` this degenerates to CPU -> CPU.
3. ``sync_free``: the device-side skip decisions (``Run.sync_free``, what CUDA training uses)
   against the host path. The verdict: ONE training step from identical weights, batch and RNG
   state, per optimizer: max abs difference and max difference in ulps (float32 eps * |host
   value|) of parameters, gradients, exp_avg, exp_avg_sq (and Balanced's task logits), the
   fraction of differing elements and the first one; <= ``ULP_TOLERANCE`` ulp (gradients
   bit-equal) = the same arithmetic up to rounding. Then 20 steps of cautious_adam and balanced
   next_batch (context only: training is chaotic, a 1-ulp difference flips cautious-mask signs
   of near-zero m*g and grows), next to the host path's own run-to-run difference.
4. ``train_fp32``, 5. ``train_bf16``: ``hpcm.train.loop.Run.train_step`` (the trainer's own step) of
   adam, balanced next_batch / same_batch and hierarchical_balanced (measured decomposition) at
   each batch size: median ms/step and IQR over repeats (CUDA-synchronised, after warm-up) and peak
   memory (``torch.cuda.max_memory_allocated``, reset per case; one run resident at a time).
6. ``train_compile``: the same with ``compile: true`` (run in a child process with a time limit,
   because compiling HPCM can take minutes; compile time = the warm-up steps, reported apart).
7. ``official``: with ``--official PATH`` (a local copy of lyq133/LIC-HPCM), the official
   ``HPCM`` with our weights: forward + loss + backward + clip + torch Adam, as its train.py,
   interleaved repeat by repeat with our adam step on the same batch; ratio = official time / ours
   (> 1: ours is faster), median and IQR of the paired per-repeat ratios.
8. ``coding``: compress and decompress of the 768x512 image on the device (and the official
   model's with ``--official``; its update() calls scipy, so its tables are built on the CPU).
9. ``profile``: torch.profiler over ``--profile-steps`` steps (5; 2 with ``--quick``; after warm-up)
   of adam and balanced next_batch at the first batch size: top ops by self CUDA and self CPU time,
   host synchronisations per step, CUDA kernel time and wall time per step, and the differences
   balanced - adam.

``--sections coding,sync_free,profile`` runs only those (environment always runs first).

Every section is wrapped: a failing one prints its error, the rest still run, and the exit code
is 1 if any section failed. One table is printed at the end and a JSON written (``--json``, or
``gpu_check.json`` in ``--out-dir``).
"""

from __future__ import annotations

import os

# cuBLAS reads this when it starts; the sync_free section asks for deterministic algorithms
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import argparse  # noqa: E402
import copy  # noqa: E402
import functools  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from argparse import Namespace  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]

from model_speed import OfficialAdapter, import_official, load_official, measure  # noqa: E402
from optimizer_overhead import first_batch, step_clock, time_steps  # noqa: E402

from hpcm.config import run_config  # noqa: E402
from hpcm.models import build_model, crop_image, pad_image  # noqa: E402
from hpcm.models.coder import CODER_BUFFER_NAMES  # noqa: E402
from hpcm.models.entropy import get_scale_table  # noqa: E402
from hpcm.train import loop as train  # noqa: E402
from hpcm.train import losses  # noqa: E402
from hpcm.util.device import pick_device  # noqa: E402
from hpcm.util.io import atomic_write_text  # noqa: E402
from tests.fixtures.hpcm_support import calibrate_to_latents, init_like_golden  # noqa: E402

JSON_FORMAT = "hpcm-gpu-check/1"
SECTIONS = (
    "environment",
    "cross_device",
    "sync_free",
    "train_fp32",
    "train_bf16",
    "train_compile",
    "official",
    "coding",
    "profile",
)
OPTIMIZERS = {  # run-config overrides of each timed optimizer
    "adam": {"optimizer": "adam"},
    "balanced next_batch": {"optimizer": "balanced", "update_mode": "next_batch"},
    "balanced same_batch": {"optimizer": "balanced", "update_mode": "same_batch"},
    "hier measured": {
        "optimizer": "hierarchical_balanced",
        "decomposition": "measured",
        "gamma_strategy": "hierarchical",
        "update_mode": "next_batch",
    },
}
SYNC_FREE_OPTIMIZERS = {
    "cautious_adam": {"optimizer": "cautious_adam"},
    **{k: v for k, v in OPTIMIZERS.items() if k != "adam"},
}  # adam has no host/device switch
SYNC_FREE_LONG = (
    "cautious_adam",
    "balanced next_batch",
    "balanced same_batch",
)  # the many-step comparison
SKIP_BATCH = 7  # this batch of the many-step comparison is NaN: a skipped step on both paths
KODAK_SIZE = (512, 768)  # H, W of a landscape Kodak image
SCALE_TABLE = (0.12, 64, 60)  # the official test.py's get_scale_table arguments


class SectionSkipped(Exception):
    """A section that cannot run here (reported, not a failure)."""


# ----------------------------------------------------------------------------- small helpers


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def spread(values: list[float]) -> dict[str, float]:
    """Median and interquartile range (exclusive quartiles; IQR 0 for one value)."""
    if len(values) < 2:
        return {"median": values[0], "iqr": 0.0, "n": len(values)}
    q1, _, q3 = statistics.quantiles(values, n=4)
    return {"median": statistics.median(values), "iqr": q3 - q1, "n": len(values)}


def free_device_memory() -> None:
    """Between CUDA cases: free the last case's tensors (cycles included), so the next case's peak
    memory is its own. The CPU measures no peak memory, and a full collection costs 0.1-0.3 s
    there."""
    if torch.cuda.is_available():
        gc.collect()
        torch.cuda.empty_cache()


def make_run(
    args: Namespace,
    overrides: dict,
    batch_size: int,
    bf16: bool = False,
    sync_free: bool | None = None,
) -> train.Run:
    """A training run as ``python -m hpcm.train`` builds it (no output folder is written)."""
    cfg = run_config.resolve(
        {
            "model": args.model,
            "patch_size": args.patch_size,
            "batch_size": batch_size,
            "steps": 1000,
            "device": args.device,
            "bf16": bf16,
            "num_workers": 0,
            "wandb_mode": "disabled",
            "quiet": True,
            **overrides,
        }
    )
    run = train.Run(cfg, Path("/nonexistent-gpu-check-run"))
    if sync_free is not None:
        run.sync_free = sync_free
    run.open_data()
    run.build(None)
    return run


def batch_args(args: Namespace, batch_size: int) -> Namespace:
    return Namespace(patch_size=args.patch_size, batch_size=batch_size)  # what first_batch reads


def kodak_size_image(args: Namespace) -> tuple[torch.Tensor, str]:
    """(1, 3, H, W) in [0, 1]: ``--image`` (centre-cropped/padded), else scikit-image's astronaut
    reflected out to the size."""
    height, width = args.image_size
    if args.image:
        from hpcm.data.images import load_rgb

        array, source = load_rgb(Path(args.image)), str(args.image)
    else:
        try:
            import skimage.data

            array, source = (
                np.asarray(skimage.data.astronaut()),
                "skimage.data.astronaut (reflect-padded)",
            )
        except ImportError:  # named in the output: coding times then come from a synthetic photo
            array, source = (
                synthetic_photo(height, width),
                "SYNTHETIC image (scikit-image is not installed)",
            )
    h, w = array.shape[:2]
    top, left = max((h - height) // 2, 0), max((w - width) // 2, 0)
    array = array[top : top + height, left : left + width]
    pad_h, pad_w = height - array.shape[0], width - array.shape[1]
    if pad_h or pad_w:
        array = np.pad(
            array,
            ((pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2), (0, 0)),
            mode="reflect",
        )
    x = torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1).float().div(255).unsqueeze(0)
    return x, f"{source}, {height}x{width}"


def synthetic_photo(height: int, width: int) -> np.ndarray:
    """Smooth gradients, edges and mild noise (seeded): a stand-in when no photo is at hand."""
    yy, xx = np.mgrid[0:height, 0:width] / max(height, width)
    rng = np.random.default_rng(0)
    channels = [
        np.sin(9 * xx + 3 * c) * np.cos(7 * yy - c) * 0.35
        + 0.5
        + 0.2 * (xx > 0.4 + 0.1 * c)
        + rng.normal(0, 0.03, xx.shape)
        for c in range(3)
    ]
    return (np.clip(np.stack(channels, -1), 0, 1) * 255).round().astype(np.uint8)


def coding_model(args: Namespace, x: torch.Tensor) -> torch.nn.Module:
    """The golden-fixture weights, calibrated so that latents sit inside the coder tables (as a
    trained model's), with coder tables built once on the CPU (eval mode)."""
    torch.manual_seed(0)
    model = init_like_golden(build_model(args.model)).eval()
    calibrate_to_latents(model, x)
    model.update(get_scale_table(*SCALE_TABLE), force=True)
    return model


# ----------------------------------------------------------------------------- sections


def section_environment(args: Namespace, device: torch.device, ctx: dict) -> dict:
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "cuda_runtime": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "model": args.model,
        "patch_size": args.patch_size,
        "batch_sizes": args.batch_sizes,
        "quick": args.quick,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            device_name=props.name,
            capability=f"{props.major}.{props.minor}",
            memory_gib=round(props.total_memory / 2**30, 1),
        )
    else:
        info.update(device_name=platform.processor() or platform.machine(), capability=None)
    try:
        info["git_commit"] = (
            subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"],
                cwd=REPO,
                capture_output=True,
                text=True,
                check=False,
            ).stdout.strip()
            or None
        )
    except OSError:
        info["git_commit"] = None
    print(
        f"python {info['python']}, torch {info['torch']}, CUDA {info['cuda_runtime']}, cuDNN "
        f"{info['cudnn']}, numpy {info['numpy']}; device {device}: {info['device_name']} "
        f"(capability {info['capability']})"
    )
    return info


@torch.no_grad()
def section_cross_device(args: Namespace, device: torch.device, ctx: dict) -> dict:
    cpu = torch.device("cpu")
    x, source = kodak_size_image(args)
    model_cpu = coding_model(args, x)
    model_dev = copy.deepcopy(model_cpu).to(device)  # same weights and the same (CPU-built) tables
    x_dev = x.to(device)
    padded_cpu, pad = pad_image(x, model_cpu.pad_multiple)
    padded_dev = padded_cpu.to(device)

    enc_dev = model_dev.compress(padded_dev)
    enc_cpu = model_cpu.compress(padded_cpu)
    dec_dev = model_dev.decompress(enc_dev["strings"], enc_dev["shape"])["x_hat"]
    forward = crop_image(model_dev(padded_dev)["x_hat"], pad).clamp(0, 1)
    try:
        dec_cross = model_cpu.decompress(enc_dev["strings"], enc_dev["shape"])["x_hat"]
        cross_error = None
    except Exception as error:  # a desynchronised decoder may fail outright: that is the finding
        dec_cross, cross_error = None, f"{type(error).__name__}: {error}"
    dec_dev = crop_image(dec_dev, pad).clamp(0, 1)
    result: dict[str, Any] = {
        "image": source,
        "encoder": str(device),
        "decoder": "cpu",
        "degenerate_cpu_to_cpu": device.type == "cpu",
        "bytes": sum(len(s) for group in enc_dev["strings"] for s in group),
        "strings_equal_cpu_encoded": enc_dev["strings"] == enc_cpu["strings"],
        "same_device_decode_equals_forward_8bit": bool(
            torch.equal((dec_dev * 255).round(), (forward * 255).round())
        ),
        "cross_decode_error": cross_error,
    }
    if dec_cross is not None:
        dec_cross = crop_image(dec_cross, pad).clamp(0, 1)
        ref = dec_dev.to(cpu)
        result.update(
            bit_exact=bool(torch.equal(dec_cross, ref)),
            max_abs_diff=float((dec_cross - ref).abs().max()),
            equal_8bit=bool(torch.equal((dec_cross * 255).round(), (ref * 255).round())),
        )
    else:
        result.update(bit_exact=False, max_abs_diff=None, equal_8bit=False)
    # Tables built on the device itself (as hpcm.evaluate does there): the same as the CPU's?
    model_dev.update(get_scale_table(*SCALE_TABLE), force=True)
    result["device_built_tables_equal"] = all(
        torch.equal(a.cpu(), b) for a, b in zip(model_dev.buffers(), model_cpu.buffers())
    )
    del x_dev
    note = " (CPU -> CPU: no second device here)" if device.type == "cpu" else ""
    print(
        f"{source}: encode {device}, decode cpu{note}: bit-exact {result['bit_exact']}, max abs "
        f"diff {result['max_abs_diff']}, strings equal to CPU-encoded "
        f"{result['strings_equal_cpu_encoded']}, device decode == forward (8-bit) "
        f"{result['same_device_decode_equals_forward_8bit']}, device-built tables equal "
        f"{result['device_built_tables_equal']}"
        + (f"; decode error {cross_error}" if cross_error else "")
    )
    return result


def _train_steps(run: train.Run, batches: list[torch.Tensor]) -> tuple[dict, dict]:
    for x in batches:
        run.step += 1
        run.train_step(run.step, x)
    params = {k: v.detach().float().cpu() for k, v in run.model.state_dict().items()}
    weights = run.optimizer.get_task_weights() if run.balanced else {}
    return params, weights


def _max_diff(a: tuple[dict, dict], b: tuple[dict, dict]) -> tuple[float, float]:
    params = max(float((a[0][k] - b[0][k]).abs().max()) if a[0][k].numel() else 0.0 for k in a[0])
    weights = max((abs(a[1][k] - b[1][k]) for k in a[1]), default=0.0)
    return params, weights


ULP_TOLERANCE = (
    4  # one-step differences up to this many ulp of |p| count as rounding (equal arithmetic)
)


def _one_step_state(run: train.Run) -> dict[str, dict[str, torch.Tensor]]:
    """Parameters, their gradients and Adam moments (by parameter name), float32 on the CPU."""
    named = [(n, p) for n, p in run.model.named_parameters() if p.requires_grad]
    out: dict[str, dict[str, torch.Tensor]] = {
        "param": {},
        "grad": {},
        "exp_avg": {},
        "exp_avg_sq": {},
    }
    for name, p in named:
        out["param"][name] = p.detach().float().cpu()
        if p.grad is not None:
            out["grad"][name] = p.grad.detach().float().cpu()
        state = run.optimizer.state.get(p, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state:
                out[key][name] = state[key].detach().float().cpu()
    if run.balanced:
        out["task_w"] = {"w": run.optimizer.w.detach().float().cpu().reshape(-1)}
    return out


def _compare_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict:
    """Max abs diff, max diff in ulps of b (float32 eps * |b|), fraction of differing elements and
    the first differing element (parameter order) between two name -> tensor maps."""
    eps, tiny = torch.finfo(torch.float32).eps, torch.finfo(torch.float32).tiny
    missing = sorted(set(a) ^ set(b))
    total = differ = 0
    max_abs = max_ulp = 0.0
    first = worst = None
    for name in a:
        if name not in b:
            continue
        x, y = a[name].reshape(-1), b[name].reshape(-1)
        diff = (x - y).abs()
        unequal = x != y  # NaN == NaN counts as a difference too
        total += x.numel()
        count = int(unequal.sum())
        if not count:
            continue
        differ += count
        ulp = diff / (eps * y.abs().clamp(min=tiny))
        d, u = float(diff.max()), float(ulp.max())
        if first is None:
            i = int(unequal.nonzero()[0])
            first = {"tensor": name, "index": i, "a": float(x[i]), "b": float(y[i])}
        if u > max_ulp:
            i = int(ulp.argmax())
            worst = {"tensor": name, "index": i, "a": float(x[i]), "b": float(y[i]), "ulp": u}
        max_abs, max_ulp = max(max_abs, d), max(max_ulp, u)
    return {
        "max_abs_diff": max_abs,
        "max_ulp": max_ulp,
        "fraction_differing": differ / total if total else 0.0,
        "elements": total,
        "first_difference": first,
        "worst_ulp": worst,
        "missing": missing,
    }


def _one_step(args: Namespace, overrides: dict, batch: torch.Tensor) -> dict:
    """One ``train_step`` of the sync-free and the host path from the same weights, batch and RNG
    state."""
    outcome = {}
    weights = None
    for label, flag in (("sync_free", True), ("host", False)):
        run = make_run(args, overrides, args.sync_free_batch, sync_free=flag)
        if weights is None:
            weights = copy.deepcopy(run.model.state_dict())
        else:
            run.model.load_state_dict(weights)
        torch.manual_seed(1234)  # the training forward draws noise: same stream for both paths
        if batch.device.type == "cuda":
            torch.cuda.manual_seed_all(1234)
        run.step = 1
        run.train_step(1, batch)
        outcome[label] = _one_step_state(run)
        del run
        free_device_memory()
    compared = {
        key: _compare_tensors(outcome["sync_free"][key], outcome["host"][key])
        for key in outcome["host"]
    }
    worst = max(compared, key=lambda k: compared[k]["max_ulp"])
    judged = {
        k: v for k, v in compared.items() if k != "grad"
    }  # grad: the input of the step, must be 0
    equal_rounding = compared["grad"]["max_abs_diff"] == 0.0 and all(
        v["max_ulp"] <= ULP_TOLERANCE and not v["missing"] for v in judged.values()
    )
    return {
        "tensors": compared,
        "bit_equal": all(v["fraction_differing"] == 0.0 for v in compared.values()),
        "equal_up_to_rounding": equal_rounding,
        "worst_tensor": worst,
    }


def section_sync_free(args: Namespace, device: torch.device, ctx: dict) -> dict:
    """One-step comparison (the verdict: same weights, gradients and RNG, so only the step's
    arithmetic can differ), then ``steps`` steps of two optimizers (training is chaotic: a 1-ulp
    difference flips cautious-mask signs of near-zero m*g and grows, so this is context)."""
    steps = args.sync_free_steps
    batch_size = args.sync_free_batch
    deterministic = (
        torch.backends.cudnn.deterministic,
        torch.are_deterministic_algorithms_enabled(),
    )
    # CUDA: the host path run twice then agrees (the noise floor). The CPU kernels are deterministic
    # already, and the switch imports inductor (use_deterministic_algorithms sets its config):
    # 2.5 s.
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cudnn.deterministic = True
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        probe = make_run(args, {"optimizer": "adam"}, batch_size)
        from hpcm.data import images as data

        loader = data.train_loader(
            probe.train_set, args.patch_size, batch_size, seed=0, total_steps=steps
        )
        batches = [b.to(device) for b in loader]
        if device.type == "cuda":
            batches = [b.contiguous(memory_format=torch.channels_last) for b in batches]
        # one non-finite batch in the long comparison: both paths must skip it identically
        long_batches = list(batches)
        if len(long_batches) > SKIP_BATCH:
            long_batches[SKIP_BATCH] = torch.full_like(long_batches[SKIP_BATCH], float("nan"))
        del probe
        one_step = {}
        print(
            "  one step from identical weights/batch/RNG, sync_free vs host (ulp: float32 eps * "
            f"|host value|; equal = grads bit-equal and <= {ULP_TOLERANCE} ulp):"
        )
        for name, overrides in SYNC_FREE_OPTIMIZERS.items():
            r = one_step[name] = _one_step(args, overrides, batches[0])
            parts = ", ".join(
                f"{k} {v['max_abs_diff']:.2g}/{v['max_ulp']:.3g}ulp/{v['fraction_differing']:.2%}"
                for k, v in r["tensors"].items()
            )
            verdict = (
                "BIT-EQUAL"
                if r["bit_equal"]
                else ("EQUAL up to rounding" if r["equal_up_to_rounding"] else "DIFFERENT")
            )
            print(f"  {name:<20} {verdict}: {parts}")
            if not r["bit_equal"]:
                t = r["tensors"][r["worst_tensor"]]
                print(
                    f"  {'':<20} worst {r['worst_tensor']}: first diff {t['first_difference']}; "
                    f"largest ulp {t['worst_ulp']}"
                )
        results = {}
        for name in SYNC_FREE_LONG:
            overrides = SYNC_FREE_OPTIMIZERS[name]
            outcome = {}
            for label, flag in (("sync_free", True), ("host", False), ("host_again", False)):
                if label == "host_again" and device.type == "cpu":
                    continue  # CPU is deterministic: a second host run adds nothing
                run = make_run(args, overrides, batch_size, sync_free=flag)
                outcome[label] = _train_steps(run, long_batches)
                skipped = run.skipped_steps()
                del run
                free_device_memory()
            params, weights = _max_diff(outcome["sync_free"], outcome["host"])
            floor = (
                _max_diff(outcome["host"], outcome["host_again"])
                if "host_again" in outcome
                else (0.0, 0.0)
            )
            results[name] = {
                "max_abs_diff_params": params,
                "max_abs_diff_task_weights": weights,
                "host_rerun_diff_params": floor[0],
                "host_rerun_diff_task_weights": floor[1],
                "equal": params == 0.0 and weights == 0.0,
                "skipped_steps": skipped,
            }
            print(
                f"  {name:<20} {steps} steps (batch {SKIP_BATCH} NaN, skipped {skipped}), "
                f"sync_free vs host: params {params:.3g}, task weights {weights:.3g} (host vs host "
                f"{floor[0]:.3g} / {floor[1]:.3g}); "
                f"{'EQUAL' if results[name]['equal'] else 'different'}"
            )
        return {
            "steps": steps,
            "batch_size": batch_size,
            "deterministic_algorithms": cuda,
            "ulp_tolerance": ULP_TOLERANCE,
            "one_step": one_step,
            "all_equal": all(r["equal_up_to_rounding"] for r in one_step.values()),
            "all_bit_equal": all(r["bit_equal"] for r in one_step.values()),
            "optimizers": results,
        }
    finally:
        if cuda:
            torch.backends.cudnn.deterministic = deterministic[0]
            torch.use_deterministic_algorithms(deterministic[1])


def time_case(
    args: Namespace, overrides: dict, batch_size: int, bf16: bool, device: torch.device
) -> dict:
    """Warm-up, then ``repeats`` x ``steps`` of ``Run.train_step``; peak memory of this run
    alone."""
    free_device_memory()
    start = time.perf_counter()
    run = make_run(args, overrides, batch_size, bf16=bf16)
    x = first_batch(run, batch_args(args, batch_size))
    warm = time.perf_counter()
    time_steps(run, x, args.warmup)
    warmup_s = time.perf_counter() - warm
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    per_step = [time_steps(run, x, args.steps) / args.steps for _ in range(args.repeats)]
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    stats = spread([t * 1e3 for t in per_step])
    del run, x
    free_device_memory()
    return {
        "ms_median": stats["median"],
        "ms_iqr": stats["iqr"],
        "repeats_ms": [t * 1e3 for t in per_step],
        "peak_mib": peak,
        "warmup_s": warmup_s,
        "build_s": warm - start,
        "clock": step_clock(device).__name__,
    }


def _train_section(
    args: Namespace,
    device: torch.device,
    ctx: dict,
    cases: list[tuple[str, int, bool]],
    compile_: bool,
    record: Callable[[dict], None] | None = None,
) -> dict:
    """Time every (optimizer, batch size, bf16) case in the order given (most important first)."""
    rows = []
    for name, batch_size, bf16 in cases:
        overrides = OPTIMIZERS[name]
        if ctx["deadline"] - time.perf_counter() < 0:
            print(f"  (budget spent: {name} batch {batch_size} and later cases skipped)")
            rows.append({"optimizer": name, "batch_size": batch_size, "skipped": "budget"})
            continue
        if compile_:
            import torch._dynamo.utils  # noqa: PLC0415 (only the compile child needs dynamo loaded)

            torch._dynamo.reset()  # each case compiles its own graph (no recompile-limit fallback)
            torch._dynamo.utils.counters.clear()
        row = {
            "optimizer": name,
            "batch_size": batch_size,
            "dtype": "bf16" if bf16 else "fp32",
            "compile": compile_,
        }
        try:
            row.update(
                time_case(args, {**overrides, "compile": compile_}, batch_size, bf16, device)
            )
        except Exception as error:  # noqa: BLE001 (compile: report the compiler's error, go on to the next case)
            if not compile_:
                raise
            text = f"{type(error).__name__}: {error}"
            row["error"] = text[:4000]
            rows.append(row)
            if record:
                record(row)
            print(
                f"  {name:<22} batch {batch_size:>3} {row['dtype']} compiled: FAILED, {text[:1500]}"
            )
            free_device_memory()
            continue
        if compile_:
            row["compile_s"] = row["warmup_s"]  # the warm-up steps include compiling
            row["graph_breaks"] = sum(torch._dynamo.utils.counters["graph_break"].values())
        rows.append(row)
        peak = "-" if row["peak_mib"] is None else f"{row['peak_mib']:.0f} MiB"
        if record:
            record(row)
        print(
            f"  {name:<22} batch {batch_size:>3} {row['dtype']}{' compiled' if compile_ else ''}: "
            f"{row['ms_median']:8.2f} ms/step (IQR {row['ms_iqr']:.2f}), peak {peak}"
            + (
                f", compile+warm-up {row['compile_s']:.1f} s, graph breaks {row['graph_breaks']}"
                if compile_
                else ""
            )
        )
    return {"rows": rows}


def eager_cases(args: Namespace, bf16: bool) -> list[tuple[str, int, bool]]:
    return [(name, batch_size, bf16) for batch_size in args.batch_sizes for name in OPTIMIZERS]


def compile_cases(args: Namespace, device: torch.device) -> list[tuple[str, int, bool]]:
    """Optimizer first (adam, then balanced next_batch, ...): each compile costs minutes, so the
    cases a time limit cuts off are the least important ones."""
    dtypes = [False, True] if device.type == "cuda" else [False]
    return [
        (name, batch_size, bf16)
        for name in OPTIMIZERS
        for batch_size in args.batch_sizes
        for bf16 in dtypes
    ]


def section_train_fp32(args, device, ctx):
    return _train_section(args, device, ctx, eager_cases(args, bf16=False), compile_=False)


def section_train_bf16(args, device, ctx):
    if device.type != "cuda":
        raise SectionSkipped(
            "bf16 autocast is used on CUDA only (hpcm.train trains CPU runs in float32)"
        )
    return _train_section(args, device, ctx, eager_cases(args, bf16=True), compile_=False)


def section_train_compile(args, device, ctx):
    """In a child process: a compile that overruns the budget is killed, the finished cases are
    kept."""
    if args.no_compile:
        raise SectionSkipped("--no-compile")
    if args.quick and not args.compile:
        raise SectionSkipped(
            "--quick skips compiling (inductor took ~150 s for 5 HPCM_Tiny steps on the 2-core "
            "CPU machine); add --compile to run it"
        )
    limit = min(args.compile_budget_s, ctx["deadline"] - time.perf_counter() - args.reserve_s)
    if limit < 20:
        raise SectionSkipped(f"budget: {limit:.0f} s left for compiling")
    with tempfile.TemporaryDirectory() as tmp:
        lines = Path(tmp) / "rows.jsonl"
        command = [sys.executable, __file__, "--compile-child", str(lines), *ctx["argv"]]
        print(f"  (child process, limit {limit:.0f} s)", flush=True)
        # its own process group: on timeout the compile workers it started end with it
        child = subprocess.Popen(command, start_new_session=True)
        try:
            code = child.wait(timeout=limit)
            note = None if code == 0 else f"child process exited with {code}"
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
            note = (
                f"time limit {limit:.0f} s reached: the remaining compiled cases were not measured"
            )
        if note:
            print(f"  ({note})")
        rows = (
            [json.loads(line) for line in lines.read_text().splitlines()] if lines.exists() else []
        )
    if note and not rows:
        raise RuntimeError(note)
    return {"rows": rows, "note": note}


def compile_child(args: Namespace, device: torch.device, path: Path) -> None:
    def record(row: dict) -> None:
        with path.open("a") as handle:
            handle.write(json.dumps(row) + "\n")

    _train_section(
        args,
        device,
        {"deadline": math.inf},
        compile_cases(args, device),
        compile_=True,
        record=record,
    )


def official_step(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, lmbda: float
) -> None:
    """The official train.py's step: forward, rate-distortion loss, backward, clip 1.0, Adam."""
    optimizer.zero_grad(set_to_none=True)
    out = model(x)
    losses.rate_distortion(out, x, lmbda)["loss"].backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()


def section_official(args: Namespace, device: torch.device, ctx: dict) -> dict:
    if not args.official:
        raise SectionSkipped("no --official PATH given")
    if args.model not in ("HPCM_Base", "HPCM_Large"):
        raise SectionSkipped(f"the official code has no {args.model}")
    try:  # before building our model (seconds for HPCM_Base): a wrong path is reported at once
        import_official(args.official, args.model)
    except Exception as error:  # the official code did not import: a reported skip
        raise SectionSkipped(
            f"official model did not load: {type(error).__name__}: {error}"
        ) from error
    results: dict[str, Any] = {"path": str(args.official), "cases": []}
    for batch_size in args.batch_sizes:
        if ctx["deadline"] - time.perf_counter() < 0:
            print(f"  (budget spent: batch {batch_size} skipped)")
            results["cases"].append({"batch_size": batch_size, "skipped": "budget"})
            continue
        free_device_memory()
        ours = make_run(args, OPTIMIZERS["adam"], batch_size)
        official = load_official(args.official, args.model, ours.model, device)
        ctx["official"] = official
        official.train()
        opt = torch.optim.Adam(
            official.parameters(), lr=1e-4
        )  # torch's default, as the official train.py
        x = first_batch(ours, batch_args(args, batch_size))
        x_official = x.contiguous()  # the official code trains in NCHW
        lmbda = ours.cfg.lmbda
        clock = step_clock(device)

        def timed(fn: Callable[[], None], n: int, clock: Callable[[], float] = clock) -> float:
            sync(device)
            start = clock()
            for _ in range(n):
                fn()
            sync(device)
            return (clock() - start) / n

        step_official = functools.partial(official_step, official, opt, x_official, lmbda)
        timed(step_official, args.warmup)
        time_steps(ours, x, args.warmup)
        if (
            device.type == "cuda"
        ):  # the official step's own peak (with ours resident: subtract its idle size)
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        ours_ms, official_ms = [], []
        for _ in range(args.repeats):
            official_ms.append(timed(step_official, args.steps) * 1e3)
            ours_ms.append(time_steps(ours, x, args.steps) / args.steps * 1e3)
        ratios = [o / u for o, u in zip(official_ms, ours_ms)]
        stats = spread(ratios)
        case = {
            "batch_size": batch_size,
            "dtype": "fp32",
            "ours_ms": spread(ours_ms),
            "official_ms": spread(official_ms),
            "ratio_median": stats["median"],
            "ratio_iqr": stats["iqr"],
            "ratios": ratios,
            "goal": 1.3 if device.type == "cuda" else 1.2,
        }
        if device.type == "cuda":
            case["peak_mib_both_resident"] = torch.cuda.max_memory_allocated(device) / 2**20
            case["resident_before_mib"] = base / 2**20
        case["goal_met"] = case["ratio_median"] >= case["goal"]
        results["cases"].append(case)
        print(
            f"  batch {batch_size} fp32: ours {case['ours_ms']['median']:.2f} ms, official "
            f"{case['official_ms']['median']:.2f} ms, official/ours {stats['median']:.3f} (IQR "
            f"{stats['iqr']:.3f}); goal >= {case['goal']}: "
            f"{'met' if case['goal_met'] else 'NOT met'}"
        )
        del ours, opt, x, x_official
        official.zero_grad(set_to_none=True)
        free_device_memory()
    return results


def flat_strings(strings: list) -> list[bytes]:
    """Ours nest the strings per latent ([[y], [z]]), the official code does not ([y, z])."""
    return [b for item in strings for b in ([item] if isinstance(item, bytes) else item)]


def section_coding(args: Namespace, device: torch.device, ctx: dict) -> dict:
    """model_speed.measure: ours and the official model interleaved repeat by repeat (one
    warm-up)."""
    x, source = kodak_size_image(args)
    model = coding_model(args, x).to(device)
    padded, _ = pad_image(x.to(device), model.pad_multiple)
    models = {"ours": model}
    official = ctx.get("official")
    if official is None and args.official and args.model in ("HPCM_Base", "HPCM_Large"):
        # the official section did not run in this process (--sections coding): load it here
        official = load_official(args.official, args.model, model, device)
    if official is not None:
        official.eval()
        official.load_state_dict(
            {k: v for k, v in model.state_dict().items() if k not in CODER_BUFFER_NAMES},
            strict=False,
        )
        models["official"] = OfficialAdapter(official)  # update() is called by measure's set-up
    options = Namespace(
        bf16=False, skip_training=True, skip_coding=False, repeats=args.coding_repeats
    )
    times = measure(models, padded, options, device)
    result: dict[str, Any] = {
        "image": source,
        "device": str(device),
        "repeats": args.coding_repeats,
        **{label: {f"{k}_ms": spread(v) for k, v in t.items()} for label, t in times.items()},
    }
    line = (
        f"  ours: compress {result['ours']['compress_ms']['median']:.1f} ms, decompress "
        f"{result['ours']['decompress_ms']['median']:.1f} ms"
    )
    if official is not None:
        with torch.no_grad():
            same = flat_strings(official.compress(padded)["strings"]) == flat_strings(
                model.compress(padded)["strings"]
            )
        result["official"]["strings_equal_ours"] = same
        for key in ("compress", "decompress"):
            stats = spread([o / u for o, u in zip(times["official"][key], times["ours"][key])])
            result[f"ratio_{key}"], result[f"ratio_{key}_iqr"] = stats["median"], stats["iqr"]
        line += (
            f"; official/ours compress {result['ratio_compress']:.2f} (IQR "
            f"{result['ratio_compress_iqr']:.2f}), decompress {result['ratio_decompress']:.2f} "
            f"(IQR {result['ratio_decompress_iqr']:.2f}), strings equal {same}"
        )
    print(line)
    return result


PROFILE_OPTIMIZERS = ("adam", "balanced next_batch")
PROFILE_ROWS = 15
# host synchronisations seen by the profiler (CUDA runtime calls, device copies to the host,
# scalar reads)
# the launch and copy counts of docs/results-log.md GPU run 2 (balanced next_batch: 1033
# cudaMemcpyAsync and 1639 aten::copy_ per step before the sync-free step stopped cloning; adam 12
# and 290)
COUNTED_EVENTS = ("aten::copy_", "aten::clone", "cudaLaunchKernel", "cudaMemcpyAsync")
SYNC_EVENTS = (
    "cudaStreamSynchronize",
    "cudaDeviceSynchronize",
    "cudaEventSynchronize",
    "cudaMemcpyAsync",
    "Memcpy DtoH",
    "aten::_local_scalar_dense",
)


def _op_rows(averages, key: str, steps: int, limit: int) -> list[dict]:
    rows = sorted(averages, key=lambda e: getattr(e, key), reverse=True)[:limit]
    return [
        {
            "name": e.key,
            "calls_per_step": e.count / steps,
            "self_cpu_ms_per_step": e.self_cpu_time_total / 1e3 / steps,
            "cpu_total_ms_per_step": e.cpu_time_total / 1e3 / steps,
            "self_cuda_ms_per_step": getattr(e, "self_device_time_total", 0.0) / 1e3 / steps,
        }
        for e in rows
    ]


def _profile_one(args: Namespace, name: str, batch_size: int, device: torch.device) -> dict:
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    free_device_memory()
    run = make_run(args, OPTIMIZERS[name], batch_size)
    x = first_batch(run, batch_args(args, batch_size))
    steps = args.profile_steps
    time_steps(run, x, args.warmup if args.quick else max(args.warmup, 3))  # CPU: one step warms up
    wall_ms = time_steps(run, x, steps) / steps * 1e3  # unprofiled, same steps
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sync(device)
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            run.step += 1
            run.train_step(run.step, x)
        sync(device)  # one cudaDeviceSynchronize of ours is counted below
        profiled_ms = (time.perf_counter() - start) / steps * 1e3
    averages = prof.key_averages()
    kernel_us = sum(
        e.time_range.elapsed_us() for e in prof.events() if e.device_type == DeviceType.CUDA
    )
    # cross-check: the device time the CPU-side ops launched (kernels, copies), summed over ops
    launched_us = sum(
        getattr(e, "self_device_time_total", 0.0)
        for e in averages
        if e.device_type == DeviceType.CPU
    )
    syncs = {k: sum(e.count for e in averages if k in e.key) / steps for k in SYNC_EVENTS}
    op_counts = {k: sum(e.count for e in averages if e.key == k) / steps for k in COUNTED_EVENTS}
    result = {
        "optimizer": name,
        "batch_size": batch_size,
        "steps": steps,
        "wall_ms_per_step": wall_ms,
        "profiled_wall_ms_per_step": profiled_ms,
        "cuda_kernel_ms_per_step": kernel_us / 1e3 / steps if cuda else None,
        "cuda_time_of_cpu_ops_ms_per_step": launched_us / 1e3 / steps if cuda else None,
        "host_syncs_per_step": syncs,
        "op_counts_per_step": op_counts,
        "top_self_cpu": _op_rows(averages, "self_cpu_time_total", steps, PROFILE_ROWS),
    }
    if cuda:
        result["top_self_cuda"] = _op_rows(averages, "self_device_time_total", steps, PROFILE_ROWS)
    del run, x, prof
    free_device_memory()
    return result


def _print_ops(title: str, rows: list[dict], key: str) -> None:
    print(f"    {title}: ms/step, calls/step")
    for r in rows:
        print(f"      {r[key]:8.3f} {r['calls_per_step']:7.1f}  {r['name'][:70]}")


def section_profile(args: Namespace, device: torch.device, ctx: dict) -> dict:
    """torch.profiler over a few steps of adam and balanced next_batch (after warm-up): where the
    extra time of Balanced goes (kernels, host overhead, host synchronisations)."""
    batch_size = args.batch_sizes[0]
    cuda = device.type == "cuda"
    runs = {}
    for name in PROFILE_OPTIMIZERS:
        r = runs[name] = _profile_one(args, name, batch_size, device)
        kernels = f", CUDA kernels {r['cuda_kernel_ms_per_step']:.2f} ms" if cuda else ""
        syncs = ", ".join(f"{k} {v:g}" for k, v in r["host_syncs_per_step"].items() if v)
        counts = ", ".join(f"{k} {v:g}" for k, v in r["op_counts_per_step"].items())
        print(
            f"  {name} batch {batch_size}: wall {r['wall_ms_per_step']:.2f} ms/step (profiled "
            f"{r['profiled_wall_ms_per_step']:.2f}){kernels}; per step: "
            f"{syncs or 'no host syncs'}; {counts}"
        )
        if cuda:
            _print_ops("top self CUDA", r["top_self_cuda"], "self_cuda_ms_per_step")
        _print_ops("top self CPU", r["top_self_cpu"], "self_cpu_ms_per_step")
    adam, balanced = (runs[n] for n in PROFILE_OPTIMIZERS)
    result = {
        "batch_size": batch_size,
        "runs": runs,
        "wall_diff_ms_per_step": balanced["wall_ms_per_step"] - adam["wall_ms_per_step"],
        "wall_ratio": balanced["wall_ms_per_step"] / adam["wall_ms_per_step"],
    }
    line = (
        f"  balanced - adam: wall {result['wall_diff_ms_per_step']:+.2f} ms/step "
        f"(x{result['wall_ratio']:.3f})"
    )
    if cuda:
        result["cuda_kernel_diff_ms_per_step"] = (
            balanced["cuda_kernel_ms_per_step"] - adam["cuda_kernel_ms_per_step"]
        )
        line += f", CUDA kernel time {result['cuda_kernel_diff_ms_per_step']:+.2f} ms/step"
    print(line)
    return result


SECTION_FUNCTIONS = {name: globals()[f"section_{name}"] for name in SECTIONS}


# ----------------------------------------------------------------------------- report


def print_table(doc: dict) -> None:
    print("\n" + "=" * 100)
    env = doc["sections"].get("environment", {}).get("results") or {}
    print(
        f"gpu_check: {env.get('device_name', '?')} ({env.get('device', '?')}), torch "
        f"{env.get('torch', '?')}, model {doc['setup']['model']} {doc['setup']['patch_size']}px, "
        f"total {doc['total_s']:.0f} s"
    )
    print(f"{'section':<16}{'status':<9}{'s':>7}  summary")
    for name, sec in doc["sections"].items():
        r = sec.get("results") or {}
        summary = sec.get("error") or sec.get("reason") or ""
        if sec["status"] == "ok":
            if name == "cross_device":
                summary = (
                    f"bit-exact {r['bit_exact']}, max abs diff {r['max_abs_diff']}, strings == "
                    f"CPU-encoded {r['strings_equal_cpu_encoded']}"
                    + (" (CPU -> CPU)" if r["degenerate_cpu_to_cpu"] else "")
                )
            elif name == "sync_free":
                one = r["one_step"]
                summary = (
                    "one step: "
                    + (
                        "bit-equal"
                        if r["all_bit_equal"]
                        else f"equal up to rounding (<= {r['ulp_tolerance']} ulp)"
                        if r["all_equal"]
                        else "DIFFERENT: "
                        + ", ".join(
                            f"{k} {v['worst_tensor']} "
                            f"{v['tensors'][v['worst_tensor']]['max_ulp']:.3g} ulp"
                            for k, v in one.items()
                            if not v["equal_up_to_rounding"]
                        )
                    )
                    + f"; {r['steps']} steps: "
                    + ", ".join(
                        f"{k} {v['max_abs_diff_params']:.2g}" for k, v in r["optimizers"].items()
                    )
                )
            elif name == "profile":
                summary = (
                    f"balanced/adam wall x{r['wall_ratio']:.3f} ({r['wall_diff_ms_per_step']:+.2f} "
                    "ms/step)"
                    + (
                        f", kernels {r['cuda_kernel_diff_ms_per_step']:+.2f} ms/step"
                        if "cuda_kernel_diff_ms_per_step" in r
                        else ""
                    )
                )
            elif name == "official":
                summary = "; ".join(
                    f"b{c['batch_size']}: official/ours {c['ratio_median']:.3f} (IQR "
                    f"{c['ratio_iqr']:.3f})"
                    for c in r["cases"]
                    if "ratio_median" in c
                )
            elif name == "coding":
                summary = (
                    f"compress {r['ours']['compress_ms']['median']:.0f} ms, decompress "
                    f"{r['ours']['decompress_ms']['median']:.0f} ms"
                    + (
                        f", official/ours {r['ratio_compress']:.2f} / {r['ratio_decompress']:.2f}"
                        if "ratio_compress" in r
                        else ""
                    )
                )
            elif name == "environment":
                summary = (
                    f"capability {r.get('capability')}, CUDA {r.get('cuda_runtime')}, python "
                    f"{r.get('python')}"
                )
            elif name == "train_compile" and any("error" in row for row in r.get("rows", [])):
                errors = [row for row in r["rows"] if "error" in row]
                summary = (
                    f"{len(errors)} of {len(r['rows'])} compiled cases failed; first: "
                    f"{errors[0]['optimizer']} b{errors[0]['batch_size']} {errors[0]['dtype']}: "
                    f"{errors[0]['error']}"
                )
            elif r.get("note"):
                summary = r["note"]
        print(f"{name:<16}{sec['status']:<9}{sec['seconds']:>7.1f}  {summary[:200]}")
    rows = [
        row
        for n in ("train_fp32", "train_bf16", "train_compile")
        for row in (doc["sections"].get(n, {}).get("results") or {}).get("rows", [])
        if "ms_median" in row
    ]
    if rows:
        adam = {
            (r["batch_size"], r["dtype"], r["compile"]): r["ms_median"]
            for r in rows
            if r["optimizer"] == "adam"
        }
        eager = {
            (r["optimizer"], r["batch_size"], r["dtype"]): r["ms_median"]
            for r in rows
            if not r["compile"]
        }
        print(
            f"\n{'optimizer':<22}{'batch':>6}{'dtype':>6}{'compile':>8}{'ms/step':>10}{'IQR':>8}"
            f"{'x adam':>8}"
            f"{'x eager':>8}{'peak MiB':>10}{'compile s':>10}"
        )
        for r in rows:
            ref = adam.get((r["batch_size"], r["dtype"], r["compile"]))
            eag = eager.get((r["optimizer"], r["batch_size"], r["dtype"])) if r["compile"] else None
            print(
                f"{r['optimizer']:<22}{r['batch_size']:>6}{r['dtype']:>6}"
                f"{'yes' if r['compile'] else 'no':>8}"
                f"{r['ms_median']:>10.2f}{r['ms_iqr']:>8.2f}"
                f"{(r['ms_median'] / ref if ref else math.nan):>8.3f}"
                f"{(r['ms_median'] / eag if eag else math.nan):>8.3f}"
                f"{(r['peak_mib'] if r['peak_mib'] is not None else math.nan):>10.0f}"
                f"{r.get('compile_s', math.nan):>10.1f}"
            )
        print(
            "x adam: median step time / adam's (same batch, dtype, compile); x eager: compiled / "
            "eager"
        )
    failed = [n for n, s in doc["sections"].items() if s["status"] == "failed"]
    print(f"\nsections failed: {', '.join(failed) if failed else 'none'}")


def json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


# ----------------------------------------------------------------------------- command line


def parse_args(argv: list[str] | None) -> Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="small problem for a CPU check: HPCM_Tiny, 64 px, batch 2, few repeats, 256x384 image",
    )
    parser.add_argument("--model", help="default HPCM_Base (HPCM_Tiny with --quick)")
    parser.add_argument("--patch-size", type=int, help="default 256 (64 with --quick)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", help="default 8 16 (2 with --quick)")
    parser.add_argument(
        "--warmup", type=int, help="warm-up steps per case (default 3; 1 with --quick)"
    )
    parser.add_argument(
        "--steps", type=int, help="steps per timed repeat (default 2; 1 with --quick)"
    )
    parser.add_argument(
        "--repeats", type=int, help="timed repeats per case (default 7; 3 with --quick)"
    )
    parser.add_argument("--coding-repeats", type=int, help="default 3 (1 with --quick)")
    parser.add_argument(
        "--profile-steps",
        type=int,
        help="profiled steps per optimizer (default 5; 2 with --quick: parsing the "
        "profiler's events was most of the section's 15 s with 5 steps on this CPU)",
    )
    parser.add_argument("--sync-free-steps", type=int, default=20)
    parser.add_argument("--sync-free-batch", type=int, help="default 4 (1 with --quick)")
    parser.add_argument(
        "--image",
        help="a Kodak image (or any photo) for the coding sections; default: "
        "scikit-image's astronaut reflect-padded",
    )
    parser.add_argument(
        "--image-size",
        type=int,
        nargs=2,
        metavar=("H", "W"),
        help="default 512 768 (Kodak; 128 192 with --quick)",
    )
    parser.add_argument(
        "--official", help="local copy of lyq133/LIC-HPCM (its files are not modified)"
    )
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile section")
    parser.add_argument(
        "--compile", action="store_true", help="run the compile section with --quick too"
    )
    parser.add_argument(
        "--compile-budget-s",
        type=float,
        default=180.0,
        help="time limit of the compile section's child process",
    )
    parser.add_argument(
        "--reserve-s",
        type=float,
        default=60.0,
        help="budget the compile section leaves for the sections after it",
    )
    parser.add_argument(
        "--budget-s",
        type=float,
        default=420.0,
        help="sections that would start after this many seconds are skipped",
    )
    parser.add_argument(
        "--sections",
        nargs="+",
        metavar="NAME[,NAME]",
        help=f"run only these, in this order (environment always runs first); names: "
        f"{', '.join(SECTIONS)} (default: all)",
    )
    parser.add_argument("--json", type=Path, help="default: gpu_check.json in --out-dir")
    parser.add_argument("--out-dir", type=Path, default=REPO / "benchmarks" / "out")
    parser.add_argument("--compile-child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    quick = args.quick
    defaults = {
        "model": "HPCM_Tiny" if quick else "HPCM_Base",
        "patch_size": 64 if quick else 256,
        "batch_sizes": [2] if quick else [8, 16],
        "warmup": 1 if quick else 3,
        "steps": 1 if quick else 2,
        "repeats": 3 if quick else 7,
        "coding_repeats": 1 if quick else 3,
        "profile_steps": 2 if quick else 5,
        "sync_free_batch": 1 if quick else 4,
        "image_size": [128, 192] if quick else list(KODAK_SIZE),
    }
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.json = args.json or args.out_dir / "gpu_check.json"
    if args.sections:
        names = [n.strip() for item in args.sections for n in item.split(",") if n.strip()]
        unknown = [n for n in names if n not in SECTIONS]
        if unknown:
            parser.error(
                f"--sections: unknown {', '.join(unknown)}; choose from {', '.join(SECTIONS)}"
            )
        args.sections = ["environment"] + [n for n in dict.fromkeys(names) if n != "environment"]
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    started = time.perf_counter()
    # The imports left ~10^6 long-lived objects (torch, numpy) that every full collection walks
    # again (free_device_memory's gc.collect() between CUDA cases: 0.3 s each on this CPU); frozen,
    # they are not.
    gc.freeze()
    try:
        return _main(argv, args, started)
    finally:
        gc.unfreeze()


def _main(argv: list[str], args: Namespace, started: float) -> int:
    device = pick_device(args.device, "--device")
    if device.type == "cpu" and args.quick:
        torch.set_num_threads(1)
    if args.compile_child:
        compile_child(args, device, args.compile_child)
        return 0
    child_argv = [a for a in argv]  # the compile child gets the same problem
    ctx: dict[str, Any] = {"deadline": started + args.budget_s, "argv": child_argv}
    doc: dict[str, Any] = {
        "format": JSON_FORMAT,
        "setup": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "sections": {},
    }
    for name in args.sections or SECTIONS:
        print(f"\n--- {name}", flush=True)
        left = ctx["deadline"] - time.perf_counter()
        start = time.perf_counter()
        if left <= 0 and name != "environment":
            print(f"  skipped: the {args.budget_s:.0f} s budget is spent")
            doc["sections"][name] = {"status": "skipped", "reason": "budget", "seconds": 0.0}
            continue
        try:
            results = SECTION_FUNCTIONS[name](args, device, ctx)
            entry = {"status": "ok", "results": results}
        except SectionSkipped as skip:
            print(f"  skipped: {skip}")
            entry = {"status": "skipped", "reason": str(skip)}
        except Exception as error:  # one failing section must not hide the others
            traceback.print_exc()
            print(f"  FAILED: {type(error).__name__}: {error}")
            entry = {"status": "failed", "error": f"{type(error).__name__}: {error}"}
            free_device_memory()
        entry["seconds"] = time.perf_counter() - start
        doc["sections"][name] = entry
        sys.stdout.flush()
    doc["total_s"] = time.perf_counter() - started
    doc["failed"] = [n for n, s in doc["sections"].items() if s["status"] == "failed"]
    print_table(doc)
    atomic_write_text(args.json, json.dumps(json_safe(doc), indent=2, allow_nan=False) + "\n")
    print(f"wrote {args.json}")
    return 1 if doc["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
