"""Cross-entropy over the vocabulary in chunks, on one device or on a vocab-parallel shard.

The head's logits are the largest activation of a language model (16k tokens x 128k vocabulary is
4 GiB in bf16, 8 GiB in fp32), and the plain loss upcasts them to fp32 and keeps a softmax of that
size for the backward. Here neither is ever materialised:

- forward: one program per row streams the row's logits in chunks of BLOCK_V, keeping an online
  max and sum of exponentials in fp32, and writes three fp32 numbers per row: the max, the sum of
  exp(logit - max) and the target's logit (zero where the target is not in this shard);
- vocab-parallel: the per-row statistics are combined over the TP group as
  `reference.cross_entropy` combines them (an all-reduce MAX of the max, then one all-reduce SUM
  of the rescaled sum-exp and the target logit), so (n,)-sized messages only;
- backward: only the logits (in their own dtype), the targets and one fp32 log-sum-exp per row are
  saved; the kernel recomputes softmax chunk by chunk and writes (softmax - onehot) * grad / n_valid
  in the logits' dtype, zero for ignored rows and for padding columns.

The contract is `reference.cross_entropy`: the mean over rows whose target != ignore_index,
computed in fp32 (F.cross_entropy on one device). With every row ignored the loss is nan (0 / 0)
and the gradient is zero, as F.cross_entropy (the vocab-parallel reference returns 0 there).

Padding: the TP head pads the vocabulary to a multiple of tp; columns at global index >=
`vocab_size` take no part (their gradient is zero). Targets must lie in [0, vocab_size) or equal
ignore_index; nothing checks this on the device.

`cross_entropy` runs the Triton kernels (CUDA, or CPU tensors under TRITON_INTERPRET=1).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import triton
import triton.language as tl

DEFAULT_BLOCK_V = 4096
NUM_WARPS = 8
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _ce_forward_kernel(
    logits_ptr,  # (n, v_local), last dim contiguous
    targets_ptr,  # (n,) int64
    max_ptr,  # (n,) fp32 out
    sum_exp_ptr,  # (n,) fp32 out
    target_logit_ptr,  # (n,) fp32 out
    row_stride,
    n_real,  # columns of this shard inside the real vocabulary; the rest is padding
    vocab_start,
    ignore_index,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # int64: n * v_local passes 2**31 at training sizes
    row_ptr = logits_ptr + row * row_stride
    cols = tl.arange(0, BLOCK_V)
    m = tl.full((), float("-inf"), tl.float32)
    s = tl.zeros((), tl.float32)
    # Only chunks holding at least one real column: each has a finite max (for finite logits), so
    # exp(m - m_new) is never exp(-inf + inf). A shard of padding only keeps m = -inf, s = 0.
    for start in range(0, n_real, BLOCK_V):
        idx = start + cols
        x = tl.load(row_ptr + idx, mask=idx < n_real, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
    target = tl.load(targets_ptr + row)
    local = target - vocab_start
    owned = (target != ignore_index) & (local >= 0) & (local < n_real)
    t = tl.load(row_ptr + tl.where(owned, local, 0), mask=owned, other=0.0).to(tl.float32)
    tl.store(max_ptr + row, m)
    tl.store(sum_exp_ptr + row, s)
    tl.store(target_logit_ptr + row, t)


@triton.jit
def _ce_backward_kernel(
    logits_ptr,  # (n, v_local), last dim contiguous
    grad_ptr,  # (n, v_local) contiguous out, logits' dtype
    targets_ptr,  # (n,) int64
    lse_ptr,  # (n,) fp32: log-sum-exp over the whole (unsharded) vocabulary
    coef_ptr,  # () fp32: upstream grad / n_valid
    row_stride,
    v_local,
    n_real,
    vocab_start,
    ignore_index,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * row_stride
    out_ptr = grad_ptr + row * v_local
    cols = tl.arange(0, BLOCK_V)
    target = tl.load(targets_ptr + row)
    valid = target != ignore_index
    local = target - vocab_start
    local = tl.where(valid & (local >= 0) & (local < n_real), local, -1)  # -1: not in this shard
    lse = tl.load(lse_ptr + row)
    coef = tl.where(valid, tl.load(coef_ptr), 0.0)  # upstream grad / n_valid: inf if n_valid = 0
    n_read = tl.where(valid, n_real, 0)  # ignored rows and padding columns read nothing
    for start in range(0, v_local, BLOCK_V):
        idx = start + cols
        x = tl.load(row_ptr + idx, mask=idx < n_read, other=float("-inf"))  # exp(-inf) = 0
        p = tl.exp(x.to(tl.float32) - lse)
        g = (p - tl.where(idx == local, 1.0, 0.0)) * coef
        g = tl.where(valid, g, 0.0)  # exactly zero, even where an ignored row's lse is not finite
        tl.store(out_ptr + idx, g.to(grad_ptr.dtype.element_ty), mask=idx < v_local)


def _alloc(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Uninitialised output storage (the kernels write every element; tests poison this)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _block(v: int, block_v: int | None) -> int:
    block = block_v or min(DEFAULT_BLOCK_V, triton.next_power_of_2(max(v, 16)))
    if block & (block - 1):
        raise ValueError(f"block_v must be a power of two, got {block}")
    return block


# ---- per-row statistics and gradient ---------------------------------------------------------


def _row_stats(
    logits: torch.Tensor, targets: torch.Tensor, *, vocab_start: int, n_real: int,
    ignore_index: int, block_v: int | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """(max, sum of exp(logit - max), target logit or 0), each (n,) fp32, over this shard."""
    n, v_local = logits.shape
    stats = _alloc((3, n), torch.float32, logits.device)
    if n:
        _ce_forward_kernel[(n,)](
            logits, targets, stats[0], stats[1], stats[2], logits.stride(0), n_real, vocab_start,
            ignore_index, BLOCK_V=_block(v_local, block_v), num_warps=NUM_WARPS,
        )  # fmt: skip
    return stats[0], stats[1], stats[2]


def _grad(
    logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor, coef: torch.Tensor, *,
    vocab_start: int, n_real: int, ignore_index: int, block_v: int | None,
) -> torch.Tensor:  # fmt: skip
    n, v_local = logits.shape
    grad = _alloc((n, v_local), logits.dtype, logits.device)
    if n:
        _ce_backward_kernel[(n,)](
            logits, grad, targets, lse, coef, logits.stride(0), v_local, n_real, vocab_start,
            ignore_index, BLOCK_V=_block(v_local, block_v), num_warps=NUM_WARPS,
        )  # fmt: skip
    return grad  # (n, v_local)


# ---- autograd wrapper ------------------------------------------------------------------------


def _combine(
    m: torch.Tensor, s: torch.Tensor, t: torch.Tensor, group: dist.ProcessGroup | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (log-sum-exp, target logit) over the whole vocabulary from each shard's statistics:
    the global max, then each shard's sum-exp rescaled to it and summed (one all-reduce for both
    sum-exp and target logit, which exactly one shard holds)."""
    if group is not None and dist.get_world_size(group) > 1:
        m_all = m.clone()
        dist.all_reduce(m_all, op=dist.ReduceOp.MAX, group=group)
        both = torch.stack([s * (m - m_all).exp(), t])  # (2, n)
        dist.all_reduce(both, group=group)
        m, s, t = m_all, both[0], both[1]
    return m + s.log(), t


class _CrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        logits: torch.Tensor,  # (n, v_local)
        targets: torch.Tensor,  # (n,) int64
        vocab_start: int,
        n_real: int,
        ignore_index: int,
        group: dist.ProcessGroup | None,
        block_v: int | None,
    ) -> torch.Tensor:
        kw = dict(vocab_start=vocab_start, n_real=n_real, ignore_index=ignore_index)
        m, s, t = _row_stats(logits, targets, block_v=block_v, **kw)  # (n,) fp32 each
        lse, t = _combine(m, s, t, group)  # (n,)
        valid = targets != ignore_index  # (n,)
        n_valid = valid.sum()
        loss = torch.where(valid, lse - t, 0.0).sum() / n_valid  # nan if no row is valid
        ctx.save_for_backward(logits, targets, lse, n_valid)
        ctx.kw, ctx.block_v = kw, block_v
        return loss

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        logits, targets, lse, n_valid = ctx.saved_tensors
        coef = (grad.float() / n_valid).contiguous()  # () fp32, stays on the device: no sync
        g = _grad(logits, targets, lse, coef, block_v=ctx.block_v, **ctx.kw)
        return g, None, None, None, None, None, None


def cross_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    ignore_index: int = -100,
    group: dist.ProcessGroup | None = None,
    vocab_start: int = 0,
    vocab_size: int | None = None,
    block_v: int | None = None,
) -> torch.Tensor:
    """Mean cross-entropy (fp32 scalar) of logits (..., v_local) against int targets (...).

    group None: logits hold the whole vocabulary. Otherwise they are this rank's shard of it,
    global columns [vocab_start, vocab_start + v_local), and the loss (identical on every rank of
    `group`) is that of the unsharded logits; the gradient is this shard's. vocab_size: the real
    vocabulary size, when the last shards carry padding columns (default: no padding).
    logits fp32, bf16 or fp16; statistics in fp32; the gradient has the logits' dtype.
    block_v: the chunk of the vocabulary one step of a program reads (a power of two).
    """
    if logits.dtype not in DTYPES:
        raise TypeError(f"cross_entropy takes {DTYPES} logits, got {logits.dtype}")
    v_local = logits.shape[-1]
    if targets.shape != logits.shape[:-1]:
        raise ValueError(f"targets {tuple(targets.shape)} do not match logits {logits.shape}")
    vocab_size = vocab_start + v_local if vocab_size is None else vocab_size
    n_real = max(0, min(v_local, vocab_size - vocab_start))
    flat = logits.reshape(-1, v_local)  # (n, v_local)
    if flat.stride(-1) != 1:
        flat = flat.contiguous()
    return _CrossEntropy.apply(
        flat, targets.reshape(-1).long().contiguous(), vocab_start, n_real, ignore_index, group,
        block_v,
    )  # fmt: skip
