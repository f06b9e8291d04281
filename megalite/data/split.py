"""The train/val split of data preparation: a seeded hash of each document's text decides.

Hashing the text (not the position) keeps a document in the same split when the corpus around it
changes, and puts exact copies (kept with `--dedup none`) in the same split.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar


class Doc(Protocol):
    @property
    def index(self) -> int: ...  # position among the documents read

    @property
    def digest(self) -> bytes: ...  # hash of the text


D = TypeVar("D", bound=Doc)


@dataclass
class SplitPlan:
    """Assigns each document to val or train by a seeded hash of its text.

    A document is val when its score (a hash mapped to [0, 1)) is below `val_fraction`. The first
    pass (`observe`) counts; when that leaves val or train empty although there are ≥ 2 documents,
    the document with the lowest (highest) score moves there, so both splits exist. Ties between
    equal scores (copies) go to the first copy, so exactly one document moves.
    """

    seed: int
    val_fraction: float
    documents: int = 0
    val: int = 0
    lowest: int = -1  # index of the document with the lowest score
    highest: int = -1

    def observe(self, docs: Iterator[D]) -> Iterator[D]:
        """Pass `docs` through, counting them and their splits."""
        low: tuple[float, bytes, int] = (2.0, b"", -1)
        high: tuple[float, bytes, int] = (-1.0, b"", -1)
        for doc in docs:
            score = self._score(doc)
            self.documents += 1
            self.val += score < self.val_fraction
            low = min(low, (score, doc.digest, doc.index))
            high = max(high, (score, doc.digest, -doc.index))
            self.lowest, self.highest = low[2], -high[2]
            yield doc

    def split_names(self) -> list[str]:
        return ["train", "val"] if self.val_fraction > 0 and self.documents >= 2 else ["train"]

    def split_of(self, doc: Doc) -> str:
        if "val" not in self.split_names():
            return "train"
        if self.val == 0 and doc.index == self.lowest:
            return "val"
        if self.val == self.documents and doc.index == self.highest:
            return "train"
        return "val" if self._score(doc) < self.val_fraction else "train"

    def to_json(self) -> dict[str, Any]:
        keys = ("seed", "val_fraction", "documents", "val", "lowest", "highest")
        return {k: getattr(self, k) for k in keys}

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> SplitPlan:
        return cls(**raw)

    def _score(self, doc: Doc) -> float:
        key = str(self.seed).encode()[:64]
        h = hashlib.blake2b(doc.digest, digest_size=8, key=key).digest()
        return int.from_bytes(h, "little") / 2**64
