"""One prepared dataset split as an endless, seeded token stream with random access.

An epoch is all samples of the split in a seeded order: shards permuted by
`(seed, "shards", epoch)`, the samples of each shard by `(seed, "samples", epoch, shard)`
(identity without `shuffle`). Epochs follow one another in one endless stream, so token position
p lies in epoch p // T, T the split's tokens. Shard token counts come from the manifest, so
locating a position reads no shard, and a reader opens only the shards its reads overlap —
plus, when its reads advance by at most an eighth of a shard each (so they will reach the next
shard), that next shard of the epoch, read, checked and decoded in a thread while this one is
consumed.
"""

from __future__ import annotations

import bisect
import hashlib
import threading
from collections.abc import Callable

import numpy as np

from megalite.data.errors import DataError
from megalite.data.shards import Location, Retry, read_shard_at


class Source:
    """Tokens [start, stop) of one split's endless stream; reads move forward (caches)."""

    def __init__(
        self, location: Location, split: str, *, seed: int, shuffle: bool, retry: Retry
    ) -> None:
        self.location, self.split = location, split
        self._shards = location.split(split)  # [(url, info)]
        self._tokens = np.array([info.tokens for _, info in self._shards], dtype=np.int64)
        self.total = int(self._tokens.sum())  # T: tokens of every epoch
        if self.total == 0:
            raise DataError(f"split {split!r} of {location.spec} holds no tokens")
        self.seed, self.shuffle, self.retry = seed, shuffle, retry
        self.dtype = location.manifest.dtype
        # Caches for the epoch and shard being read.
        self._plan: tuple[int, np.ndarray, np.ndarray] | None = None  # (epoch, order, bounds)
        self._cached: tuple[int, list[np.ndarray], np.ndarray] | None = None  # shard, samples, lens
        self._view: tuple[int, int, list[np.ndarray], list[int]] | None = None  # epoch, shard, ...
        self._ahead: _ReadAhead | None = None  # the next shard, being read in a thread
        self._last_stop: int | None = None  # where the previous read ended

    def read(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) of the stream (positions count from epoch 0's start)."""
        pieces: list[np.ndarray] = []
        while start < stop:
            epoch, at = divmod(start, self.total)
            order, bounds = self._epoch_plan(epoch)
            k = int(np.searchsorted(bounds, at, side="right")) - 1  # position in `order`
            ordered, offsets = self._shard_view(epoch, int(order[k]))
            at -= int(bounds[k])  # offset in the shard's ordered tokens
            end = min(at + stop - start, offsets[-1])
            j = bisect.bisect_right(offsets, at) - 1  # the samples [j, last] overlap [at, end)
            last = bisect.bisect_left(offsets, end) - 1
            if j == last:
                pieces.append(ordered[j][at - offsets[j] : end - offsets[j]])
            else:
                pieces.append(ordered[j][at - offsets[j] :])
                pieces += ordered[j + 1 : last]
                pieces.append(ordered[last][: end - offsets[last]])
            start += end - at
        if pieces and self._last_stop is not None and stop > self._last_stop:
            self._read_ahead(epoch, k, stride=stop - self._last_stop)
        self._last_stop = stop
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)

    def _read_ahead(self, epoch: int, k: int, *, stride: int) -> None:
        """Start reading the shard after the k-th of `epoch` if reads advancing by `stride`
        tokens will get there: the current shard spans at least 8 of them."""
        order, _ = self._epoch_plan(epoch)
        if k + 1 >= len(order) or self._tokens[order[k]] < 8 * stride:
            return
        shard = int(order[k + 1])
        if (self._ahead is None or self._ahead.shard != shard) and self._tokens[shard]:
            url, info = self._shards[shard]
            read = lambda: read_shard_at(url, info, dtype=self.dtype, retry=self.retry)
            self._ahead = _ReadAhead(shard, read)

    def _epoch_plan(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """The epoch's shard order (n_shards,) and token offsets of its shards (n_shards + 1,),
        from manifest counts alone."""
        if self._plan is None or self._plan[0] != epoch:
            order = self._order(len(self._shards), "shards", epoch)  # (n_shards,)
            bounds = np.concatenate([[0], np.cumsum(self._tokens[order])])  # (n_shards + 1,)
            self._plan = (epoch, order, bounds)
        return self._plan[1], self._plan[2]

    def _shard_view(self, epoch: int, shard: int) -> tuple[list[np.ndarray], list[int]]:
        """The shard's samples in their `epoch` order and their token offsets (n + 1), as lists:
        a read then slices lists instead of stepping through samples. Offsets use the samples'
        real lengths, so they hold for any sample cut."""
        samples, lengths = self._load(shard)
        if self._view is None or self._view[:2] != (epoch, shard):
            within = self._order(len(samples), "samples", epoch, shard)  # (n,)
            offsets = np.concatenate([[0], np.cumsum(lengths[within])])  # (n + 1,)
            ordered = [samples[i] for i in within.tolist()]
            self._view = (epoch, shard, ordered, offsets.tolist())
        return self._view[2], self._view[3]

    def _order(self, n: int, *key: str | int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(n)
        return permutation(n, self.seed, *key)

    def _load(self, shard: int) -> tuple[list[np.ndarray], np.ndarray]:
        if self._cached is None or self._cached[0] != shard:
            self._cached = None  # free the previous shard before reading the next
            ahead, self._ahead = self._ahead, None
            if ahead is not None and ahead.shard == shard:
                samples = ahead.result()
            else:
                url, info = self._shards[shard]
                samples = read_shard_at(url, info, dtype=self.dtype, retry=self.retry)
            lengths = np.array([len(s) for s in samples], dtype=np.int64)  # (n,)
            self._cached = (shard, samples, lengths)
        return self._cached[1], self._cached[2]


class _ReadAhead:
    """`read()` of shard `shard` in a daemon thread; `result()` waits for it and returns it or
    raises what it raised (its retries, warnings and errors are the same as in the reader's
    thread: a failure surfaces only if the shard is used)."""

    def __init__(self, shard: int, read: Callable[[], list[np.ndarray]]) -> None:
        self.shard = shard
        self._samples: list[np.ndarray] = []
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(read,), daemon=True)
        self._thread.start()

    def _run(self, read: Callable[[], list[np.ndarray]]) -> None:
        try:
            self._samples = read()
        except BaseException as exc:  # raised in the reader's thread instead
            self._error = exc

    def result(self) -> list[np.ndarray]:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._samples


def permutation(n: int, *key: str | int) -> np.ndarray:
    """A pseudo-random permutation of range(n) determined by `key` alone.

    Sorts splitmix64 hashes of the indices, so it is the same on every platform and numpy version
    (numpy's Generator streams may change between releases, which would break resuming).
    """
    return np.argsort(mix64(0, n, *key), kind="stable")


def mix64(first: int, n: int, *key: str | int) -> np.ndarray:
    """splitmix64 hashes (n,) uint64 of the indices [first, first + n), keyed by `key`."""
    digest = hashlib.blake2b(repr(key).encode(), digest_size=8).digest()
    with np.errstate(over="ignore"):
        x = np.arange(first, first + n, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        x += np.uint64(int.from_bytes(digest, "little"))
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return x
