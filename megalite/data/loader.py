"""The train stream served ahead of the trainer by worker processes.

With `workers` = N > 0, worker i of a torch DataLoader builds its own `TokenStream` from the
position the trainer is at and produces micro-batches i, i + N, i + 2N, ... (skipping the rounds
of the others without reading them); the DataLoader hands them out in worker order, so the batches
are exactly those of one stream, `prefetch` per worker read ahead, pinned for a GPU. They cross
from the workers as arrays of the stored dtype (uint16 mostly) through the DataLoader's pipe,
cheaper than shared-memory int64 tensors. The trainer process keeps a shadow stream that only
counts rounds: its state is the position of the last batch handed out, which is what a checkpoint
saves. With 0 workers the stream is read in-process.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any, TypeVar

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from megalite.data.errors import DataError
from megalite.data.stream import TokenStream

T = TypeVar("T")


class Loader:
    """Batches of `make_stream()` (a picklable factory, e.g. a functools.partial of TokenStream),
    read by `workers` processes; `state_dict`/`load_state_dict` as TokenStream's."""

    def __init__(
        self,
        make_stream: functools.partial[TokenStream],
        *,
        workers: int = 0,
        prefetch: int = 2,
        pin_memory: bool = False,
    ) -> None:
        if workers < 0 or prefetch < 1:
            raise DataError(f"loader workers={workers} must be ≥ 0 and prefetch={prefetch} ≥ 1")
        self.make_stream, self.workers, self.prefetch = make_stream, workers, prefetch
        self.pin_memory = pin_memory
        self.stream = make_stream()  # the position; reads only without workers

    @property
    def epoch(self) -> int:
        return self.stream.epoch

    @property
    def position(self) -> int:
        return self.stream.position

    @property
    def loss_mask(self) -> bool:
        return self.stream.loss_mask

    def skip(self, windows: int) -> None:
        """Move past `windows` global windows (whole rounds) unread; the next `iter()` goes on
        from there."""
        if windows % self.stream.round_windows:
            raise DataError(f"cannot skip {windows} windows: not whole rounds")
        for _ in range(windows // self.stream.round_windows):
            self.stream.skip()

    def state_dict(self) -> dict[str, Any]:
        return self.stream.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Move to `state`; the next `iter()` continues from there."""
        self.stream.load_state_dict(state)

    def __iter__(self) -> Iterator[torch.Tensor]:
        if self.workers == 0:
            for batch in self.stream:
                yield batch.pin_memory() if self.pin_memory else batch
            return
        loader = DataLoader(
            _Batches(self.make_stream, self.stream.state_dict()),
            batch_size=None,
            num_workers=self.workers,
            prefetch_factor=self.prefetch,
            collate_fn=_as_is,
        )
        batches = iter(loader)
        while True:
            try:
                array = next(batches)
            except DataError as exc:  # re-raised from a worker, its traceback in the message
                raise DataError(_worker_message(exc)) from None
            self.stream.skip()
            batch = torch.from_numpy(array.astype(np.int64))
            yield batch.pin_memory() if self.pin_memory else batch


class _Batches(IterableDataset):
    """Micro-batches worker, worker + N, ... of the stream from `state` (N workers)."""

    def __init__(self, make_stream: functools.partial[TokenStream], state: dict[str, Any]):
        self.make_stream, self.state = make_stream, state

    def __iter__(self) -> Iterator[np.ndarray]:
        info = get_worker_info()
        worker, n = (info.id, info.num_workers) if info is not None else (0, 1)
        stream = self.make_stream()
        stream.load_state_dict(self.state)
        for _ in range(worker):
            stream.skip()
        while True:
            yield stream.next_tokens()
            for _ in range(n - 1):
                stream.skip()


def _as_is(batch: T) -> T:  # with batch_size=None a DataLoader collates each item alone
    return batch


def _worker_message(exc: DataError) -> str:
    """The one-line message of a DataError a DataLoader worker raised (torch re-raises it with
    the worker's traceback as its message, the original line last)."""
    last = str(exc).strip().splitlines()[-1]
    prefix = f"{DataError.__module__}.{DataError.__qualname__}: "
    return last.removeprefix(prefix)
