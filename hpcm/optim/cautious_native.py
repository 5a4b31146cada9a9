"""The fused CPU kernel of Cautious Adam: build on first use, load, call.

The torch paths on CPU need about fifteen passes over the parameters per step (one kernel per
elementwise op, per tensor); torch's fused Adam needs one. ``cautious_native.c`` runs, per
tensor, the moment pass and the update pass back to back, bit-identical to the torch path: its
square root is the function torch's CPU sqrt calls (MKL's vsSqrt, which is not always correctly
rounded), found in torch's own library and checked against ``torch.sqrt`` on a probe. On HPCM_Tiny (1.68 M parameters, 1 thread) ``step()`` drops from 7.7 ms to
2.5 ms, fused Adam takes 1.8 ms; ``benchmarks/optimizer_overhead.py`` prints all three.

Build: the system C compiler (``$CC``, else ``cc``) compiles the source once per source, compiler
and CPU into ``$HPCM_CACHE_DIR/native`` (default ``~/.cache/hpcm/native``), written atomically, so
concurrent jobs on a shared home directory never load a half-written library and nodes with other
CPUs build their own (``-march=native``). ``HPCM_NATIVE=0`` turns the kernel off.

``load()`` returns the library or raises ``NativeKernelUnavailable`` with the reason (no compiler,
the compiler's error output, an unwritable cache, or results that differ from the torch path's on a
small self-check, as on CPUs where ATen runs without fused multiply-adds). ``CautiousAdam(fused=None)`` uses the kernel when it loads and warns
once, with that reason, when it falls back to the torch path; ``fused=True`` raises instead.

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
import warnings
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import torch

from hpcm.optim.cautious_flat import build_flat_moments
from hpcm.optim.cautious_math import MASK_MEAN_FLOOR, MASK_SCALE_CAP, single_tensor_update

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
    """Compile into a temporary file beside ``target``, then rename (atomic on one file system).

    Every failure (compiler error or timeout, a cache directory that cannot be written) raises
    ``NativeKernelUnavailable`` with the reason, so that the optimizer can fall back.
    """
    temporary = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=target.stem + ".", suffix=".tmp.so", dir=target.parent)
        os.close(handle)
        result = subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", temporary, "-lm"],
                                capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S, check=False)
        if result.returncode != 0:
            raise NativeKernelUnavailable(
                f"compiling {SOURCE} with {compiler} failed (exit {result.returncode}):\n"
                f"{(result.stderr or result.stdout)[-2000:]}")
        os.chmod(temporary, 0o755)  # mkstemp makes it private; a shared cache serves every user
        os.replace(temporary, target)
    except subprocess.TimeoutExpired as error:
        raise NativeKernelUnavailable(f"compiling {SOURCE} with {compiler} took over {error.timeout} s") from error
    except OSError as error:
        raise NativeKernelUnavailable(f"cannot build the kernel into {target.parent}: {error}") from error
    finally:
        if temporary is not None and os.path.exists(temporary):
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
    _check_against_torch(library)
    return library


def _check_against_torch(library: ctypes.CDLL) -> None:
    """Run a few odd-sized tensors through the kernel and through the definition
    (``cautious_math.single_tensor_update``) and demand identical bits: the kernel mirrors ATen's
    vectorised kernels (fused multiply-adds in ``add(alpha=)`` and ``addcmul``), which a CPU or
    build without them (ATen's DEFAULT capability) does not use."""
    generator = torch.Generator().manual_seed(0)
    shapes = [(1,), (7,), (33, 3), (1000,), (4099,)]
    keys = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
    results = []
    for use_kernel in (False, True):
        params = [torch.randn(shape, generator=torch.Generator().manual_seed(i)) for i, shape in enumerate(shapes)]
        states = [{key: torch.zeros_like(p) for key in keys} for p in params]
        flat = build_flat_moments(params, states, keys) if use_kernel else None
        generator.manual_seed(1)
        for step in range(1, 4):
            grads = [torch.randn(p.shape, generator=generator) * 1e-3 for p in params]
            for grad in grads:
                grad[::5] = 0.0
            options = dict(amsgrad=True, cautious=True, beta1=0.9, beta2=0.999, lr=1e-2, weight_decay=0.01, eps=1e-8)
            if use_kernel:
                _native_update_with(library)(flat, params, grads, step, mask_mean_floor=MASK_MEAN_FLOOR,
                                             mask_scale_cap=MASK_SCALE_CAP, **options)
            else:
                single_tensor_update(params, grads, *([s[key] for s in states] for key in keys),
                                     [step] * len(params), **options)
        results.append(torch.cat([t.reshape(-1) for t in (*params, *(s[key] for key in keys for s in states))]))
    if not torch.equal(*results):
        raise NativeKernelUnavailable(
            "the kernel does not reproduce torch's CPU arithmetic here (ATen CPU capability "
            f"{torch.backends.cpu.get_cpu_capability()}); the torch path keeps results exact")


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
                address = ctypes.cast(ctypes.CDLL(str(lib_dir / name)).vsSqrt, ctypes.c_void_p).value
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


def _float32(name: str, value: float) -> float:
    """A scalar as the kernel will see it; torch refuses values that overflow float32, so do we."""
    if math.isfinite(value) and not math.isfinite(ctypes.c_float(value).value):
        raise ValueError(f"{name}={value!r} overflows float32 (the parameters' type)")
    return value


def _native_update_with(library: ctypes.CDLL):
    """``native_update`` on a given library (``load()``'s self-check runs it before returning)."""
    def update(flat, params: list[torch.Tensor], grads: list[torch.Tensor], step: int, *,
               amsgrad: bool, cautious: bool, beta1: float, beta2: float, lr: float, weight_decay: float,
               eps: float, mask_mean_floor: float, mask_scale_cap: float) -> None:
        if flat.native_numels is None:  # per bucket, built once (the numels never change)
            flat.native_numels = (ctypes.c_int64 * len(params))(*flat.numels)
        max_sq = flat.buffers["max_exp_avg_sq"].data_ptr() if amsgrad else None
        lr, beta1, beta2 = float(lr), float(beta1), float(beta2)
        library.cautious_step(
            len(params), flat.native_numels, _pointers(grads), _pointers(params),
            flat.buffers["exp_avg"].data_ptr(), flat.buffers["exp_avg_sq"].data_ptr(), max_sq,
            beta1, 1 - beta1, beta2, 1 - beta2, int(cautious), float(mask_mean_floor), float(mask_scale_cap),
            _float32("1 - lr * weight_decay", 1 - lr * weight_decay), int(weight_decay != 0),
            math.sqrt(1 - beta2**step), _float32("eps", float(eps)),
            _float32("lr / (1 - beta1**step)", -(lr / (1 - beta1**step))), library.sqrt_function)
    return update


def native_update(flat, params: list[torch.Tensor], grads: list[torch.Tensor], step: int, **options) -> None:
    """One Cautious Adam step of a bucket (``flat``: ``cautious_flat.FlatMoments``) with the C kernel,
    bit-identical to ``cautious_math.single_tensor_update`` (checked when the library loads)."""
    _native_update_with(load())(flat, params, grads, step, **options)
