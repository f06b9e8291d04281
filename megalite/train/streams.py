"""This rank's token streams: the training loader and the validation stream, from the config."""

from __future__ import annotations

import functools

import torch

from megalite.config import Config
from megalite.data.loader import Loader
from megalite.data.mixture import SourceSpec
from megalite.data.shards import Retry
from megalite.data.stream import TokenStream
from megalite.parallel.dims import ParallelDims


def rank_stream(
    cfg: Config, dims: ParallelDims, sources: list[SourceSpec], split: str, *, shuffle: bool
) -> functools.partial[TokenStream]:
    """A factory of this rank's stream of `split` of `sources` (picklable, for loader workers)."""
    t, d = cfg.trainer, cfg.data
    return functools.partial(
        TokenStream,
        sources,
        split,
        seq_len=t.seq_len,
        micro_batch_size=t.micro_batch_size,
        dp_rank=dims.dp_rank,
        dp_size=dims.dp,
        seed=t.seed,
        shuffle=shuffle,
        retry=Retry(attempts=d.read_attempts, delay_s=d.retry_delay_s),
    )


def train_loader(
    cfg: Config, dims: ParallelDims, sources: list[SourceSpec], device: torch.device
) -> Loader:
    """The training stream, read ahead by `data.workers` processes."""
    return Loader(
        rank_stream(cfg, dims, sources, "train", shuffle=cfg.data.shuffle),
        workers=cfg.data.workers,
        prefetch=cfg.data.prefetch,
        pin_memory=device.type == "cuda",
    )
