"""The C kernel of Cautious Adam's CPU path: build on first use, load, call.

The torch paths on CPU need about fifteen passes over the parameters per step (one kernel per
elementwise op, per tensor); torch's fused Adam needs one. ``cautious_native.c`` runs, per
tensor, the moment pass and the update pass back to back, bit-identical to the torch path: its
square root is the function torch's CPU sqrt calls (MKL's vsSqrt, which is not always correctly
rounded), found in torch's own library and checked against ``torch.sqrt`` on a probe.

Build: the system C compiler (``$CC``, else ``cc``) compiles the source once per source, compiler
and CPU into ``$HPCM_CACHE_DIR/native`` (default ``~/.cache/hpcm/native``), written atomically, so
concurrent jobs on a shared home directory never load a half-written library and nodes with other
CPUs build their own (``-march=native``). ``HPCM_NATIVE=0`` turns the kernel off.

``load()`` returns the library or raises ``NativeKernelUnavailable`` with the reason (no compiler,
the compiler's error output, an unwritable cache, no square root that matches torch's). This module
knows nothing of the definition it must equal: ``hpcm.optim.cautious_adam.native_library`` runs
the bitwise self-check against ``single_tensor_update`` before the optimizer uses the kernel (on
CPUs where ATen runs without fused multiply-adds the kernel's bits differ, and it is refused).

Where "bit-identical" ends: the count of agreeing signs is exact, torch's float32 sum of the 0/1
mask only below 2^24 elements per tensor (no HPCM tensor comes close); NaN payloads under amsgrad
may differ (NaN stays NaN); values written into ``.grad`` through ``.data`` after the clip are not
seen by Balanced's reuse of the clip norm (see ``Balanced._record_clip``).
"""

from __future__ import annotations

import ctypes
import hashlib
import math
import os
import platform
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import torch

SOURCE = Path(__file__).with_name("cautious_native.c")
FLAGS = (
    "-O3",
    "-march=native",
    "-std=c11",
    "-fPIC",
    "-shared",
    "-ffp-contract=off",
    "-fno-math-errno",
)
COMPILE_TIMEOUT_S = 300


class NativeKernelUnavailable(RuntimeError):
    """The C kernel cannot be built or loaded here (the message says why)."""


def cache_dir() -> Path:
    root = os.environ.get("HPCM_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "hpcm"
    )
    return Path(root) / "native"


def _cpu_identity() -> str:
    """What -march=native depends on: the CPU model and its feature flags (Linux), else the
    platform."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        keep = [
            line
            for line in lines
            if line.startswith(("model name", "flags", "Features", "CPU part"))
        ]
        return "\n".join(sorted(set(keep)))
    except OSError:
        return f"{platform.machine()} {platform.processor()}"


def _compiler() -> str:
    name = os.environ.get("CC", "cc")
    path = shutil.which(name)
    if path is None:
        raise NativeKernelUnavailable(
            f"no C compiler: {name!r} (from $CC, default 'cc') is not on PATH"
        )
    return path


def library_path(compiler: str) -> Path:
    version = subprocess.run(
        [compiler, "--version"], capture_output=True, text=True, check=False
    ).stdout
    key = hashlib.sha256(
        "\0".join(
            [SOURCE.read_text(), compiler, version, " ".join(FLAGS), _cpu_identity()]
        ).encode()
    ).hexdigest()[:16]
    return cache_dir() / f"cautious_native-{key}.so"


def build(compiler: str, target: Path) -> None:
    """Compile into a temporary file beside ``target``, then rename (atomic on one file system).

    Every failure (compiler error or timeout, a cache directory that cannot be written) raises
    ``NativeKernelUnavailable`` with the reason, so that the optimizer can fall back.
    """
    temporary = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(
            prefix=target.stem + ".", suffix=".tmp.so", dir=target.parent
        )
        os.close(handle)
        result = subprocess.run(
            [compiler, *FLAGS, str(SOURCE), "-o", temporary, "-lm"],
            capture_output=True,
            text=True,
            timeout=COMPILE_TIMEOUT_S,
            check=False,
        )
        if result.returncode != 0:
            raise NativeKernelUnavailable(
                f"compiling {SOURCE} with {compiler} failed (exit {result.returncode}):\n"
                f"{(result.stderr or result.stdout)[-2000:]}"
            )
        os.chmod(temporary, 0o755)  # mkstemp makes it private; a shared cache serves every user
        os.replace(temporary, target)
    except subprocess.TimeoutExpired as error:
        raise NativeKernelUnavailable(
            f"compiling {SOURCE} with {compiler} took over {error.timeout} s"
        ) from error
    except OSError as error:
        raise NativeKernelUnavailable(
            f"cannot build the kernel into {target.parent}: {error}"
        ) from error
    finally:
        if temporary is not None and os.path.exists(temporary):
            os.unlink(temporary)


@lru_cache(maxsize=1)
def load() -> ctypes.CDLL:
    """The kernel library (built on first use); raises ``NativeKernelUnavailable`` with the
    reason."""
    if os.environ.get("HPCM_NATIVE", "1") == "0":
        raise NativeKernelUnavailable("turned off by HPCM_NATIVE=0")
    compiler = _compiler()
    target = library_path(compiler)
    if not target.is_file():
        build(compiler, target)
    try:
        library = ctypes.CDLL(str(target))
    except OSError as error:
        raise NativeKernelUnavailable(f"cannot load {target}: {error}") from error
    pointer, i64, f32, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
    library.cautious_step.restype = None
    library.cautious_step.argtypes = [
        i64,
        pointer,
        pointer,
        pointer,
        pointer,
        pointer,
        pointer,
        f32,
        f32,
        f32,
        f32,
        i32,
        f32,
        f32,
        f32,
        i32,
        f32,
        f32,
        f32,
        pointer,
    ]
    library.cautious_sqrt.restype = None
    library.cautious_sqrt.argtypes = [pointer, i64, pointer, pointer]
    library.sqrt_function = _torch_sqrt_function(library)
    return library


def _sqrt_probe() -> torch.Tensor:
    """Values that tell square roots apart: a wide exponent range, subnormals, zero, and the small
    second moments Adam sees (where torch's MKL sqrt and the correctly rounded one differ)."""
    generator = torch.Generator().manual_seed(0)
    wide = torch.exp2(torch.empty(1 << 16).uniform_(-140, 120, generator=generator))
    moments = torch.rand(1 << 16, generator=generator) * 1e-6
    return torch.cat([wide, moments, torch.tensor([0.0, 1.0, 4.0, 1e-45, 3.4e38])]).float()


def _torch_sqrt_function(library: ctypes.CDLL) -> int | None:
    """The address of the sqrt that reproduces torch.sqrt bit for bit (MKL's vsSqrt from torch's own
    library), None for the correctly rounded sqrtf; raises when neither does."""
    probe = _sqrt_probe()
    expected = torch.sqrt(probe)
    out = torch.empty_like(probe)
    candidates: list[tuple[str, int | None]] = []
    lib_dir = Path(torch.__file__).parent / "lib"
    for name in ("libtorch_cpu.so", "libtorch_cpu.dylib", "torch_cpu.dll"):
        if (lib_dir / name).is_file():
            try:
                address = ctypes.cast(
                    ctypes.CDLL(str(lib_dir / name)).vsSqrt, ctypes.c_void_p
                ).value
                candidates.append(("MKL vsSqrt", address))
            except (OSError, AttributeError):
                pass  # torch built without MKL: its sqrt is the vectorised hardware one
    candidates.append(("sqrtf", None))
    for _, address in candidates:
        library.cautious_sqrt(address, probe.numel(), probe.data_ptr(), out.data_ptr())
        if torch.equal(out, expected):
            return address
    raise NativeKernelUnavailable(
        f"torch.sqrt on this CPU matches none of {[name for name, _ in candidates]}; the kernel "
        "would not be bit-identical to the torch path"
    )


def ineligible_reason(dtype: torch.dtype, tensors: Sequence[torch.Tensor]) -> str | None:
    """Why the kernel cannot take a CPU bucket of ``dtype`` with these tensors, or None.

    The kernel walks contiguous float32 memory (parameters, gradients and moments alike); the
    caller's bucket is one device and dtype.
    """
    if dtype != torch.float32:
        return f"the kernel takes float32 tensors, got {dtype}"
    if not all(map(torch.Tensor.is_contiguous, tensors)):
        shape = next(tuple(t.shape) for t in tensors if not t.is_contiguous())
        return f"a parameter, gradient or moment of shape {shape} is not contiguous"
    return None


def _pointers(tensors: Sequence[torch.Tensor]) -> ctypes.Array:
    return (ctypes.c_void_p * len(tensors))(*[t.data_ptr() for t in tensors])


def _float32(name: str, value: float) -> float:
    """A scalar as the kernel will see it; torch refuses values that overflow float32, so do we."""
    if math.isfinite(value) and not math.isfinite(ctypes.c_float(value).value):
        raise ValueError(f"{name}={value!r} overflows float32 (the parameters' type)")
    return value


def native_update(
    library: ctypes.CDLL,
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    max_exp_avg_sqs: list[torch.Tensor],
    step: int,
    *,
    amsgrad: bool,
    cautious: bool,
    beta1: float,
    beta2: float,
    lr: float,
    weight_decay: float,
    eps: float,
    mask_mean_floor: float,
    mask_scale_cap: float,
) -> None:
    """One Cautious Adam step of tensors all at ``step`` with the kernel (contiguous float32 each;
    ``ineligible_reason`` says when not), in place; the scalars as the definition computes them."""
    numels = (ctypes.c_int64 * len(params))(*[p.numel() for p in params])
    max_sq = _pointers(max_exp_avg_sqs) if amsgrad else None
    lr, beta1, beta2 = float(lr), float(beta1), float(beta2)
    library.cautious_step(
        len(params),
        numels,
        _pointers(grads),
        _pointers(params),
        _pointers(exp_avgs),
        _pointers(exp_avg_sqs),
        max_sq,
        beta1,
        1 - beta1,
        beta2,
        1 - beta2,
        int(cautious),
        float(mask_mean_floor),
        float(mask_scale_cap),
        _float32("1 - lr * weight_decay", 1 - lr * weight_decay),
        int(weight_decay != 0),
        math.sqrt(1 - beta2**step),
        _float32("eps", float(eps)),
        _float32("lr / (1 - beta1**step)", -(lr / (1 - beta1**step))),
        library.sqrt_function,
    )
