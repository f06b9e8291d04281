"""Writing a split's shards: documents in, fixed-length samples out, one shard at a time,
resumable from the position after any shard."""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from megalite.data.codec import shard_bytes
from megalite.data.errors import DataError
from megalite.data.manifest import ShardInfo
from megalite.files import atomic_write


@dataclass(frozen=True)
class WriterPosition:
    """How far a `ShardWriter` got, as of its last written shard: its shards, how many of the
    split's documents lie wholly in them, and how many tokens (EOD included) of the next one."""

    shards: list[ShardInfo]
    documents_done: int = 0
    tokens_into_next: int = 0

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "shards": [asdict(s) for s in self.shards]}

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> WriterPosition:
        shards = [ShardInfo(**s) for s in raw["shards"]]
        return cls(shards, int(raw["documents_done"]), int(raw["tokens_into_next"]))


class ShardWriter:
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
        self.folder, self.dtype, self.eod_id = folder, dtype, eod_id
        self.sample_tokens, self.samples_per_shard = sample_tokens, samples_per_shard
        self.on_shard = on_shard
        folder.mkdir(parents=True, exist_ok=True)
        self.position = resume or WriterPosition([])
        self._shards: list[ShardInfo] = list(self.position.shards)
        self._next_key = sum(s.samples for s in self._shards)
        self._stream_pos = sum(s.tokens for s in self._shards)  # offset of the first pending token
        self._skip = self.position.tokens_into_next  # to drop from the next document added
        self._docs_done = self.position.documents_done
        self._done_end = self._stream_pos - self._skip  # stream offset past the last done document
        self._pending: list[np.ndarray] = []  # token pieces not yet cut into samples
        self._pending_tokens = 0
        self._doc_ends: deque[int] = deque()  # split-stream offsets just past each document
        self._samples: list[np.ndarray] = []  # samples of the shard being filled
        self._shard_docs = 0

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
        self._samples.append(sample)
        if len(self._samples) == self.samples_per_shard:
            self._write_shard()

    def _write_shard(self) -> None:
        name = f"shard-{len(self._shards):06d}.tar"
        data = shard_bytes(self._samples, first_key=self._next_key)
        atomic_write(self.folder / name, data)
        self._shards.append(
            ShardInfo(
                path=f"{self.folder.name}/{name}",
                samples=len(self._samples),
                documents=self._shard_docs,
                tokens=sum(len(s) for s in self._samples),
                sha256=hashlib.sha256(data).hexdigest(),
            )
        )
        self._next_key += len(self._samples)
        self._samples, self._shard_docs = [], 0
        self.position = WriterPosition(
            list(self._shards), self._docs_done, self._stream_pos - self._done_end
        )
        if self.on_shard is not None:
            self.on_shard()
