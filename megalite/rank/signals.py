"""Stop requests: a signal asks the whole job to checkpoint at the next step boundary and stop.

A signal reaches some ranks and not others, at any point of a step (SLURM's `--signal`, a
preemption notice, `scancel --signal=USR2`, a user's `kill -USR1`). The handler only notes it;
at each step boundary the trainer asks `StopRequest.agreed()`, a MAX all-reduce over the world,
so every rank sees the request at the same step, saves the same checkpoint and stops together.
A loop that all-reduces over the world anyway adds `flags()` to that reduction and reads the
agreed signal with `agree()` (no second all-reduce, no second host sync).
"""

from __future__ import annotations

import signal
from collections.abc import Iterable
from types import FrameType

import torch
import torch.distributed as dist

from megalite.rank import host


class StopRequest:
    def __init__(self) -> None:
        self.signum = 0  # the last signal received, 0 for none
        self.signums: list[int] = []  # the signals installed, in increasing order

    def install(self, signums: Iterable[int]) -> None:
        signums = list(signums)
        for signum in signums:
            signal.signal(signum, self._on_signal)
        self.signums = sorted({*self.signums, *map(int, signums)})

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.signum = int(signum)

    def agreed(self, device: torch.device) -> int:
        """The signal any rank received (collective: every rank calls it at the same step)."""
        flag = torch.tensor([self.signum], dtype=torch.int64, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(host.read(flag)[0])

    def flags(self, device: torch.device) -> torch.Tensor:
        """(len(signums),) float64: 1 at this rank's signal, to be SUM-reduced over the world."""
        return torch.tensor(
            [float(s == self.signum) for s in self.signums], dtype=torch.float64, device=device
        )

    def agree(self, reduced: list[float]) -> int:
        """The signal `flags()` summed over the world names (the highest received, as the MAX
        of `agreed()`), 0 for none."""
        received = [s for s, n in zip(self.signums, reduced, strict=True) if n > 0]
        return max(received, default=0)


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name
