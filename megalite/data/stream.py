"""The resumable training stream: one or more prepared datasets → packed token windows for one
DP rank.

The stream is global and does not depend on the data-parallel layout, so that the global batch of
a step, and hence its loss, is the same for any dp, and a run can resume with another dp. It is a
sequence of windows of `seq_len + 1` tokens (inputs and shifted targets) numbered w = 0, 1, 2, ...
Window w comes from source k with probability weight_k (mixture.py; one source: all of them), and
is that source's next window: the j-th window drawn from a source is tokens [j·(L+1), (j+1)·(L+1))
of its endless shuffled stream (source.py), so a window may span samples, shards and epochs and no
token is dropped.

The windows are consumed in DP rounds of `dp_size * micro_batch_size`: round k is windows
[k·dp·mb, (k+1)·dp·mb), and rank r's micro-batch k is the r-th block of `mb` windows in it. A
step of `accum` micro-batches per rank thus covers windows [step·G, (step+1)·G), G = accum·dp·mb,
whatever dp (as long as dp·mb·accum is G). Every rank draws the sources of the whole round, so all
ranks agree on how many windows each source has given.

The position is the global index of the next round's first window plus the windows drawn from
each source so far: that is the state, and it can be loaded by any layout whose round size
divides the window (a trainer saves at step boundaries).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from megalite.data.errors import DataError
from megalite.data.mixture import SourceSpec, check_tokenizers, choose, normalise
from megalite.data.shards import DEFAULT_RETRY, Retry, locate
from megalite.data.source import Source, permutation

__all__ = ["STATE_VERSION", "TokenStream", "permutation"]

STATE_VERSION = 3
_CHECKED = ("split", "seq_len", "seed", "shuffle")
log = logging.getLogger(__name__)


class TokenStream:
    """Packed (micro_batch_size, seq_len + 1) int64 token windows for one data-parallel rank.

    `sources` is one prepared folder or shard pattern (shards.py), or a mixture: `SourceSpec`s
    with weights (normalised to sum to 1; zero-weight sources left out). A source without `split`
    is left out of a mixture's stream for that split (a lone source raises).

    Iterating yields batches forever; one iterator at a time (a new `iter()` continues from the
    current position). `state_dict()` after a batch describes exactly the rounds consumed so far;
    the ranks of one layout, at the same step, give the same state.
    """

    def __init__(
        self,
        sources: str | Path | Sequence[SourceSpec],
        split: str,
        *,
        seq_len: int,
        micro_batch_size: int,
        dp_rank: int,
        dp_size: int,
        seed: int,
        shuffle: bool = True,
        retry: Retry = DEFAULT_RETRY,
    ) -> None:
        if seq_len < 1 or micro_batch_size < 1:
            raise DataError(
                f"seq_len={seq_len} and micro_batch_size={micro_batch_size} must be ≥ 1"
            )
        if not 0 <= dp_rank < dp_size:
            raise DataError(f"dp_rank={dp_rank} is outside [0, dp_size={dp_size})")
        self.split, self.seq_len, self.micro_batch_size = split, seq_len, micro_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.seed, self.shuffle = int(seed), bool(shuffle)  # plain types: they key the order
        self.specs, self.sources = _open(sources, split, seed=self.seed, shuffle=self.shuffle,
                                         retry=retry)  # fmt: skip
        self._cumulative = np.cumsum([s.weight for s in self.specs])  # (n_sources,)
        self._cumulative[-1] = 1.0
        width = seq_len + 1
        for source in self.sources:
            _check_window(source, width)
            if source.total < width:
                raise DataError(
                    f"split {split!r} of {source.location.spec} has {source.total} tokens, fewer "
                    f"than one window of seq_len + 1 = {width}: use a shorter seq_len (or more "
                    "data)"
                )
        self._round = dp_size * micro_batch_size  # windows all ranks consume per micro-batch
        self._window = 0  # global index of the first window of the next round
        self._drawn = np.zeros(len(self.sources), dtype=np.int64)  # windows given per source

    @property
    def position(self) -> int:
        """Global index of the next round's first window (the same on every rank)."""
        return self._window

    @property
    def round_windows(self) -> int:
        """Windows all ranks consume per micro-batch: dp_size × micro_batch_size."""
        return self._round

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.specs]

    @property
    def loss_mask(self) -> bool:
        """Whether any source marks tokens untrained (fine-tuning data: `loss_mask.py`); if none
        does, every target of every window is trained."""
        return any(s.location.manifest.loss_mask for s in self.sources)

    @property
    def epoch(self) -> int:
        """The furthest epoch reached by any source's last window (0 before the first batch);
        the same on every rank: all ranks draw every round."""
        return max(self.epochs().values())

    def epochs(self) -> dict[str, int]:
        """Each source's epoch at the end of its last window drawn."""
        width = self.seq_len + 1
        return {
            spec.name: max(int(n) * width - 1, 0) // source.total
            for spec, source, n in zip(self.specs, self.sources, self._drawn, strict=True)
        }

    def windows_drawn(self) -> dict[str, int]:
        """Windows drawn from each source so far, by all ranks together."""
        return {spec.name: int(n) for spec, n in zip(self.specs, self._drawn, strict=True)}

    def __iter__(self) -> Iterator[torch.Tensor]:
        while True:
            yield self.next_batch()

    def next_batch(self) -> torch.Tensor:
        """This rank's micro-batch of the next round (micro_batch_size, seq_len + 1), int64."""
        return torch.from_numpy(self.next_tokens().astype(np.int64))

    def next_tokens(self) -> np.ndarray:
        """`next_batch` in the stored token dtype (uint16/uint32, or int32 carrying a loss mask:
        `loss_mask.split_window` reads it): less to move around than int64."""
        which, index = self._draw()
        mb = self.micro_batch_size
        mine = slice(self.dp_rank * mb, (self.dp_rank + 1) * mb)
        flat = self._read(which[mine], index[mine])  # (mb * (seq_len + 1),)
        self._advance(which)
        return flat.reshape(mb, self.seq_len + 1)

    def skip(self) -> None:
        """Move past the next round without reading it (what `next_batch` does to the state)."""
        self._advance(self._draw()[0])

    def state_dict(self) -> dict[str, Any]:
        epochs, drawn = self.epochs(), self.windows_drawn()
        return {
            "version": STATE_VERSION,
            "split": self.split,
            "seq_len": self.seq_len,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "window": self._window,  # the position: global index of the next round's first window
            "sources": {
                spec.name: {
                    "data": source.location.data_id,
                    "weight": spec.weight,
                    "windows": drawn[spec.name],
                    "epoch": epochs[spec.name],
                }
                for spec, source in zip(self.specs, self.sources, strict=True)
            },
            "epoch": self.epoch,  # informative, like the layout below: both may change on resume
            "micro_batch_size": self.micro_batch_size,
            "dp_size": self.dp_size,
            "dp_rank": self.dp_rank,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue where the stream that saved `state` stopped, with this stream's layout.

        dp_size, dp_rank and micro_batch_size may differ from the saver's, as long as the saved
        position is a whole number of this layout's rounds; so may the sources' weights and names
        (sources are matched by their data). Raises `DataError` if the position is not a whole
        number of rounds, or if the state was saved with another split, seq_len, seed, shuffle
        or other data.
        """
        state = _upgrade(state, self)
        mine = self.state_dict()
        for key in _CHECKED:
            if state.get(key) != mine[key]:
                raise DataError(
                    f"data stream state was saved with {key}={state.get(key)!r}, this stream has "
                    f"{key}={mine[key]!r}: resume with the same {key}"
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
        self._drawn = _match_sources(state, mine, window)
        self._window = window

    def _draw(self) -> tuple[np.ndarray, np.ndarray]:
        """The source of each window of the next round (R,) and its index in that source (R,)."""
        which = choose(self._cumulative, self.seed, self._window, self._round)  # (R,)
        index = np.empty(self._round, dtype=np.int64)  # (R,)
        for k in range(len(self.sources)):
            mask = which == k
            index[mask] = self._drawn[k] + np.arange(int(mask.sum()))
        return which, index

    def _advance(self, which: np.ndarray) -> None:
        self._drawn += np.bincount(which, minlength=len(self.sources))
        self._window += self._round

    def _read(self, which: np.ndarray, index: np.ndarray) -> np.ndarray:
        """The windows (source which[i], index[i]) back to back; runs of consecutive windows of
        one source are one read."""
        width = self.seq_len + 1
        pieces: list[np.ndarray] = []
        i = 0
        while i < len(which):
            j = i + 1
            while j < len(which) and which[j] == which[i] and index[j] == index[j - 1] + 1:
                j += 1
            source = self.sources[int(which[i])]
            pieces.append(source.read(int(index[i]) * width, int(index[j - 1] + 1) * width))
            i = j
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)


def _check_window(source: Source, width: int) -> None:
    """Fine-tuning data is packed into windows of the prepared seq_len + 1 tokens, each starting
    at a record: only a stream of that width reads one window per sample."""
    window = source.location.manifest.window
    if window is not None and window != width:
        raise DataError(
            f"data {source.location.spec} was packed for seq_len={window - 1}: "
            f"set trainer.seq_len={window - 1}"
        )


def _open(
    sources: str | Path | Sequence[SourceSpec],
    split: str,
    *,
    seed: int,
    shuffle: bool,
    retry: Retry,
) -> tuple[list[SourceSpec], list[Source]]:
    """The mixture's specs (normalised) and a reader of `split` for each."""
    if isinstance(sources, (str, Path)):
        path = str(Path(sources).expanduser()) if isinstance(sources, Path) else sources
        specs = normalise([SourceSpec(path)])
    else:
        specs = normalise(list(sources))
    located = [(spec, locate(spec.path, retry=retry)) for spec in specs]
    check_tokenizers(located)
    if len(located) > 1:
        kept = [(s, loc) for s, loc in located if split in loc.manifest.splits]
        for spec, _ in located:
            if all(spec is not s for s, _ in kept):
                log.info("data source %r has no %s split: left out of it", spec.name, split)
        located = kept or located[:1]  # none has it: the first raises below
        total = sum(s.weight for s, _ in located)
        located = [(SourceSpec(s.path, s.weight / total, s.name), loc) for s, loc in located]
    readers = [Source(loc, split, seed=seed, shuffle=shuffle, retry=retry) for _, loc in located]
    return [s for s, _ in located], readers


def _upgrade(state: dict[str, Any], stream: TokenStream) -> dict[str, Any]:
    """A state of an older version, in this version's terms (version 2: one source)."""
    version = state.get("version")
    if version == STATE_VERSION:
        return state
    if version == 2 and len(stream.sources) == 1 and isinstance(state.get("window"), int):
        spec = stream.specs[0]
        one = {"data": state.get("data"), "weight": 1.0, "windows": state["window"]}
        return {**state, "version": STATE_VERSION, "sources": {spec.name: one}}
    raise DataError(
        f"data stream state version {version!r} is not supported "
        f"(this code reads version {STATE_VERSION})"
    )


def _match_sources(state: dict[str, Any], mine: dict[str, Any], window: int) -> np.ndarray:
    """Windows drawn per source (in this stream's order), matched to the saved sources by data."""
    saved = state.get("sources")
    if not isinstance(saved, dict):
        raise DataError("data stream state has no per-source positions")
    by_data = {v.get("data"): v for v in saved.values() if isinstance(v, dict)}
    here = mine["sources"]
    if set(by_data) != {v["data"] for v in here.values()}:
        raise DataError(
            "data stream state was saved for other prepared data (its sources' manifests "
            f"differ: saved {sorted(saved)}, now {sorted(here)}): resume with the same data"
        )
    drawn = []
    for name, info in here.items():
        windows = by_data[info["data"]].get("windows")
        if not isinstance(windows, int) or isinstance(windows, bool) or windows < 0:
            raise DataError(f"data stream state position of source {name!r} is invalid")
        weight = by_data[info["data"]].get("weight")
        if weight is not None and abs(weight - info["weight"]) > 1e-12:
            log.info("data source %r: weight %.4g on resume (was %.4g)", name, info["weight"],
                     weight)  # fmt: skip
        drawn.append(windows)
    if sum(drawn) != window:
        raise DataError(
            f"data stream state is inconsistent: its sources gave {sum(drawn)} windows, "
            f"its position is window {window}"
        )
    return np.array(drawn, dtype=np.int64)
