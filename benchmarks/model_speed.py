"""Speed of the HPCM presets: forward, forward+backward (one training step), compress, decompress.

    python benchmarks/model_speed.py                          # CPU: HPCM_Tiny, HPCM_Small
    python benchmarks/model_speed.py --size 64 64 --presets HPCM_Tiny
    python benchmarks/model_speed.py --presets HPCM_Base --size 256 256 --batch 1
    python benchmarks/model_speed.py --threads 1 --skip-training   # coding only (compress, decode)
    python benchmarks/model_speed.py --device cuda --bf16     # CUDA: channels_last, bf16 autocast
    python benchmarks/model_speed.py --presets HPCM_Base --size 256 256 --official .scratch/LIC-HPCM

``--official PATH`` points at a local copy of lyq133/LIC-HPCM; the same measurements are made on
its ``HPCM`` (Base / Large only) with identical weights and inputs, interleaved with ours repeat by
repeat (order alternating), and each ratio official/ours (> 1: ours is faster) is printed as the
median of the paired per-repeat ratios with its interquartile range. The copy is used as it is:
its CPython-3.8 entropy extensions are replaced in memory by compressai's (``import_official``)
and its hard-coded ``device='cuda'`` is dropped in memory. Official coding needs image sizes that
are multiples of 256. Goals (issue 15, CPU, 1 thread, Base 256x256): train step >= 1.2x the
official speed, compress and decompress >= 1.0x.

Times are medians over ``--repeats`` runs after one warm-up, in milliseconds (one CPU thread: the
thread's CPU time); "train step" is forward + rate-distortion loss + backward (no optimizer
step), on a batch of ``--batch`` images.

After the table, the train step's arithmetic (``torch.utils.flop_counter``) and its rate in
GFLOP/s; on CPU also the share of the step spent in convolution and matrix-product kernels
(torch.profiler, two profiled steps) and, with ``--official``, the **ceiling**: the official/ours
ratio our step would reach if everything outside those kernels took no time. Those kernels fix
the rounding (their blocking decides the summation order), so an exact speed-up cannot go past it.
"""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Callable

import torch

from hpcm.models import build_model
from hpcm.models.coder import CODER_BUFFER_NAMES
from hpcm.models.entropy import get_scale_table

GOALS_CPU = {
    "train step": 1.2,
    "compress": 1.0,
    "decompress": 1.0,
}  # issue 15: 1 thread, Base 256x256


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def clock(device: torch.device) -> Callable[[], float]:
    """One CPU thread: the thread's CPU time (load from other processes does not inflate it; the
    rANS coder runs on this thread too); otherwise wall-clock time."""
    return (
        time.thread_time
        if device.type == "cpu" and torch.get_num_threads() == 1
        else time.perf_counter
    )


def rd_loss(out: dict, x: torch.Tensor) -> torch.Tensor:
    pixels = x.shape[0] * x.shape[2] * x.shape[3]
    bpp = sum(-torch.log2(p.float()).sum() for p in out["likelihoods"].values()) / pixels
    return 0.013 * 255**2 * torch.mean((out["x_hat"].float() - x.float()) ** 2) + bpp


def operations(
    model: torch.nn.Module, x: torch.Tensor, args, device: torch.device
) -> dict[str, Callable]:
    """Column -> (setup, timed call): forward (eval), train step (train mode, backward, no
    optimizer), compress and decompress of image 0. ``setup`` puts the model in the right mode."""
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=args.bf16)
    ops: dict[str, tuple[Callable, Callable]] = {}

    def forward():
        with torch.no_grad(), autocast:
            model(x)

    def train_step():
        model.zero_grad(set_to_none=True)
        with autocast:
            out = model(x)
        rd_loss(out, x).backward()

    if not args.skip_training:
        ops["forward"] = (model.eval, forward)
        ops["train step"] = (model.train, train_step)
    if not args.skip_coding:
        image, encoded = x[:1], {}

        def coding_setup():
            model.eval()
            model.zero_grad(set_to_none=True)
            if not encoded:
                model.update(get_scale_table(0.12, 64, 60))
                with torch.no_grad():
                    encoded.update(model.compress(image))

        def compress():
            with torch.no_grad():
                model.compress(image)

        def decompress():
            with torch.no_grad():
                model.decompress(encoded["strings"], encoded["shape"])

        ops["compress"] = (coding_setup, compress)
        ops["decompress"] = (coding_setup, decompress)
    return ops


def measure(
    models: dict[str, torch.nn.Module], x: torch.Tensor, args, device: torch.device
) -> dict[str, dict[str, list[float]]]:
    """Per model, per column: the ms of every repeat. Models are interleaved repeat by repeat
    (order alternating), so that load drift on a shared machine hits all of them alike."""
    per_model = {label: operations(model, x, args, device) for label, model in models.items()}
    labels = list(models)
    times: dict[str, dict[str, list[float]]] = {label: {} for label in labels}
    now = clock(device)
    for column in per_model[labels[0]]:
        for label in labels:  # warm-up: mask caches, cuDNN autotuning, allocator, coder tables
            setup, fn = per_model[label][column]
            setup()
            fn()
            times[label][column] = []
        sync(device)
        for repeat in range(args.repeats):
            order = labels if repeat % 2 == 0 else labels[::-1]
            for label in order:
                setup, fn = per_model[label][column]
                setup()
                sync(device)
                start = now()
                fn()
                sync(device)
                times[label][column].append((now() - start) * 1e3)
    return times


def quartiles(values: list[float]) -> tuple[float, float, float]:
    """(median, q1, q3), exclusive method; one value: all three equal."""
    if len(values) < 2:
        return values[0], values[0], values[0]
    q1, median, q3 = statistics.quantiles(values, n=4)
    return statistics.median(values), q1, q3


# The ops that do a convolution's or a matrix product's arithmetic on the CPU (dispatch wrappers
# such as aten::conv2d / aten::_convolution excluded); aten::convolution_backward's own time is
# oneDNN's backward of the 3x3 / 2x2 / depth-wise convolutions.
COMPUTE_OPS = frozenset(
    {
        "aten::_slow_conv2d_forward",
        "aten::_slow_conv2d_backward",
        "aten::mkldnn_convolution",
        "aten::convolution_backward",
        "aten::slow_conv_transpose2d",
        "aten::mm",
        "aten::addmm",
        "aten::bmm",
        "aten::baddbmm",
        "aten::_scaled_dot_product_flash_attention_for_cpu",
        "aten::_scaled_dot_product_flash_attention_for_cpu_backward",
    }
)


def train_step_flops(model: torch.nn.Module, x: torch.Tensor) -> int:
    """FLOPs of one train step (forward + loss + backward) as torch.utils.flop_counter counts
    them."""
    from torch.utils.flop_counter import FlopCounterMode

    model.train()
    model.zero_grad(set_to_none=True)
    with FlopCounterMode(display=False) as counter:
        rd_loss(model(x), x).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def compute_share(model: torch.nn.Module, x: torch.Tensor, steps: int = 2) -> float:
    """Share of ``steps`` profiled CPU train steps' wall time spent in :data:`COMPUTE_OPS`.

    Measured against the steps' whole wall time, so the interpreter and autograd time between
    ops counts as outside the kernels; the profiler's own overhead, which falls mostly on the many
    small ops, lengthens the steps too. Both make the share smaller and a ceiling built on it
    larger (looser). A share, not the kernels' absolute time, so that the machine's speed drifting
    between the profiled and the timed steps cancels. Wall time, because the profiler's op times
    are wall durations: divided by thread CPU time, a loaded machine (the thread descheduled
    inside an op) gave shares above 1 (1.18 measured)."""
    from torch.profiler import ProfilerActivity, profile

    model.train()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            model.zero_grad(set_to_none=True)
            rd_loss(model(x), x).backward()
        elapsed = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    return (
        sum(e.self_cpu_time_total for e in prof.key_averages() if e.key in COMPUTE_OPS)
        / 1e6
        / elapsed
    )


def import_official(path: str | Path, name: str) -> ModuleType:
    """``src.models.<name>`` of a local lyq133/LIC-HPCM copy, imported without changing the copy.

    Its compiled entropy extensions are CPython 3.8 builds; stand-in modules
    ``src.entropy_models._CXX`` / ``unbounded_ans`` give it compressai's functions instead (the
    official C++ sources are compressai's; tests/fixtures/README_hpcm_golden.md: same strings byte
    for byte). Its ``device='cuda'`` on ``adaptive_params_list`` is dropped from the source in
    memory (``.to(device)`` moves the parameters afterwards), so it also runs on CPU.
    """
    from hpcm.models import compressai_ext

    root = Path(path).resolve()
    file = root / "src" / "models" / f"{name}.py"
    if not file.is_file():
        raise FileNotFoundError(
            f"--official {path}: {file} not found (give the root of a lyq133/LIC-HPCM copy)"
        )
    qualified = f"src.models.{name}"
    if qualified in sys.modules:
        return sys.modules[qualified]
    cxx = ModuleType("src.entropy_models._CXX")
    cxx.pmf_to_quantized_cdf = compressai_ext.pmf_to_quantized_cdf
    ans = ModuleType("src.entropy_models.unbounded_ans")
    ans.ubransEncoder, ans.ubransDecoder = (
        compressai_ext.BufferedRansEncoder,
        compressai_ext.RansDecoder,
    )
    sys.modules.setdefault(cxx.__name__, cxx)
    sys.modules.setdefault(ans.__name__, ans)
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    importlib.import_module("src.models")  # the package (relative imports of the module below)
    module = ModuleType(qualified)
    module.__file__, module.__package__ = str(file), "src.models"
    sys.modules[qualified] = module
    try:
        exec(
            compile(file.read_text().replace(", device='cuda'", ""), str(file), "exec"),
            module.__dict__,
        )
    except BaseException:
        del sys.modules[qualified]
        raise
    return module


def load_official(
    path: str, name: str, ours: torch.nn.Module, device: torch.device
) -> torch.nn.Module:
    """The official HPCM of ``name`` from a local copy, with our weights copied in."""
    if name not in ("HPCM_Base", "HPCM_Large"):
        raise ValueError(f"the official code has no {name}; compare HPCM_Base or HPCM_Large")
    official = import_official(path, name).HPCM().to(device)
    weights = {k: v for k, v in ours.state_dict().items() if k not in CODER_BUFFER_NAMES}
    expected = {k for k in official.state_dict() if k not in CODER_BUFFER_NAMES}
    if expected != set(weights):  # (its load_state_dict override returns nothing to check)
        raise RuntimeError(
            f"our {name} weights do not fit the official model: missing "
            f"{sorted(expected - set(weights))[:5]}, unexpected "
            f"{sorted(set(weights) - expected)[:5]}"
        )
    official.load_state_dict(weights, strict=False)  # coder tables: built by update()
    return official


class OfficialAdapter(torch.nn.Module):
    """Gives the official model our update()/compress() signatures for :func:`measure`."""

    def __init__(self, official: torch.nn.Module):
        super().__init__()
        self.official = official

    def forward(self, x):
        return self.official(x)

    def update(self, scale_table):
        """The official update() hands its tensors to scipy (host only): on an accelerator, the
        tables are built with the model on the CPU, then the model (tables included, they are
        buffers) goes back to its device. The copy on disk is not modified."""
        device = next(self.official.parameters()).device
        if device.type == "cpu":
            return self.official.update(scale_table)
        self.official.to("cpu")
        try:
            return self.official.update(scale_table.cpu())
        finally:
            self.official.to(device)

    def compress(self, x):
        return self.official.compress(x)

    def decompress(self, strings, shape):
        return self.official.decompress(strings, shape)


def print_arithmetic(
    models: dict[str, torch.nn.Module], x: torch.Tensor, times: dict, device: torch.device
) -> dict:
    """Train-step FLOPs and rates; on CPU, the share of profiled steps spent in convolution and
    matrix-product kernels and, with the official model, the ceiling: the official/ours ratio if
    everything outside those kernels took no time in our step (official median step over our median
    step times our share). The kernels' blocking decides their rounding, so an exact implementation
    keeps them; the ceiling estimates what an exact speed-up can reach."""
    seconds = {label: statistics.median(times[label]["train step"]) / 1e3 for label in models}
    result: dict = {"flops": {label: train_step_flops(model, x) for label, model in models.items()}}
    if device.type == "cpu":
        result["compute_share"] = {
            label: compute_share(model, x) for label, model in models.items()
        }
    for label in models:
        flops = result["flops"][label]
        line = (
            f"  train step {label}: {flops / 1e9:.1f} GFLOP at {flops / 1e9 / seconds[label]:.1f} "
            "GFLOP/s"
        )
        if "compute_share" in result:
            line += (
                f", {result['compute_share'][label]:.1%} of profiled steps in convolution / "
                "matrix-product kernels"
            )
        print(line)
    if "official" in models and "compute_share" in result:
        result["ceiling"] = seconds["official"] / (
            seconds["ours"] * result["compute_share"]["ours"]
        )
        print(
            "  ceiling: with everything but those kernels free, our step would be "
            f"{result['ceiling']:.3f}x the official speed"
        )
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--presets", nargs="+", default=None, help="default: Tiny+Small on CPU, all on CUDA"
    )
    parser.add_argument("--size", nargs=2, type=int, default=(128, 128), metavar=("H", "W"))
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    parser.add_argument(
        "--bf16", action="store_true", help="bf16 autocast for forward / train step (CUDA)"
    )
    parser.add_argument("--no-channels-last", action="store_true", help="CUDA: keep NCHW")
    parser.add_argument("--skip-coding", action="store_true")
    parser.add_argument(
        "--skip-training", action="store_true", help="no forward / train step columns"
    )
    parser.add_argument("--official", default=None, help="path to a local lyq133/LIC-HPCM copy")
    parser.add_argument(
        "--json", default=None, help="also write every repeat's time (ms) and the arithmetic here"
    )
    args = parser.parse_args(argv)

    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else ("cpu" if args.device == "auto" else args.device)
    )
    if args.threads:
        torch.set_num_threads(args.threads)
    presets = args.presets or (
        ["HPCM_Tiny", "HPCM_Small", "HPCM_Base", "HPCM_Large"]
        if device.type == "cuda"
        else ["HPCM_Tiny", "HPCM_Small"]
    )
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    channels_last = device.type == "cuda" and not args.no_channels_last
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    print(
        f"device={device} threads={torch.get_num_threads()} batch={args.batch} "
        f"size={tuple(args.size)} bf16={args.bf16} channels_last={channels_last} "
        f"repeats={args.repeats}"
    )

    columns = ["forward", "train step", "compress", "decompress"]
    print(f"{'model':<22}{'params M':>10}" + "".join(f"{c + ' ms':>16}" for c in columns))
    torch.manual_seed(0)
    record: dict[str, dict] = {}
    for name in presets:
        model = build_model(name).to(device, memory_format=memory_format)
        params = sum(p.numel() for p in model.parameters()) / 1e6
        h, w = args.size
        if h % model.pad_multiple or w % model.pad_multiple:
            print(
                f"{name:<22}{params:>10.3f}  skipped: size must be a multiple of "
                f"{model.pad_multiple}"
            )
            continue
        x = torch.rand(args.batch, 3, h, w, device=device).to(memory_format=memory_format)
        models = {"ours": model}
        if args.official:
            models["official"] = OfficialAdapter(load_official(args.official, name, model, device))
        times = measure(models, x, args, device)

        def row(label: str, values: dict[str, float], fmt: str) -> str:
            return f"{label:<22}{'':>10}" + "".join(
                format(values[c], fmt) if c in values else f"{'-':>16}" for c in columns
            )

        ours = {c: statistics.median(v) for c, v in times["ours"].items()}
        print(
            f"{name:<22}{params:>10.3f}"
            + "".join(f"{ours[c]:>16.1f}" if c in ours else f"{'-':>16}" for c in columns)
        )
        if args.official:
            theirs = {c: statistics.median(v) for c, v in times["official"].items()}
            print(row("  official", theirs, ">16.1f"))
            # speed of ours relative to the official code, per repeat (paired), then median and IQR
            ratios = {
                c: quartiles([o / u for o, u in zip(times["official"][c], times["ours"][c])])
                for c in times["ours"]
            }
            print(row("  official/ours median", {c: r[0] for c, r in ratios.items()}, ">16.3f"))
            print(
                row(
                    "  IQR (q1-q3)", {c: f"{r[1]:.3f}-{r[2]:.3f}" for c, r in ratios.items()}, ">16"
                )
            )
            # load on a shared machine only adds time: the ratio of the best repeats is a second
            # estimate
            best = {c: min(times["official"][c]) / min(times["ours"][c]) for c in times["ours"]}
            print(row("  best official/best ours", best, ">16.3f"))
            for column, goal in GOALS_CPU.items():
                if column in ratios and device.type == "cpu":
                    print(
                        f"  goal (CPU) {column}: ours >= {goal}x the official speed: "
                        f"{'met' if ratios[column][0] >= goal else 'NOT met'} (median "
                        f"{ratios[column][0]:.3f})"
                    )
        record[name] = {"times_ms": times}
        if "train step" in times["ours"]:
            record[name]["arithmetic"] = print_arithmetic(models, x, times, device)
    print(
        f"times: medians of {args.repeats} repeats after one warm-up ({clock(device).__name__}); "
        "ratios: median of per-repeat official/ours (> 1: ours faster)"
    )
    if args.json:
        Path(args.json).write_text(
            json.dumps({"args": vars(args), "device": str(device), "presets": record}, indent=1)
        )


if __name__ == "__main__":
    main()
