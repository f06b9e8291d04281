"""Loss anomalies: a non-finite loss, or a spike above `spike_factor` × the running mean.

Each step's loss is the same on every rank (averaged over data parallelism, broadcast from the
last pipeline stage), so every rank reaches the same verdict at the same step. `LossGuard` judges
one loss; `AnomalyPolicy` judges each step before its optimizer step (the update of an anomalous
one is dropped, see parallel/discard.py) and says what follows, by `trainer.anomaly`:
- halt: stop with `TrainingError`, naming the last good checkpoint;
- skip: go on with the next batch, halting after more than `trainer.max_skips` in a row;
- rollback: reload the last checkpoint and move past the offending batch unread, at most
  `trainer.max_rollbacks` times.
The guard's history of recent good losses and the condemned batches are part of the checkpoint,
so a resumed run judges and skips as the uninterrupted one would.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from megalite import faults
from megalite.config import TrainerConfig

log = logging.getLogger("megalite")
WINDOW = 50  # good steps in the running mean
WARMUP = 10  # good steps before spikes are judged (the first losses fall fast)
NO_CHECKPOINT = "none (no checkpoint was saved yet)"


class TrainingError(RuntimeError):
    """Training cannot go on (a loss anomaly); the message names the last good checkpoint."""


class Anomaly(Exception):
    """A step's loss is non-finite or a spike; `windows` are its batch's global windows."""

    def __init__(self, reason: str, step: int, windows: range) -> None:
        super().__init__(reason)
        self.reason, self.step, self.windows = reason, step, windows

    def __str__(self) -> str:
        w = self.windows
        return f"{self.reason} at step {self.step} (windows [{w.start}, {w.stop}))"


class LossGuard:
    """`check(loss)` → None for a good loss (remembered), or why it is anomalous."""

    def __init__(self, *, spike_factor: float) -> None:
        self.spike_factor = spike_factor
        self.recent: deque[float] = deque(maxlen=WINDOW)

    def check(self, loss: float) -> str | None:
        if not math.isfinite(loss):
            return f"non-finite loss ({loss})"
        if self.spike_factor > 0 and len(self.recent) >= WARMUP:
            mean = sum(self.recent) / len(self.recent)
            if loss > self.spike_factor * mean:
                return (
                    f"loss spike ({loss:.4g} > trainer.spike_factor={self.spike_factor:g} × "
                    f"running mean {mean:.4g})"
                )
        self.recent.append(loss)
        return None

    def state_dict(self) -> dict[str, Any]:
        return {"recent": list(self.recent)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.recent = deque(state.get("recent", []), maxlen=WINDOW)


class AnomalyPolicy:
    """Judge each step's loss (`begin_step`, then `judge` before the optimizer step, then
    `verdict`), and `respond` to an anomalous one by `trainer.anomaly`."""

    def __init__(self, t: TrainerConfig) -> None:
        self.mode = t.anomaly
        self.max_skips, self.max_rollbacks = t.max_skips, t.max_rollbacks
        self.batch_windows = t.global_batch_size
        self.guard = LossGuard(spike_factor=t.spike_factor)
        self.skipped: list[list[int]] = []  # [start, stop) windows condemned by a rollback
        self.rollbacks = 0
        self.skips_in_a_row = 0
        self._step = 0  # the step in progress (1-based) and its batch's first global window
        self._first_window = 0
        self._verdict: tuple[float, Anomaly | None] | None = None

    def begin_step(self, step: int, first_window: int) -> None:
        self._step, self._first_window, self._verdict = step, first_window, None

    def judge(self, loss: float) -> bool:
        """The loss of the step in progress, before its optimizer step: True (drop the update)
        if it is non-finite or a spike."""
        windows = range(self._first_window, self._first_window + self.batch_windows)
        loss = faults.bad_loss(loss, windows=windows)  # tests only
        reason = self.guard.check(loss)
        anomaly = None if reason is None else Anomaly(reason, self._step, windows)
        self._verdict = (loss, anomaly)
        return anomaly is not None

    def verdict(self) -> float:
        """The judged loss of the step in progress; raises its `Anomaly` if it was one."""
        assert self._verdict is not None, "the optimizer step was not judged"
        loss, anomaly = self._verdict
        if anomaly is not None:
            raise anomaly
        self.skips_in_a_row = 0
        return loss

    def respond(self, bad: Anomaly, last_good: Callable[[], Path | None]) -> Path | None:
        """What follows `bad`: the checkpoint to roll back to (its batch is then skipped), or
        None to go on (skip). Raises TrainingError to halt. `last_good` finishes any save in
        flight and names the newest committed checkpoint."""
        if self.mode == "skip":
            self.skips_in_a_row += 1
            if self.skips_in_a_row > self.max_skips:
                raise TrainingError(
                    f"{bad}; {self.skips_in_a_row} steps in a row skipped, more than "
                    f"trainer.max_skips={self.max_skips}; last good checkpoint: "
                    f"{last_good() or NO_CHECKPOINT}"
                )
            log.warning("%s: update skipped (trainer.anomaly=skip)", bad)
            return None
        where = last_good()
        if self.mode == "halt" or where is None or self.rollbacks >= self.max_rollbacks:
            why = ""
            if self.mode == "rollback":
                why = (
                    "; no checkpoint to roll back to"
                    if where is None
                    else f"; trainer.max_rollbacks={self.max_rollbacks} reached"
                )
            raise TrainingError(f"{bad}{why}; last good checkpoint: {where or NO_CHECKPOINT}")
        self.rollbacks += 1
        log.warning("%s: rolling back to %s and skipping that batch", bad, where)
        self.skipped.append([bad.windows.start, bad.windows.stop])
        return where

    def condemned_at(self, position: int) -> int:
        """How many windows to move past unread at the stream's `position` (a batch a rollback
        condemned starts there), else 0."""
        for start, stop in self.skipped:
            if start == position:
                return stop - start
        return 0

    def state_dict(self) -> dict[str, Any]:
        return {"guard": self.guard.state_dict(), "skipped": self.skipped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """A checkpoint's state; a rollback's own condemned range, newer than it, is kept."""
        self.guard.load_state_dict(state.get("guard", {}))
        saved = [list(r) for r in state.get("skipped", [])]
        self.skipped = sorted(saved + [r for r in self.skipped if r not in saved])
