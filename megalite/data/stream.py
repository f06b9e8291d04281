"""The resumable training stream: prepared shards → packed token windows for one DP rank.

An epoch is one global sequence of all N samples of a split: shards in a seeded order, and within
each shard its samples in a seeded order (both keyed by `(seed, epoch)`, identity without
`shuffle`). That sequence is cut into `dp_size` contiguous ranges (the first N % dp_size ranks get
one sample more), so every sample is seen exactly once per epoch across ranks, and a rank opens
only the shards that overlap its range. Sample counts come from the manifest: planning an epoch
reads no shard.

A rank's samples, epoch after epoch, form one endless token stream, cut into consecutive windows of
`seq_len + 1` tokens (inputs and shifted targets); `micro_batch_size` windows make a batch. A window
may span samples, shards and epochs, so no token is dropped. Every batch ends on a window boundary,
so the whole position is (epoch, sample index in the rank's range, token offset in that sample):
that is the state, and resuming re-reads that one sample.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from megalite.data.manifest import DataError, Manifest, load_manifest, manifest_bytes, read_shard

STATE_VERSION = 1
_CHECKED = ("split", "seq_len", "dp_size", "dp_rank", "seed", "shuffle", "data")


class TokenStream:
    """Packed (micro_batch_size, seq_len + 1) int64 token windows for one data-parallel rank.

    Iterating yields batches forever; one iterator at a time (a new `iter()` continues from the
    current position). `state_dict()` after a batch describes exactly the batches yielded so far.
    """

    def __init__(
        self,
        root: str | Path,
        split: str,
        *,
        seq_len: int,
        micro_batch_size: int,
        dp_rank: int,
        dp_size: int,
        seed: int,
        shuffle: bool = True,
    ) -> None:
        if seq_len < 1 or micro_batch_size < 1:
            raise DataError(
                f"seq_len={seq_len} and micro_batch_size={micro_batch_size} must be ≥ 1"
            )
        if not 0 <= dp_rank < dp_size:
            raise DataError(f"dp_rank={dp_rank} is outside [0, dp_size={dp_size})")
        self._manifest = load_manifest(root)
        self._shards = self._manifest.split(split).shards
        self._paths = self._manifest.shards(split)
        self._counts = np.array([s.samples for s in self._shards], dtype=np.int64)  # (n_shards,)
        n = int(self._counts.sum())
        if n < dp_size:
            raise DataError(
                f"split {split!r} of {self._manifest.root} has {n} samples, fewer than "
                f"dp_size={dp_size}: prepare it with smaller --sample-tokens (or more data)"
            )
        self.split, self.seq_len, self.micro_batch_size = split, seq_len, micro_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.seed, self.shuffle = int(seed), bool(shuffle)  # plain types: they key the order
        self._start, self._stop = _rank_range(n, dp_rank, dp_size)
        self._data_id = hashlib.sha256(manifest_bytes(self._manifest)).hexdigest()[:16]
        self._epoch, self._sample, self._offset = 0, 0, 0  # position of the next token
        self._cached: tuple[int, list[np.ndarray]] | None = None  # (shard index, its samples)

    @property
    def manifest(self) -> Manifest:
        return self._manifest

    @property
    def epoch(self) -> int:
        """The epoch of the last token yielded (0 before the first batch)."""
        return self._epoch

    def __iter__(self) -> Iterator[torch.Tensor]:
        need = self.micro_batch_size * (self.seq_len + 1)
        pieces: list[np.ndarray] = []
        have = 0
        skip = self._offset
        for epoch, index, tokens in self._samples_from(self._epoch, self._sample):
            pieces.append(tokens[skip:])
            have += len(tokens) - skip
            skip = 0
            while have >= need:
                flat = pieces[0] if len(pieces) == 1 else np.concatenate(pieces)  # (have,)
                rest = flat[need:]  # a suffix of `tokens`: fewer than `need` came before it
                pieces, have = [rest], len(rest)
                self._epoch, self._sample, self._offset = epoch, index, len(tokens) - len(rest)
                batch = flat[:need].astype(np.int64).reshape(self.micro_batch_size, -1)
                yield torch.from_numpy(batch)  # (micro_batch_size, seq_len + 1)

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "split": self.split,
            "seq_len": self.seq_len,
            "micro_batch_size": self.micro_batch_size,  # informative: may change on resume
            "dp_size": self.dp_size,
            "dp_rank": self.dp_rank,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "data": self._data_id,
            "epoch": self._epoch,
            "sample": self._sample,
            "offset": self._offset,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue where the stream that saved `state` stopped. Raises `DataError` if it was saved
        with another layout (dp_size, dp_rank, seq_len, seed, shuffle, split) or other data."""
        if state.get("version") != STATE_VERSION:
            raise DataError(f"data stream state version {state.get('version')!r} is not supported")
        mine = self.state_dict()
        for key in _CHECKED:
            saved, here = state.get(key), mine[key]
            if saved == here:
                continue
            if key == "data":
                raise DataError(
                    "data stream state was saved for other prepared data (its manifest differs): "
                    "resume with the same data"
                )
            raise DataError(
                f"data stream state was saved with {key}={saved!r}, this stream has "
                f"{key}={here!r}: resume with the same {key}"
            )
        epoch, sample, offset = (int(state[k]) for k in ("epoch", "sample", "offset"))
        if epoch < 0 or not 0 <= sample < self._stop - self._start or offset < 0:
            raise DataError(f"data stream state position {epoch, sample, offset} is invalid")
        self._epoch, self._sample, self._offset = epoch, sample, offset

    def _samples_from(self, epoch: int, sample: int) -> Iterator[tuple[int, int, np.ndarray]]:
        """(epoch, index in this rank's range, tokens) from a position on, forever."""
        while True:
            yield from self._epoch_samples(epoch, sample)
            epoch, sample = epoch + 1, 0

    def _epoch_samples(self, epoch: int, first: int) -> Iterator[tuple[int, int, np.ndarray]]:
        order = self._order(len(self._shards), "shards", epoch)  # (n_shards,)
        bounds = np.concatenate([[0], np.cumsum(self._counts[order])])  # (n_shards + 1,)
        g = self._start + first  # global index of the next sample in this epoch's sequence
        k = int(np.searchsorted(bounds, g, side="right")) - 1  # position of its shard in `order`
        while g < self._stop:
            shard = int(order[k])
            samples = self._load(shard)
            within = self._order(len(samples), "samples", epoch, shard)
            base, end = int(bounds[k]), min(int(bounds[k + 1]), self._stop)
            for j in range(g - base, end - base):
                yield epoch, base + j - self._start, samples[within[j]]
            g, k = end, k + 1

    def _order(self, n: int, *key: str | int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(n)
        return permutation(n, self.seed, *key)

    def _load(self, shard: int) -> list[np.ndarray]:
        if self._cached is None or self._cached[0] != shard:
            self._cached = None  # free the previous shard before reading the next
            samples = read_shard(
                self._paths[shard], self._shards[shard], dtype=self._manifest.dtype
            )
            self._cached = (shard, samples)
        return self._cached[1]


def permutation(n: int, *key: str | int) -> np.ndarray:
    """A pseudo-random permutation of range(n) determined by `key` alone.

    Sorts splitmix64 hashes of the indices, so it is the same on every platform and numpy version
    (numpy's Generator streams may change between releases, which would break resuming).
    """
    digest = hashlib.blake2b(repr(key).encode(), digest_size=8).digest()
    with np.errstate(over="ignore"):
        x = np.arange(n, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)  # (n,)
        x += np.uint64(int.from_bytes(digest, "little"))
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return np.argsort(x, kind="stable")


def _rank_range(n: int, dp_rank: int, dp_size: int) -> tuple[int, int]:
    """[start, stop) of `dp_rank`'s contiguous share of n samples; the first n % dp_size get one
    more."""
    base, extra = divmod(n, dp_size)
    start = dp_rank * base + min(dp_rank, extra)
    return start, start + base + (dp_rank < extra)
