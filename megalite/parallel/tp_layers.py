"""Tensor-parallel modules that replace the plain model's layers (see `parallelize.apply_tp`).

Every sharded parameter carries a `tp_shard` (how its full tensor is cut) and DeepSpeed's
`tensor_model_parallel` flag (it then counts the shard in the global gradient norm on every TP
rank; unflagged parameters, replicated over TP, are counted on TP rank 0 only).

The collectives at the edges of a TP region (attention, MLP, head) are not in these layers: one
entry/exit pair wraps the whole region, so q, k and v share one all-reduce (or all-gather).
"""

from __future__ import annotations

from typing import Protocol, TypeVar, cast

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from megalite.model import ops
from megalite.model.llama import RMSNorm
from megalite.parallel.placement import TPShard
from megalite.parallel.tensor import (
    reduce_from_tp,
    reduce_scatter_seq,
    sync_grad,
    vocab_parallel_embedding,
)


class _MarkedWeight(Protocol):
    """A sharded parameter's tags (`mark`)."""

    tp_shard: TPShard
    tensor_model_parallel: bool


_Layer = TypeVar("_Layer", bound=nn.Module)


def mark(layer: _Layer, shard: TPShard, *, counted: bool = True) -> _Layer:
    """Record on `layer.weight` how it is cut (`tp_shard`) and whether DeepSpeed counts it in
    the gradient norm on every TP rank (`tensor_model_parallel`)."""
    weight = cast(_MarkedWeight, layer.weight)
    weight.tp_shard = shard
    weight.tensor_model_parallel = counted
    return layer


class ShardedLinear(nn.Linear):
    """A bias-free linear layer over a shard of the full weight; optionally the gradient of the
    weight is summed over `grad_group` (kv projections replicated over TP ranks)."""

    def __init__(self, weight: torch.Tensor, *, grad_group: dist.ProcessGroup | None = None):
        super().__init__(weight.shape[1], weight.shape[0], bias=False, device="meta")
        self.weight = nn.Parameter(weight)
        self.grad_group = grad_group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, sync_grad(self.weight, self.grad_group))


class ParallelSwiGLU(nn.Module):
    """SwiGLU with the gate and up projections fused into one column-parallel matmul (`w13`:
    this rank's gate rows, then its up rows) and a row-parallel down projection (`w2`) whose
    output is a partial sum over TP."""

    def __init__(self, w13: torch.Tensor, w2: torch.Tensor) -> None:
        super().__init__()
        self.w13 = ShardedLinear(w13)
        self.w2 = ShardedLinear(w2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w13(x).chunk(2, dim=-1)  # (b, s, ffn/tp) each
        return self.w2(ops.swiglu(gate, up))  # (b, s, dim), partial over TP


class VocabParallelEmbedding(nn.Module):
    """Embedding over this rank's slice of the (padded) vocabulary; the partial lookups are summed
    over TP, or reduce-scattered along the sequence with sequence parallelism."""

    def __init__(
        self,
        weight: torch.Tensor,
        *,
        vocab_start: int,
        group: dist.ProcessGroup,
        sequence_parallel: bool,
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight)  # (vocab_padded / tp, dim)
        self.vocab_start = vocab_start
        self.group = group
        self.sequence_parallel = sequence_parallel

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        partial = vocab_parallel_embedding(tokens, self.weight, vocab_start=self.vocab_start)
        if self.sequence_parallel:
            return reduce_scatter_seq(partial, self.group)  # (b, s / tp, dim)
        return reduce_from_tp(partial, self.group)  # (b, s, dim)


class SequenceParallelRMSNorm(RMSNorm):
    """RMSNorm over a sequence shard: each rank sees part of the tokens, so the gain's gradient is
    summed over TP to equal the unsharded one."""

    def __init__(self, norm: RMSNorm, group: dist.ProcessGroup) -> None:
        super().__init__(norm.weight.shape[0], eps=norm.eps)
        self.weight = norm.weight
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(x, sync_grad(self.weight, self.group), self.eps)
