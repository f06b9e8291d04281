"""An ordered, bounded map over batches in worker processes: the `--workers N` of preparation.

Results come back in input order, so the output does not depend on N. The processes are started
with `spawn` (the Rust tokenizers library can deadlock in a child forked after its thread pool
ran), so a script that calls `prepare(..., workers=N)` needs the usual `if __name__ ==
"__main__":` guard. Each worker runs its tokenizer single-threaded (N workers use about N cores);
with N = 1 everything runs in this process, where the tokenizer libraries use their own threads.
At most `2·N` batches are in flight, so the input is read as fast as the workers consume it, not
into memory. A worker that dies (killed, out of memory) fails the map instead of hanging it, and
workers exit when their parent is killed.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Generator, Iterable
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from types import TracebackType
from typing import TypeVar

from megalite.data.errors import DataError

T = TypeVar("T")
R = TypeVar("R")

# One thread per worker for the libraries that would otherwise start one per core each.
_WORKER_ENV = {"TOKENIZERS_PARALLELISM": "false", "RAYON_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}


def _init_worker(parent: int) -> None:
    os.environ.update(_WORKER_ENV)
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()


def _exit_with_parent(parent: int) -> None:
    """A killed parent (kill -9) cannot stop its workers: they notice and exit on their own
    (`parent` is the pid the parent gave, so a parent killed while this one booted counts)."""
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(1)


def _ready() -> None:
    """A no-op task: submitted once per worker by `start`, so the processes boot right away."""


class Workers:
    """`map(fn, items)` in this process (`n == 1`) or in `n` spawned processes; use as a context
    manager, which stops the processes. `fn` and the items must pickle when `n > 1`."""

    def __init__(self, n: int) -> None:
        if n < 1:
            raise DataError(f"--workers {n} must be ≥ 1")
        self.n = n
        self._pool: ProcessPoolExecutor | None = None

    def start(self) -> None:
        """Start the worker processes now (they boot while this process works on), rather
        than on the first `map`."""
        if self.n > 1 and self._pool is None:
            ctx = multiprocessing.get_context("spawn")
            self._pool = ProcessPoolExecutor(
                self.n, mp_context=ctx, initializer=_init_worker, initargs=(os.getpid(),)
            )
            for _ in range(self.n):
                self._pool.submit(_ready)

    def map(self, fn: Callable[[T], R], items: Iterable[T]) -> Generator[R, None, None]:
        """fn(item) for each item, in order; lazy, like the builtin `map`."""
        if self.n == 1:
            yield from map(fn, items)
            return
        self.start()
        assert self._pool is not None
        pending: deque[Future[R]] = deque()
        try:
            for item in items:
                pending.append(self._pool.submit(fn, item))
                if len(pending) >= 2 * self.n:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        except BrokenProcessPool as exc:
            raise DataError(f"a worker process died ({exc}); try fewer --workers") from None
        finally:
            for future in pending:  # stopped early: drop the batches not yet started
                future.cancel()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> Workers:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
