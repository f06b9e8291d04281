"""Loss anomalies: a non-finite loss, or a spike above `spike_factor` × the running mean.

The guard sees each step's loss, which is the same on every rank (averaged over data parallelism,
broadcast from the last pipeline stage), so every rank reaches the same verdict at the same step.
Its history of recent good losses is part of the checkpoint, so a resumed run judges as the
uninterrupted one would.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any

WINDOW = 50  # good steps in the running mean
WARMUP = 10  # good steps before spikes are judged (the first losses fall fast)


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
