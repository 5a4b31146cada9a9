"""The fused CPU kernel of Cautious Adam: build on first use, load, call.

The torch path on CPU (``cautious_flat``) needs about fifteen passes over the parameters per step
(one kernel per elementwise op); torch's fused Adam needs one. ``cautious_native.c`` does the
Cautious update in two passes, with a ``torch.sqrt`` over the flat second moment between them (see
the C file: that keeps the result bit-identical to the torch path, whose CPU sqrt is not always
correctly rounded). On HPCM_Tiny (1.68 M parameters, 1 thread) the update drops from ~7.4 ms to
about the cost of fused Adam; ``benchmarks/optimizer_overhead.py`` prints both.

Build: the system C compiler (``$CC``, else ``cc``) compiles the source once per source, compiler
and CPU into ``$HPCM_CACHE_DIR/native`` (default ``~/.cache/hpcm/native``), written atomically, so
concurrent jobs on a shared home directory never load a half-written library and nodes with other
CPUs build their own (``-march=native``). ``HPCM_NATIVE=0`` turns the kernel off.

``load()`` returns the library or raises ``NativeKernelUnavailable`` with the reason (no compiler,
the compiler's error output). ``CautiousAdam(fused=None)`` uses the kernel when it loads and warns
once, with that reason, when it falls back to the torch path; ``fused=True`` raises instead.
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
import warnings
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import torch

SOURCE = Path(__file__).with_name("cautious_native.c")
FLAGS = ("-O3", "-march=native", "-std=c11", "-fPIC", "-shared", "-ffp-contract=off", "-fno-math-errno")
COMPILE_TIMEOUT_S = 300


class NativeKernelUnavailable(RuntimeError):
    """The C kernel cannot be built or loaded here (the message says why)."""


def cache_dir() -> Path:
    root = os.environ.get("HPCM_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "hpcm")
    return Path(root) / "native"


def _cpu_identity() -> str:
    """What -march=native depends on: the CPU model and its feature flags (Linux), else the platform."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        keep = [line for line in lines if line.startswith(("model name", "flags", "Features", "CPU part"))]
        return "\n".join(sorted(set(keep)))
    except OSError:
        return f"{platform.machine()} {platform.processor()}"


def _compiler() -> str:
    name = os.environ.get("CC", "cc")
    path = shutil.which(name)
    if path is None:
        raise NativeKernelUnavailable(f"no C compiler: {name!r} (from $CC, default 'cc') is not on PATH")
    return path


def library_path(compiler: str) -> Path:
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=False).stdout
    key = hashlib.sha256("\0".join([SOURCE.read_text(), compiler, version, " ".join(FLAGS),
                                    _cpu_identity()]).encode()).hexdigest()[:16]
    return cache_dir() / f"cautious_native-{key}.so"


def build(compiler: str, target: Path) -> None:
    """Compile into a temporary file beside ``target``, then rename (atomic on one file system)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=target.stem + ".", suffix=".tmp.so", dir=target.parent)
    os.close(handle)
    try:
        result = subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", temporary, "-lm"],
                                capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S, check=False)
        if result.returncode != 0:
            raise NativeKernelUnavailable(
                f"compiling {SOURCE} with {compiler} failed (exit {result.returncode}):\n"
                f"{(result.stderr or result.stdout)[-2000:]}")
        os.replace(temporary, target)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


@lru_cache(maxsize=1)
def load() -> ctypes.CDLL:
    """The kernel library (built on first use); raises ``NativeKernelUnavailable`` with the reason."""
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
    library.cautious_step.argtypes = [i64, pointer, pointer, pointer, pointer, pointer, pointer,
                                      f32, f32, f32, f32, i32, f32, f32, f32, i32, f32, f32, f32, pointer]
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
                address = ctypes.cast(getattr(ctypes.CDLL(str(lib_dir / name)), "vsSqrt"), ctypes.c_void_p).value
                candidates.append(("MKL vsSqrt", address))
            except (OSError, AttributeError):
                pass  # torch built without MKL: its sqrt is the vectorised hardware one
    candidates.append(("sqrtf", None))
    for _, address in candidates:
        library.cautious_sqrt(address, probe.numel(), probe.data_ptr(), out.data_ptr())
        if torch.equal(out, expected):
            return address
    raise NativeKernelUnavailable(
        f"torch.sqrt on this CPU matches none of {[name for name, _ in candidates]}; the kernel would "
        "not be bit-identical to the torch path")


@lru_cache(maxsize=1)
def unavailable_reason() -> str | None:
    """None when the kernel loads; else why not (computed once per process)."""
    try:
        load()
    except NativeKernelUnavailable as error:
        return str(error)
    return None


_warned = False


def warn_fallback_once(reason: str) -> None:
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(f"hpcm: CautiousAdam uses the slower torch CPU path: {reason}", RuntimeWarning, stacklevel=4)


def ineligible_reason(dtype: torch.dtype, tensors: Sequence[torch.Tensor]) -> str | None:
    """Why the kernel cannot take a CPU bucket of ``dtype`` with these tensors, or None.

    The kernel walks contiguous float32 memory; the caller's bucket is one device and dtype.
    """
    if dtype != torch.float32:
        return f"the kernel takes float32 tensors, got {dtype}"
    if not all(map(torch.Tensor.is_contiguous, tensors)):
        shape = next(tuple(t.shape) for t in tensors if not t.is_contiguous())
        return f"a parameter or gradient of shape {shape} is not contiguous"
    return None


def _pointers(tensors: Sequence[torch.Tensor]) -> ctypes.Array:
    return (ctypes.c_void_p * len(tensors))(*[t.data_ptr() for t in tensors])


def native_update(
    flat, params: list[torch.Tensor], grads: list[torch.Tensor], step: int, *,
    amsgrad: bool, cautious: bool, beta1: float, beta2: float, lr: float, weight_decay: float,
    eps: float, mask_mean_floor: float, mask_scale_cap: float,
) -> None:
    """One Cautious Adam step of a bucket (``flat``: ``cautious_flat.FlatMoments``) with the C kernel."""
    library = load()
    if flat.native_numels is None:  # per bucket, built once (the numels never change)
        flat.native_numels = (ctypes.c_int64 * len(params))(*flat.numels)
    max_sq = flat.buffers["max_exp_avg_sq"].data_ptr() if amsgrad else None
    lr, beta1, beta2 = float(lr), float(beta1), float(beta2)
    library.cautious_step(
        len(params), flat.native_numels, _pointers(grads), _pointers(params),
        flat.buffers["exp_avg"].data_ptr(), flat.buffers["exp_avg_sq"].data_ptr(), max_sq,
        beta1, 1 - beta1, beta2, 1 - beta2, int(cautious), float(mask_mean_floor), float(mask_scale_cap),
        1 - lr * weight_decay, int(weight_decay != 0), math.sqrt(1 - beta2**step), float(eps),
        -(lr / (1 - beta1**step)), library.sqrt_function)
