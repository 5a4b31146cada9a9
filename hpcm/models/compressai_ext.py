"""CompressAI's two compiled extensions, loaded without importing the ``compressai`` package.

``import compressai`` runs its package ``__init__``, which imports its point-cloud datasets and
through them torch_geometric and torch._dynamo: about 7 s of CPU per process. Every Snakemake job is
a fresh process, so the demo DAG would spend minutes on imports it never uses. We only need the rANS
coder (``compressai.ans``) and ``pmf_to_quantized_cdf`` (``compressai._CXX``), which are
self-contained pybind11 modules; loading them from their files gives the very same classes.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType


def _load_extension(name: str) -> ModuleType:
    qualified = f"compressai.{name}"
    if qualified in sys.modules:  # compressai was imported by someone else: reuse its module
        return sys.modules[qualified]
    package = importlib.util.find_spec("compressai")
    if package is None or not package.submodule_search_locations:
        raise ImportError(
            "compressai is not installed; install the pinned environment (make install)"
        )
    directory = Path(package.submodule_search_locations[0])
    candidates = sorted(directory.glob(f"{name}.*.so")) + sorted(directory.glob(f"{name}.*.pyd"))
    if not candidates:
        raise ImportError(f"compressai's compiled extension {name!r} was not found in {directory}")
    spec = importlib.util.spec_from_file_location(qualified, candidates[0])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ans = _load_extension("ans")
pmf_to_quantized_cdf = _load_extension("_CXX").pmf_to_quantized_cdf
BufferedRansEncoder = ans.BufferedRansEncoder
RansDecoder = ans.RansDecoder
