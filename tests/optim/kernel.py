"""Whether CautiousAdam's C kernel can serve on this machine (one definition for the optim
tests)."""

from __future__ import annotations

import os
import shutil
from functools import lru_cache

import pytest

from hpcm.optim import cautious_adam, cautious_native


@lru_cache(maxsize=1)
def kernel_refusal() -> str | None:
    """Why the kernel cannot serve here, or None. Besides a missing C compiler, it refuses itself
    where ATen's CPU kernels use no fused multiply-adds (ATEN_CPU_CAPABILITY=default): its bits
    would differ from the torch path's, so the optimizer uses the torch path, which the fallback
    tests cover."""
    if shutil.which(os.environ.get("CC", "cc")) is None:
        return "no C compiler"
    try:
        cautious_adam.native_library()
    except cautious_native.NativeKernelUnavailable as error:
        return str(error)
    return None


needs_kernel = pytest.mark.skipif(
    kernel_refusal() is not None, reason=f"no usable kernel: {kernel_refusal()}"
)
