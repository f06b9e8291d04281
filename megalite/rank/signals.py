"""Stop requests: a signal asks the whole job to checkpoint at the next step boundary and stop.

A signal reaches some ranks and not others, at any point of a step (SLURM's `--signal`, a
preemption notice, `scancel --signal=USR2`, a user's `kill -USR1`). The handler only notes it;
at each step boundary the trainer asks `StopRequest.agreed()`, a MAX all-reduce over the world,
so every rank sees the request at the same step, saves the same checkpoint and stops together.
"""

from __future__ import annotations

import signal
from collections.abc import Iterable
from types import FrameType

import torch
import torch.distributed as dist


class StopRequest:
    def __init__(self) -> None:
        self.signum = 0  # the last signal received, 0 for none

    def install(self, signums: Iterable[int]) -> None:
        for signum in signums:
            signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.signum = int(signum)

    def agreed(self, device: torch.device) -> int:
        """The signal any rank received (collective: every rank calls it at the same step)."""
        flag = torch.tensor([self.signum], dtype=torch.int64, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name
