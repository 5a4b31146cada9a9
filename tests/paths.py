"""Where the tests find the repository, its fixtures and the shared data (one definition)."""

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"
# Beside the checkout on development machines and in CI; absent on a user's clone, where only the
# checks that need its exact files (Kodak's bytes, the published anchor JSONs) skip. HPCM_SHARED
# points elsewhere, e.g. at a missing folder to run the suite as a user's clone would.
SHARED = Path(os.environ.get("HPCM_SHARED", REPO.parent / "shared"))
KODAK = SHARED / "data" / "kodak"
