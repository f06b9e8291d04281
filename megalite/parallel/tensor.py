"""Tensor-parallel primitives: autograd functions whose forward and backward are paired collectives.

Megatron's pairs, over one TP process group (passed explicitly, never global):

    copy_to_tp          forward: identity                  backward: all-reduce
    reduce_from_tp      forward: all-reduce                backward: identity
    gather_seq          forward: all-gather along dim 1    backward: reduce-scatter along dim 1
    reduce_scatter_seq  forward: reduce-scatter along dim 1  backward: all-gather along dim 1
    sync_grad           forward: identity (on a weight)    backward: all-reduce of its gradient

Activations are (b, s, h); sequence parallelism shards dim 1. Every function is a no-op for a group
of one, so a tp=1 model takes no collective at all.

Also here: the vocab-parallel embedding lookup and cross-entropy, which never gather full logits.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from megalite.model import ops

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


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _all_reduce(grad, ctx.group), None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


class _GatherSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return _all_gather_seq(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _reduce_scatter_seq(grad, ctx.group), None


class _ReduceScatterSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return _reduce_scatter_seq(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _all_gather_seq(grad, ctx.group), None


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


# ---- vocabulary-parallel embedding and cross-entropy ---------------------------------------


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


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Cross-entropy of logits sharded over the vocabulary, with two small all-reduces (max and
    sum of exponentials, plus the target logit) instead of gathering (n, vocab) logits."""

    @staticmethod
    def forward(
        ctx,
        logits: torch.Tensor,  # (n, v_local) fp32
        targets: torch.Tensor,  # (n,)
        vocab_start: int,
        vocab_size: int,
        ignore_index: int,
        group: dist.ProcessGroup,
    ) -> torch.Tensor:
        v_local = logits.shape[-1]
        # Padding columns (beyond the real vocabulary) never take part.
        n_real = max(0, min(v_local, vocab_size - vocab_start))
        logits = logits.clone()
        logits[:, n_real:] = float("-inf")
        local_max = logits.max(dim=-1).values  # (n,)
        dist.all_reduce(local_max, op=dist.ReduceOp.MAX, group=group)
        shifted = logits - local_max.unsqueeze(-1)  # (n, v_local)
        exp = shifted.exp()
        sum_exp = exp.sum(dim=-1)  # (n,)
        valid = targets != ignore_index  # (n,)
        local_t = targets - vocab_start
        owned = valid & (local_t >= 0) & (local_t < v_local)
        idx = torch.where(owned, local_t, torch.zeros_like(local_t))
        target_logit = shifted.gather(1, idx.unsqueeze(1)).squeeze(1) * owned  # (n,)
        both = torch.stack([sum_exp, target_logit])  # (2, n): one all-reduce for both
        dist.all_reduce(both, group=group)
        sum_exp, target_logit = both[0], both[1]
        loss = (sum_exp.log() - target_logit) * valid  # (n,)
        count = valid.sum().clamp(min=1)
        ctx.save_for_backward(exp / sum_exp.unsqueeze(-1), idx, owned, valid, count)
        return loss.sum() / count

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        softmax, idx, owned, valid, count = ctx.saved_tensors
        g = softmax.clone()  # (n, v_local)
        rows = torch.arange(g.shape[0], device=g.device)
        g[rows, idx] -= owned.to(g.dtype)
        g *= (valid.to(g.dtype) * grad / count).unsqueeze(-1)
        return g, None, None, None, None, None


def vocab_parallel_cross_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    vocab_start: int,
    vocab_size: int,
    group: dist.ProcessGroup,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Mean cross-entropy (fp32) of vocab-sharded logits (..., v_local) against targets (...)."""
    if ops.use_triton(logits.device):  # chunked kernel: no fp32 copy of the logits
        from megalite.kernels.cross_entropy import cross_entropy as fused

        return fused(
            logits,
            targets,
            ignore_index=ignore_index,
            group=group,
            vocab_start=vocab_start,
            vocab_size=vocab_size,
        )
    v_local = logits.shape[-1]
    return _VocabParallelCrossEntropy.apply(
        logits.float().reshape(-1, v_local),
        targets.reshape(-1),
        vocab_start,
        vocab_size,
        ignore_index,
        group,
    )
