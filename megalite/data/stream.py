"""The resumable training stream: prepared shards → packed token windows for one DP rank.

The stream is global and does not depend on the data-parallel layout, so that the global batch of
a step, and hence its loss, is the same for any dp, and a run can resume with another dp. An epoch
is all samples of a split in a seeded order: shards permuted by `(seed, "shards", epoch)`, the
samples of each shard by `(seed, "samples", epoch, shard)` (identity without `shuffle`). Epochs
follow one another in one endless token stream, cut into consecutive windows of `seq_len + 1`
tokens (inputs and shifted targets) numbered w = 0, 1, 2, ...; a window may span samples, shards
and epochs, so no token is dropped.

The windows are consumed in DP rounds of `dp_size * micro_batch_size`: round k is windows
[k·dp·mb, (k+1)·dp·mb), and rank r's micro-batch k is the r-th block of `mb` windows in it. A
step of `accum` micro-batches per rank thus covers windows [step·G, (step+1)·G), G = accum·dp·mb,
whatever dp (as long as dp·mb·accum is G). Every epoch holds the split's `T` tokens, so a token
position p lies in epoch p // T; shard token counts come from the manifest, so locating a window
reads no shard, and a rank opens only the shards its own windows overlap.

The whole position is the global index of the next round's first window: that is the state, and it
can be loaded by any layout whose round size divides it (a trainer saves at step boundaries).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from megalite.data.manifest import DataError, Manifest, load_manifest, manifest_bytes, read_shard

STATE_VERSION = 2
_CHECKED = ("split", "seq_len", "seed", "shuffle", "data")


class TokenStream:
    """Packed (micro_batch_size, seq_len + 1) int64 token windows for one data-parallel rank.

    Iterating yields batches forever; one iterator at a time (a new `iter()` continues from the
    current position). `state_dict()` after a batch describes exactly the rounds consumed so far;
    the ranks of one layout, at the same step, give the same state.
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
        self._tokens = np.array([s.tokens for s in self._shards], dtype=np.int64)  # (n_shards,)
        self._total = int(self._tokens.sum())  # T: tokens of every epoch
        if self._total < seq_len + 1:
            raise DataError(
                f"split {split!r} of {self._manifest.root} has {self._total} tokens, fewer than "
                f"one window of seq_len + 1 = {seq_len + 1}: use a shorter seq_len (or more data)"
            )
        self.split, self.seq_len, self.micro_batch_size = split, seq_len, micro_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.seed, self.shuffle = int(seed), bool(shuffle)  # plain types: they key the order
        self._data_id = hashlib.sha256(manifest_bytes(self._manifest)).hexdigest()[:16]
        self._round = dp_size * micro_batch_size  # windows all ranks consume per micro-batch
        self._window = 0  # global index of the first window of the next round
        # Caches for the epoch and shard being read; positions only move forward.
        self._plan: tuple[int, np.ndarray, np.ndarray] | None = None  # (epoch, order, bounds)
        self._cached: tuple[int, list[np.ndarray], np.ndarray] | None = None  # shard, samples, lens
        self._view: tuple[int, int, np.ndarray, np.ndarray] | None = None  # epoch, shard, ...

    @property
    def manifest(self) -> Manifest:
        return self._manifest

    @property
    def epoch(self) -> int:
        """The epoch of the last token of the rounds consumed (0 before the first batch).

        A round is shared by all ranks, so every rank reports the same epoch; it is the epoch of
        the last token yielded by the last rank (and by every rank when dp_size is 1).
        """
        return max(self._window * (self.seq_len + 1) - 1, 0) // self._total

    def __iter__(self) -> Iterator[torch.Tensor]:
        width = self.seq_len + 1
        mb = self.micro_batch_size
        while True:
            start = (self._window + self.dp_rank * mb) * width  # this rank's block of the round
            flat = self._read(start, start + mb * width)  # (mb * width,)
            self._window += self._round
            yield torch.from_numpy(flat.astype(np.int64).reshape(mb, width))  # (mb, seq_len + 1)

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "split": self.split,
            "seq_len": self.seq_len,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "data": self._data_id,
            "window": self._window,  # the position: global index of the next round's first window
            "epoch": self.epoch,  # informative, like the layout below: both may change on resume
            "micro_batch_size": self.micro_batch_size,
            "dp_size": self.dp_size,
            "dp_rank": self.dp_rank,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue where the stream that saved `state` stopped, with this stream's layout.

        dp_size, dp_rank and micro_batch_size may differ from the saver's, as long as the saved
        position is a whole number of this layout's rounds. Raises `DataError` if it is not, or if
        the state was saved with another split, seq_len, seed, shuffle or other data.
        """
        if state.get("version") != STATE_VERSION:
            raise DataError(
                f"data stream state version {state.get('version')!r} is not supported "
                f"(this code reads version {STATE_VERSION})"
            )
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
        window = state.get("window")
        if not isinstance(window, int) or isinstance(window, bool) or window < 0:
            raise DataError(f"data stream state position window={window!r} is invalid")
        if window % self._round:
            raise DataError(
                f"data stream state was saved at window {window}, which is not a whole number of "
                f"rounds of dp_size × micro_batch_size = {self.dp_size} × "
                f"{self.micro_batch_size} = {self._round} windows: resume from a step "
                f"boundary with a layout whose round divides the global batch"
            )
        self._window = window

    def _read(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) of the global stream (positions count from epoch 0's start)."""
        pieces: list[np.ndarray] = []
        while start < stop:
            epoch, at = divmod(start, self._total)
            order, bounds = self._epoch_plan(epoch)
            k = int(np.searchsorted(bounds, at, side="right")) - 1  # position in `order`
            shard = int(order[k])
            samples, within, sample_bounds = self._shard_view(epoch, shard)
            at -= int(bounds[k])  # offset in the shard's ordered tokens
            end = min(at + stop - start, int(sample_bounds[-1]))
            j = int(np.searchsorted(sample_bounds, at, side="right")) - 1
            while at < end:
                first = int(sample_bounds[j])
                sample = samples[within[j]]
                piece = sample[at - first : min(end - first, len(sample))]
                pieces.append(piece)
                at += len(piece)
                start += len(piece)
                j += 1
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)

    def _epoch_plan(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """The epoch's shard order (n_shards,) and token offsets of its shards (n_shards + 1,),
        from manifest counts alone."""
        if self._plan is None or self._plan[0] != epoch:
            order = self._order(len(self._shards), "shards", epoch)  # (n_shards,)
            bounds = np.concatenate([[0], np.cumsum(self._tokens[order])])  # (n_shards + 1,)
            self._plan = (epoch, order, bounds)
        return self._plan[1], self._plan[2]

    def _shard_view(
        self, epoch: int, shard: int
    ) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
        """The shard's samples, their order in `epoch` (n,) and token offsets in that order
        (n + 1,). Offsets use the samples' real lengths, so they hold for any sample cut."""
        samples, lengths = self._load(shard)
        if self._view is None or self._view[:2] != (epoch, shard):
            within = self._order(len(samples), "samples", epoch, shard)  # (n,)
            offsets = np.concatenate([[0], np.cumsum(lengths[within])])  # (n + 1,)
            self._view = (epoch, shard, within, offsets)
        return samples, self._view[2], self._view[3]

    def _order(self, n: int, *key: str | int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(n)
        return permutation(n, self.seed, *key)

    def _load(self, shard: int) -> tuple[list[np.ndarray], np.ndarray]:
        if self._cached is None or self._cached[0] != shard:
            self._cached = None  # free the previous shard before reading the next
            samples = read_shard(
                self._paths[shard], self._shards[shard], dtype=self._manifest.dtype
            )
            lengths = np.array([len(s) for s in samples], dtype=np.int64)  # (n,)
            self._cached = (shard, samples, lengths)
        return self._cached[1], self._cached[2]


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
