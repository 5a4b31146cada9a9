"""The one way a ``python -m hpcm.<module>`` command turns an expected failure into a message.

Bad input (a missing file, a malformed CSV, an unknown variant) is the user's to fix, so it
becomes a single ``error: ...`` line naming the file, key or value, and exit code 2; anything
else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from pathlib import Path

EXIT_INPUT_ERROR = 2


def run_command(
    action: Callable[[], Iterable[Path] | None],
    errors: tuple[type[BaseException], ...] = (ValueError, OSError),
) -> int:
    """Run ``action``; print the paths it returns (if any), or the error it raised."""
    try:
        written = action()
    except errors as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_INPUT_ERROR
    for path in written or ():
        print(path)
    return 0
