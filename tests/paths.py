"""Where the tests find the repository, its fixtures and the shared data (one definition)."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"
SHARED = REPO.parent / "shared"  # beside the checkout on development machines and in CI; absent on a user's clone
KODAK = SHARED / "data" / "kodak"
