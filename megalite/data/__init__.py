"""Data: raw text → tokenizer + WebDataset token shards (`prepare`), and the resumable per-rank
token stream the trainer reads (`TokenStream`). See `manifest.py` for the on-disk format.

`TokenStream` is imported on first use, so that data preparation does not import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from megalite.data.errors import DataError
from megalite.data.manifest import Manifest, load_manifest
from megalite.data.prepare import prepare
from megalite.data.sample import prepare_sample

if TYPE_CHECKING:
    from megalite.data.stream import TokenStream

__all__ = ["DataError", "Manifest", "TokenStream", "load_manifest", "prepare", "prepare_sample"]


def __getattr__(name: str) -> Any:
    if name == "TokenStream":
        from megalite.data.stream import TokenStream

        return TokenStream
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
