"""Hang diagnosis: every rank dumps its Python stacks when no step has finished for a while.

A rank stuck in a collective (a peer died or is stuck itself), in I/O or in a deadlock shows
nothing in its log; the dump says where each thread of each rank is. `faulthandler` does the
dumping from a C thread, so it works while Python is blocked inside a C call holding the GIL.
The dump goes to the rank's log file ("Timeout (0:30:00)!" then every thread's stack), again every
timeout while the rank stays stuck; the run goes on (a dead peer ends it through
`trainer.collective_timeout`).
"""

from __future__ import annotations

import faulthandler
from pathlib import Path
from typing import IO


class HangWatchdog:
    """`arm()` after each step restarts the countdown; `close()` stops it. timeout 0: off."""

    def __init__(self, log_file: Path, *, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._file: IO[str] | None = open(log_file, "a") if timeout_s > 0 else None  # noqa: SIM115

    def arm(self) -> None:
        if self._file is not None:  # re-arming cancels the previous countdown
            faulthandler.dump_traceback_later(self.timeout_s, repeat=True, file=self._file)

    def close(self) -> None:
        if self._file is None:
            return
        faulthandler.cancel_dump_traceback_later()
        self._file.close()
        self._file = None
