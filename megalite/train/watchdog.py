"""Hang diagnosis: a deadline for each start-up phase, and stack dumps when no step finishes.

A rank stuck in a collective (a peer died or is stuck itself), in I/O or in a deadlock shows
nothing in its log; the dump says where each thread of each rank is. `faulthandler` does the
dumping from a C thread, so it works while Python is blocked inside a C call holding the GIL.
The dump goes to the rank's log file ("Timeout (0:30:00)!" then every thread's stack), again every
timeout while the rank stays stuck; the run goes on (a dead peer ends it through
`trainer.collective_timeout`).
"""

from __future__ import annotations

import faulthandler
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from megalite import faults
from megalite.rank.launcher import STARTUP_EXIT, report_failure

log = logging.getLogger("megalite")


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


class StartupWatchdog:
    """`trainer.startup_timeout`: a deadline for each phase of a rank's start.

    The start runs as named phases (`with watchdog.phase("rendezvous", waits_for=...)`), one after
    another. A phase still running after `timeout_s` seconds is stuck — a peer that never joins,
    a stale build lock, a file system that does not answer — and nothing else would ever say so:
    the hang watchdog only starts with the loop. The rank then logs the phase and what it waits
    for (`waits_for`, evaluated then: it may look at the disk), dumps its stacks into its log,
    hands the line to the launcher (`rank.launcher.report_failure`) and exits `STARTUP_EXIT`.
    A thread does this, not a signal, since the main thread may be blocked inside C code.
    """

    def __init__(self, log_file: Path, *, timeout_s: float, rank: int) -> None:
        self.timeout_s, self.log_file, self.rank = timeout_s, log_file, rank
        self._cond = threading.Condition()
        self._phase: tuple[str, Callable[[], str], float] | None = None
        self._closed = False
        if timeout_s > 0:
            threading.Thread(target=self._watch, name="startup-watchdog", daemon=True).start()

    @contextmanager
    def phase(self, name: str, *, waits_for: str | Callable[[], str]) -> Iterator[None]:
        what = waits_for if callable(waits_for) else lambda: waits_for
        with self._cond:
            self._phase = (name, what, time.monotonic())
            self._cond.notify()
        try:
            faults.startup_hang(name)  # tests only
            yield
        finally:
            with self._cond:
                self._phase = None
                self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()

    def _watch(self) -> None:
        with self._cond:
            while not self._closed:
                if self._phase is None:
                    self._cond.wait()
                    continue
                name, what, started = self._phase
                left = started + self.timeout_s - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            else:
                return
        self._expire(name, what())

    def _expire(self, name: str, waits_for: str) -> None:
        message = (
            f"rank {self.rank}: start-up phase '{name}' still running after "
            f"trainer.startup_timeout={self.timeout_s:g}s; waiting for {waits_for}"
        )
        log.error("%s; stacks follow", message)
        with open(self.log_file, "a") as f:
            faulthandler.dump_traceback(file=f)
        report_failure(message)
        print(f"error: {message}", file=sys.stderr, flush=True)
        logging.shutdown()
        os._exit(STARTUP_EXIT)
