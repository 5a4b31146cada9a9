"""Stop a run cleanly on SIGTERM / SIGINT (e.g. SLURM pre-emption).

``StopFlag`` turns the first signal into a flag that the training loop reads at the next step
boundary, where it saves a checkpoint and exits with ``EXIT_INTERRUPTED`` (``hpcm.train.loop``);
a second signal aborts at once (the last checkpoint is intact). The previous handlers come back
when the ``with`` block ends.
"""

from __future__ import annotations

import signal
from typing import Any


class StopFlag:
    """SIGTERM/SIGINT set a flag; the loop saves at the next step boundary. A second one aborts."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:  # a second signal: stop now (the last checkpoint is intact)
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self) -> "StopFlag":
        for signum in (signal.SIGTERM, signal.SIGINT):
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
