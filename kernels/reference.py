"""The torch reference of every kernel in this package: one per op, the numerical contract.

Each Triton kernel here is tested against the function of the same name in this module, and the
model's op dispatch falls back to the same function when Triton is not chosen, so the kernel and
the fallback can never drift apart. This module imports torch only (never triton), so importing
it never fails for lack of triton; nothing in this package imports the model (kernels are the
lowest layer).

- `rms_norm`: Hugging Face's LlamaRMSNorm; `add_rms_norm` after a residual add
  (`rmsnorm.rms_norm`, with and without `residual=`).
- `rotate_half`, `apply_rotary`: Hugging Face's rotate-half RoPE of one tensor; `apply_rotary_qk`
  of q and k (`rotary.apply_rotary_qk`).
- `swiglu`: silu(gate) * up (`swiglu.swiglu`).
- `cross_entropy`: the mean loss in fp32 over the whole vocabulary, or over a vocab-parallel
  shard with two small all-reduces instead of gathering the logits (`cross_entropy.cross_entropy`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / rms(x) * weight over the last dim.

    Normalised in fp32 and cast back to x's dtype before the weight multiplies it, the order of
    Hugging Face's LlamaRMSNorm, so a converted checkpoint reproduces its outputs bit for bit.
    """
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)  # (..., dim)
    return weight * normed.to(x.dtype)  # (..., dim)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(h), h) for h = x + residual: the fused kernel's `residual=` form."""
    h = x + residual  # (..., dim)
    return rms_norm(h, weight, eps), h


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)  # (..., d/2) each
    return torch.cat((-x2, x1), dim=-1)  # (..., d)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (b, heads, s, head_dim) by position: x*cos + rotate_half(x)*sin, in x's dtype
    (Hugging Face's rotate-half layout; the tables (s, head_dim) are cast to x's dtype first)."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)  # (s, head_dim)
    return x * cos + rotate_half(x) * sin  # (b, heads, s, head_dim)


def apply_rotary_qk(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """`apply_rotary` of q (b, n_heads, s, hd) and of k (b, n_kv_heads, s, hd)."""
    return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, the model's MLP before its down projection."""
    return F.silu(gate) * up


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


def cross_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    ignore_index: int = -100,
    group: dist.ProcessGroup | None = None,
    vocab_start: int = 0,
    vocab_size: int | None = None,
) -> torch.Tensor:
    """Mean cross-entropy over targets != ignore_index, in fp32 (a bf16 log-softmax over a large
    vocabulary loses the precision the loss is read at), of logits (..., v_local) against int
    targets (...). Materialises fp32 logits: a reference, not a kernel for large shapes.

    group None: logits hold the whole vocabulary (F.cross_entropy; every row ignored gives nan).
    Otherwise they are this rank's shard of it, global columns [vocab_start, vocab_start +
    v_local), and the loss (identical on every rank of `group`) is that of the unsharded logits,
    the gradient this shard's; vocab_size: the real vocabulary size when the last shards carry
    padding columns (default: no padding). Every row ignored gives 0 here (Megatron's choice).
    """
    v_local = logits.shape[-1]
    if group is None:
        return F.cross_entropy(
            logits.float().reshape(-1, v_local),  # (n, vocab)
            targets.reshape(-1),  # (n,)
            ignore_index=ignore_index,
        )
    return _VocabParallelCrossEntropy.apply(
        logits.float().reshape(-1, v_local),  # (n, v_local)
        targets.reshape(-1),  # (n,)
        vocab_start,
        vocab_start + v_local if vocab_size is None else vocab_size,
        ignore_index,
        group,
    )
