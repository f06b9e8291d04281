"""Writing a split's shards: documents in, fixed-length samples out, one shard at a time,
resumable from the position after any shard. `ShardWriter` cuts one token stream (pretraining);
`PackedWriter` packs whole SFT records into windows (fine-tuning)."""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from megalite.data.codec import hexdigest, shard_bytes
from megalite.data.errors import DataError
from megalite.data.loss_mask import MASKED_DTYPE
from megalite.data.manifest import ShardInfo
from megalite.files import atomic_write


@dataclass(frozen=True)
class WriterPosition:
    """How far a `ShardWriter` got, as of its last written shard: its shards, how many of the
    split's documents lie wholly in them, and how many tokens (EOD included) of the next one."""

    shards: list[ShardInfo]
    documents_done: int = 0
    tokens_into_next: int = 0
    counts: dict[str, int] = field(default_factory=dict)  # a `PackedWriter`'s counters

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "shards": [s.to_json() for s in self.shards]}

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> WriterPosition:
        shards = [ShardInfo(**s) for s in raw["shards"]]
        counts = {str(k): int(v) for k, v in raw.get("counts", {}).items()}
        return cls(shards, int(raw["documents_done"]), int(raw["tokens_into_next"]), counts)


def write_shard(
    folder: Path, samples: list[np.ndarray], *, index: int, first_key: int, documents: int
) -> ShardInfo:
    """Shard number `index` of `folder` (atomically), its samples keyed from `first_key`."""
    name = f"shard-{index:06d}.tar"
    data = shard_bytes(samples, first_key=first_key)
    atomic_write(folder / name, data)
    return ShardInfo(
        path=f"{folder.name}/{name}",
        samples=len(samples),
        documents=documents,
        tokens=sum(len(s) for s in samples),
        sha256=hashlib.sha256(data).hexdigest(),
        xxh3_64=hexdigest("xxh3_64", data),
    )


class _ShardFolder(ABC):
    """What both writers share: the shards written so far in `folder`, the samples of the one
    being filled, and the write of a full one (atomic; then `position` and `on_shard`)."""

    def __init__(
        self,
        folder: Path,
        samples_per_shard: int,
        resume: WriterPosition | None,
        on_shard: Callable[[], None] | None,
    ) -> None:
        self.folder, self.samples_per_shard, self.on_shard = folder, samples_per_shard, on_shard
        folder.mkdir(parents=True, exist_ok=True)
        self.position = resume or WriterPosition([])
        self._shards: list[ShardInfo] = list(self.position.shards)
        self._next_key = sum(s.samples for s in self._shards)
        self._samples: list[np.ndarray] = []  # samples of the shard being filled
        self._shard_docs = 0  # documents (records) that end in it

    def _append(self, sample: np.ndarray) -> None:
        self._samples.append(sample)
        if len(self._samples) == self.samples_per_shard:
            self._write_shard()

    def _write_shard(self) -> None:
        shard = write_shard(
            self.folder,
            self._samples,
            index=len(self._shards),
            first_key=self._next_key,
            documents=self._shard_docs,
        )
        self._shards.append(shard)
        self._next_key += len(self._samples)
        self._samples, self._shard_docs = [], 0
        self.position = self._position()
        if self.on_shard is not None:
            self.on_shard()

    @abstractmethod
    def _position(self) -> WriterPosition:
        """Where a writer resumed after the last shard written goes on."""


class ShardWriter(_ShardFolder):
    """One split's documents → one token stream → samples of `sample_tokens` tokens → shards of
    `samples_per_shard` samples in `folder`, each written atomically as soon as it is full.

    Resumable: `position` is updated after every shard (and `on_shard` called), and a writer made
    with `resume=position` continues that stream exactly, given the split's documents from
    `position.documents_done` on (the first is cut by the `tokens_into_next` already written).
    """

    def __init__(
        self,
        folder: Path,
        *,
        dtype: np.dtype,
        eod_id: int,
        sample_tokens: int,
        samples_per_shard: int,
        resume: WriterPosition | None = None,
        on_shard: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(folder, samples_per_shard, resume, on_shard)
        self.dtype, self.eod_id, self.sample_tokens = dtype, eod_id, sample_tokens
        self._stream_pos = sum(s.tokens for s in self._shards)  # offset of the first pending token
        self._skip = self.position.tokens_into_next  # to drop from the next document added
        self._docs_done = self.position.documents_done
        self._done_end = self._stream_pos - self._skip  # stream offset past the last done document
        self._pending: list[np.ndarray] = []  # token pieces not yet cut into samples
        self._pending_tokens = 0
        self._doc_ends: deque[int] = deque()  # split-stream offsets just past each document

    ADDED_TOKENS = 1  # what `add` puts after a document: the EOD token

    def add(self, ids: np.ndarray) -> None:
        """Append one document's token ids; the EOD token is added here."""
        doc = np.append(ids, self.eod_id)  # (n + 1,)
        if self._skip:
            if self._skip >= len(doc):
                raise DataError(f"cannot resume {self.folder}: the input no longer matches")
            doc, self._skip = doc[self._skip :], 0
        self._pending.append(doc)
        self._pending_tokens += len(doc)
        self._doc_ends.append(self._stream_pos + self._pending_tokens)
        if self._pending_tokens >= self.sample_tokens:
            self._cut(final=False)

    def close(self) -> list[ShardInfo]:
        self._cut(final=True)
        if self._samples:
            self._write_shard()
        return self._shards

    def _cut(self, *, final: bool) -> None:
        if not self._pending:
            return
        tokens = np.concatenate(self._pending).astype(self.dtype)  # (pending_tokens,)
        n_full = len(tokens) // self.sample_tokens
        ends = [self.sample_tokens * (i + 1) for i in range(n_full)]
        if final and len(tokens) % self.sample_tokens:
            ends.append(len(tokens))  # the last sample of a split may be short
        start = 0
        for end in ends:
            self._add_sample(tokens[start:end])
            start = end
        self._pending = [tokens[start:]] if start < len(tokens) else []
        self._pending_tokens = len(tokens) - start

    def _add_sample(self, sample: np.ndarray) -> None:
        self._stream_pos += len(sample)
        while self._doc_ends and self._doc_ends[0] <= self._stream_pos:
            self._done_end = self._doc_ends.popleft()
            self._shard_docs += 1
            self._docs_done += 1
        self._append(sample)

    def _position(self) -> WriterPosition:
        return WriterPosition(
            list(self._shards), self._docs_done, self._stream_pos - self._done_end
        )


class PackedWriter(_ShardFolder):
    """One split's SFT records (stored tokens, `loss_mask.encode`d, end token included) → windows
    of exactly `window` tokens → shards of `samples_per_shard` windows in `folder`.

    Records are packed whole, in order, next-fit: a record that does not fit in the open window
    closes it (the rest filled with `pad_id` stored as not trained) and opens the next. A record
    longer than a window is cut to its first `window` tokens (counted: `records_truncated`); a
    window with no trained target (position ≥ 1) is dropped (`windows_dropped`, with its records
    in `records_dropped`). So every window starts at a record boundary, and a stream reading
    windows of seq_len + 1 = `window` tokens back to back reads one packed window per sample.

    Resumable like `ShardWriter`: a shard is written only when a window closes, with no record
    open, so `position.documents_done` counts every record placed, and `position.counts` the
    counters (also the trained, context and padding tokens of the written windows).
    """

    ADDED_TOKENS = 0  # records come with their end token

    def __init__(
        self,
        folder: Path,
        *,
        pad_id: int,
        window: int,
        samples_per_shard: int,
        resume: WriterPosition | None = None,
        on_shard: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(folder, samples_per_shard, resume, on_shard)
        self.window = window
        self._pad = np.array([-pad_id - 1], dtype=MASKED_DTYPE)  # (1,) the pad, not trained
        self._records_done = self.position.documents_done
        self.counts = dict.fromkeys(PACKING_COUNTS, 0) | self.position.counts
        self._open: list[np.ndarray] = []  # the records of the open window
        self._open_tokens = 0

    def add(self, stored: np.ndarray) -> None:
        """Place one record (its stored tokens, (n,) int32)."""
        if self._open_tokens + len(stored) > self.window:
            self._close_window()
        if len(stored) > self.window:
            stored = stored[: self.window]
            self.counts["records_truncated"] += 1
        self._open.append(stored)
        self._open_tokens += len(stored)

    def close(self) -> list[ShardInfo]:
        self._close_window()
        if self._samples:
            self._write_shard()
        return self._shards

    def _close_window(self) -> None:
        if not self._open:
            return
        pad = self.window - self._open_tokens
        sample = np.concatenate([*self._open, np.repeat(self._pad, pad)])  # (window,)
        records = len(self._open)
        self._open, self._open_tokens = [], 0
        self._records_done += records
        if not (sample[1:] >= 0).any():
            self.counts["windows_dropped"] += 1
            self.counts["records_dropped"] += records
            return
        trained = int((sample >= 0).sum())
        self.counts["trained_tokens"] += trained
        self.counts["context_tokens"] += self.window - pad - trained
        self.counts["padding_tokens"] += pad
        self._shard_docs += records
        self._append(sample)

    def _position(self) -> WriterPosition:
        return WriterPosition(list(self._shards), self._records_done, 0, dict(self.counts))


PACKING_COUNTS = (
    "records_truncated",
    "windows_dropped",
    "records_dropped",
    "trained_tokens",
    "context_tokens",
    "padding_tokens",
)
