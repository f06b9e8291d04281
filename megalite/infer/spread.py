"""A model spread over ranks as one decoder: what the trainer's samples and task scores run.

`SpreadDecoder` stands where `generate` and `MegaliteLM` take a plain `Llama`: called with tokens
(b, s) (and a `KVCache` to continue), it gives the full-vocabulary logits (b, s, vocab), the same
on every rank that calls it, whatever the layout of the module it wraps. Every rank of the group
that holds the model calls it in lockstep with the same tokens (the callers' requests and greedy
choices are then the same everywhere):

- tensor parallelism: each forward's vocabulary shards are gathered over TP (`full_vocab`);
- sequence parallelism: the TP layers take a sequence cut over the TP ranks, so each chunk is
  right-padded to a multiple of tp and the padding's logits dropped; causal attention keeps the
  padding out of every real position. With a cache the padding's keys are written past the real
  ones and the cache's length then set back, so that the next chunk (at least tp tokens) writes
  over them before any query can see them (`new_cache` leaves tp - 1 positions of room, and the
  padding's rotary positions are held inside the model's tables);
- ZeRO-3: the parameters are partitioned over DP and gathered by DeepSpeed's hooks module by
  module as the model's own forward runs (as in training: never the whole model at once), so
  every DP rank runs the same forwards; DP rank 0's logits are broadcast over DP, so that every
  rank takes the same tokens to the last bit;
- pipeline parallelism (pp > 1; ZeRO <= 1): the stage's own modules of the `PipelineModule` run
  in order outside DeepSpeed's schedule: stage 0 embeds, each stage runs its blocks (with its own
  blocks' cache) and sends the hidden states (this TP rank's, or its sequence shard) to the same
  TP rank of the next stage; the last one applies the final norm and the head, and its logits are
  broadcast over the pipeline, so that every stage (and global rank 0, which reports) has them.

Document masks (`data.document_mask`) are not applied: a prompt or a scored request is one
document, as in a single-process `generate` or `megalite-evaluate` of a checkpoint.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from megalite.config import ModelConfig
from megalite.model.llama import KVCache, Llama, TransformerBlock
from megalite.parallel.dims import ParallelDims


def full_vocab(
    logits: torch.Tensor, tp_group: dist.ProcessGroup, *, vocab_size: int
) -> torch.Tensor:
    """This TP rank's shard of the padded vocabulary's logits (..., padded / tp), gathered over
    `tp_group` into the full (..., vocab_size), padding cut: the same on every TP rank. Any
    leading shape: (b,) for a decoding step, (b, s) for a scored sequence. Collective."""
    parts = [torch.empty_like(logits) for _ in range(dist.get_world_size(tp_group))]
    dist.all_gather(parts, logits.contiguous(), group=tp_group)
    return torch.cat(parts, dim=-1)[..., :vocab_size]  # (..., vocab_size)


class _RoomyCache(KVCache):
    """A KVCache whose rotary positions stay inside the model's tables (`limit`): the padding a
    sequence-parallel chunk carries past the real tokens may reach beyond them."""

    def __init__(self, *, max_len: int, pad: torch.Tensor | None, limit: int) -> None:
        super().__init__(max_len=max_len, pad=pad)
        self.limit = limit

    def begin(self, b: int, s: int, device: torch.device) -> None:
        super().begin(b, s, device)
        assert self.positions is not None
        self.positions = self.positions.clamp(max=self.limit - 1)  # (b, s)


class SpreadDecoder:
    """`module` (this rank's model: a TP-sharded, maybe ZeRO-3-partitioned `Llama`, or its
    pipeline stage, a DeepSpeed `PipelineModule`) as a decoder of the full model (see the module
    docstring). Collective over the ranks that hold the model."""

    def __init__(
        self,
        module: nn.Module,
        dims: ParallelDims,
        *,
        cfg: ModelConfig,
        sequence_parallel: bool,
        zero3: bool,
    ) -> None:
        self.module, self.dims, self.cfg = module, dims, cfg
        self.multiple = dims.tp if sequence_parallel else 1  # what a chunk's length divides by
        self.zero3 = zero3 and dims.dp > 1
        param = next(module.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.stage: list[tuple[int, Any]] = []  # (index in the pipeline's layer list, forward)
        if dims.pp > 1:
            # The PipelineModule's bounds of each stage, and this stage's layers in order.
            parts: list[int] = getattr(module, "parts")  # noqa: B009
            funcs: list[Any] = getattr(module, "forward_funcs")  # noqa: B009
            self.stage = [(parts[dims.pp_rank] + i, f) for i, f in enumerate(funcs)]

    @property
    def num_parameters(self) -> int:
        """The full model's parameter count (from its shape, not this rank's shards)."""
        c = self.cfg
        kv = c.n_kv_heads * c.head_dim
        block = c.dim * (c.n_heads * c.head_dim) * 2 + c.dim * kv * 2 + 3 * c.dim * c.ffn_dim
        vocab = c.vocab_size * c.dim * (1 if c.tie_embeddings else 2)
        return c.n_layers * (block + 2 * c.dim) + vocab + c.dim

    def eval(self) -> None:
        self.module.eval()

    def train(self) -> None:
        self.module.train()

    def new_cache(self, *, max_len: int, pad: torch.Tensor | None) -> KVCache:
        """A cache for `max_len` positions, with room for a sequence-parallel chunk's padding."""
        return _RoomyCache(max_len=max_len + self.multiple - 1, pad=pad, limit=self.cfg.max_seq_len)

    @torch.no_grad()
    def __call__(self, tokens: torch.Tensor, *, cache: KVCache | None = None) -> torch.Tensor:
        """tokens (b, s) -> the full logits (b, s, vocab), the same on every rank that calls."""
        b, s = tokens.shape
        extra = -s % self.multiple
        if extra:
            tokens = torch.cat([tokens, tokens.new_zeros(b, extra)], dim=1)  # (b, s + extra)
        held = self._through_stages(tokens, cache) if self.stage else self._plain(tokens, cache)
        if cache is not None:
            cache.length -= extra  # the padding's keys are written over by the next chunk
        if held is not None:
            held = held[:, :s]  # (b, s, vocab / tp)
            if self.dims.tp > 1:
                held = full_vocab(held, self.dims.group("tp"), vocab_size=self.cfg.vocab_size)
        logits = self._from_last_stage(held, b, s) if self.stage else held
        assert logits is not None
        if self.zero3:
            logits = logits.contiguous()
            dist.broadcast(logits, src=self.dims.group_ranks["dp"][0], group=self.dims.group("dp"))
        return logits  # (b, s, vocab)

    def _plain(self, tokens: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
        """The whole model's own forward (under ZeRO-3 its hooks gather each module's weights)."""
        model = self.module
        assert isinstance(model, Llama)
        eod, model.document_eod = model.document_eod, None
        try:
            return model(tokens, cache=cache)  # (b, s, vocab / tp)
        finally:
            model.document_eod = eod

    def _through_stages(self, tokens: torch.Tensor, cache: KVCache | None) -> torch.Tensor | None:
        """This stage's layers on what the previous stage sent (stage 0: on the tokens); the
        hidden states sent on, or on the last stage the logits (b, s, vocab / tp)."""
        ranks, stage, n = self.dims.group_ranks["pp"], self.dims.pp_rank, self.cfg.n_layers
        b, s = tokens.shape
        if cache is not None:
            cache.begin(b, s, tokens.device)
        local = s // self.multiple  # a sequence shard under sequence parallelism
        h = torch.empty((b, local, self.cfg.dim), dtype=self.dtype, device=self.device)
        if stage > 0:
            dist.recv(h, src=ranks[stage - 1])
        for index, forward in self.stage:
            # The modules' own class forwards: the pipeline's wrappers (document masks,
            # activation checkpointing) take no cache. The head keeps its TP entry hook.
            if index == 0:
                h = type(forward).forward(forward, tokens)  # (b, s or s / tp, dim)
            elif index <= n:
                h = TransformerBlock.forward(forward, h, cache)
            elif index == n + 1:
                h = type(forward).forward(forward, h)
            else:
                h = forward(h)  # (b, s, vocab / tp): the head, or the tied embedding's
        if cache is not None:
            cache.end(s)
        if stage < self.dims.pp - 1:
            dist.send(h.contiguous(), dst=ranks[stage + 1])
            return None
        return h

    def _from_last_stage(self, logits: torch.Tensor | None, b: int, s: int) -> torch.Tensor:
        ranks = self.dims.group_ranks["pp"]
        if logits is None:
            shape = (b, s, self.cfg.vocab_size)
            logits = torch.empty(shape, dtype=self.dtype, device=self.device)
        logits = logits.contiguous()
        dist.broadcast(logits, src=ranks[-1], group=self.dims.group("pp"))
        return logits
