"""Where the tests find the repository, its fixtures and the shared data (one definition)."""

import importlib.util
import os
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"
# Beside the checkout on development machines and in CI; absent on a user's clone, where only the
# checks that need its exact files (Kodak's bytes, the published anchor JSONs) skip. HPCM_SHARED
# points elsewhere, e.g. at a missing folder to run the suite as a user's clone would.
SHARED = Path(os.environ.get("HPCM_SHARED", REPO.parent / "shared"))
KODAK = SHARED / "data" / "kodak"


def load_script(path: Path, name: str | None = None) -> ModuleType:
    """A script that is not in a package (``benchmarks/*.py``, fixture generators), imported by
    path."""
    spec = importlib.util.spec_from_file_location(name or path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
