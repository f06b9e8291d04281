"""The documents of packed windows (`data.document_mask`): which document each token is in, and
its position inside it, found from the end-of-document tokens.

A document ends with its end-of-document token; the token after one starts the next document
(a window's first token starts one too). Attention then stays within a document
(`ops.attention`) and rotary positions restart at each document's start, so the logits of a
packed window equal those of each of its documents run alone.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Documents:
    """Per token of (b, s) windows: its document's index in the window and its position in it."""

    segments: torch.Tensor  # (b, s) int64, 0, 1, ... along each window
    positions: torch.Tensor  # (b, s) int64, 0 at each document's first token

    @functools.cached_property
    def mask(self) -> torch.Tensor:
        """(b, 1, s, s) bool, True where query i may attend key j: j ≤ i in i's document."""
        s = self.segments.shape[1]
        same = self.segments[:, None, :, None] == self.segments[:, None, None, :]  # (b, 1, s, s)
        causal = torch.ones(s, s, dtype=torch.bool, device=self.segments.device).tril()  # (s, s)
        return same & causal

    @functools.cached_property
    def cu_seqlens(self) -> torch.Tensor:
        """(n + 1,) int32: where each of the n documents of the flattened (b * s) tokens starts,
        then b * s; flash-attn's varlen layout (windows are full: no padding)."""
        starts = (self.positions.flatten() == 0).nonzero().flatten()  # (n,)
        end = torch.tensor([self.positions.numel()], device=starts.device)
        return torch.cat([starts, end]).to(torch.int32)

    @functools.cached_property
    def max_len(self) -> int:
        """The longest document's length (a host sync: flash-attn's varlen path needs it)."""
        return int((self.cu_seqlens[1:] - self.cu_seqlens[:-1]).max())


def find_documents(tokens: torch.Tensor, eod_id: int) -> Documents:
    """The documents of windows `tokens` (b, s) that end at `eod_id`."""
    b, s = tokens.shape
    starts = torch.zeros_like(tokens, dtype=torch.bool)  # (b, s)
    starts[:, 0] = True
    starts[:, 1:] = tokens[:, :-1] == eod_id
    index = torch.arange(s, device=tokens.device).expand(b, s)  # (b, s)
    first = torch.where(starts, index, 0).cummax(dim=1).values  # (b, s): its document's start
    return Documents(segments=starts.cumsum(dim=1) - 1, positions=index - first)
