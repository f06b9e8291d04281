"""Tensor-parallel primitives: autograd functions whose forward and backward are paired collectives.

Megatron's pairs, over one TP process group (passed explicitly, never global):

    copy_to_tp          forward: identity                  backward: all-reduce
    reduce_from_tp      forward: all-reduce                backward: identity
    gather_seq          forward: all-gather along dim 1    backward: reduce-scatter along dim 1
    reduce_scatter_seq  forward: reduce-scatter along dim 1  backward: all-gather along dim 1
    sync_grad           forward: identity (on a weight)    backward: all-reduce of its gradient

Activations are (b, s, h); sequence parallelism shards dim 1. Every function is a no-op for a group
of one, so a tp=1 model takes no collective at all.

Also here: the vocab-parallel embedding lookup. The vocab-parallel cross-entropy, which never
gathers full logits, is `megalite.model.ops.cross_entropy` given the TP group (that is where the
Triton kernel or the torch reference is chosen).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

SEQ_DIM = 1


def _size(group: dist.ProcessGroup) -> int:
    return dist.get_world_size(group)


def _all_reduce(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    x = x.contiguous()
    dist.all_reduce(x, group=group)
    return x


def _all_gather_seq(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=SEQ_DIM)  # (b, s * tp, h)


def _reduce_scatter_seq(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    n = _size(group)
    if x.shape[SEQ_DIM] % n:
        raise ValueError(f"sequence length {x.shape[SEQ_DIM]} is not divisible by tp={n}")
    parts = [p.contiguous() for p in x.chunk(n, dim=SEQ_DIM)]
    out = torch.empty_like(parts[0])
    dist.reduce_scatter(out, parts, group=group)
    return out  # (b, s / tp, h)


def _identity(x: torch.Tensor, _group: dist.ProcessGroup) -> torch.Tensor:
    return x


def _paired(
    forward: Callable[[torch.Tensor, dist.ProcessGroup], torch.Tensor],
    backward: Callable[[torch.Tensor, dist.ProcessGroup], torch.Tensor],
) -> type[torch.autograd.Function]:
    """An autograd function that runs `forward` on its input and `backward` on its gradient,
    both over the group it is applied with."""

    class Paired(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
            ctx.group = group
            return forward(x, group)

        @staticmethod
        def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
            return backward(grad, ctx.group), None

    Paired.__name__ = Paired.__qualname__ = f"Paired_{forward.__name__}_{backward.__name__}"
    return Paired


_CopyToTP = _paired(_identity, _all_reduce)
_ReduceFromTP = _paired(_all_reduce, _identity)
_GatherSeq = _paired(_all_gather_seq, _reduce_scatter_seq)
_ReduceScatterSeq = _paired(_reduce_scatter_seq, _all_gather_seq)


def copy_to_tp(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    return x if _size(group) == 1 else _CopyToTP.apply(x, group)


def reduce_from_tp(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    return x if _size(group) == 1 else _ReduceFromTP.apply(x, group)


def gather_seq(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    return x if _size(group) == 1 else _GatherSeq.apply(x, group)


def reduce_scatter_seq(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    return x if _size(group) == 1 else _ReduceScatterSeq.apply(x, group)


def sync_grad(weight: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Use a weight replicated over `group` whose ranks each see part of its inputs: the gradient
    is summed over the group (sequence-parallel norms, kv heads replicated over TP ranks)."""
    if group is None or _size(group) == 1:
        return weight
    return _CopyToTP.apply(weight, group)


# ---- vocabulary-parallel embedding -----------------------------------------------------------


def vocab_parallel_embedding(
    tokens: torch.Tensor, weight: torch.Tensor, *, vocab_start: int
) -> torch.Tensor:
    """Look up the tokens this rank's vocabulary slice owns; zeros for the others.

    tokens (b, s) int64, weight (vocab / tp, h) → partial embeddings (b, s, h), summed over TP.
    """
    local = tokens - vocab_start
    owned = (local >= 0) & (local < weight.shape[0])  # (b, s)
    out = nn.functional.embedding(local.clamp(0, weight.shape[0] - 1), weight)  # (b, s, h)
    return out * owned.unsqueeze(-1).to(out.dtype)
