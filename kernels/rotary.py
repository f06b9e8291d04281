"""Rotary position embedding of q and k in one Triton kernel, forward and backward.

The contract is `reference.apply_rotary_qk`, `apply_rotary` applied to q and to k: Hugging Face's
rotate-half layout, x * cos + rotate_half(x) * sin, with the cos/sin tables (s, head_dim) rounded
to x's dtype first. The products and the sum are computed in fp32 and rounded once (the reference
rounds after each op in bf16, a difference of an ulp). q (b, n_heads, s, head_dim) and
k (b, n_kv_heads, s, head_dim) may have different head counts (grouped-query attention).

One program per (batch, position) loads that position's cos/sin once and rotates every head of q
and of k: two (heads, head_dim / 2) tiles, masked for head counts and head_dims that are not
powers of two. Any strides over (b, heads, s) are read and written as they are (the model's q is a
transposed view of the projection, (b, s, heads, head_dim) in memory), so nothing is copied unless
the last dim is strided; outputs take the input's layout (`torch.empty_like`).

The rotation is orthogonal, so the backward is the same kernel with the transposed rotation:
rotate_half's transpose maps (g1, g2) to (g2, -g1), i.e. sin's halves swapped and negated. The
tables get no gradient (they are buffers); passing tables that require one is refused.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from megalite.kernels._common import cast

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _table(ptr, mask, dtype: tl.constexpr):
    """A cos/sin half-row as fp32, rounded through `dtype` first as the reference casts it."""
    return cast(tl.load(ptr, mask=mask, other=0.0).to(tl.float32), dtype).to(tl.float32)


@triton.jit
def _rotate_heads(
    x_ptr,  # this (batch, position)'s heads: (n_heads, 2 * HALF), heads x_head_stride apart
    out_ptr,  # the same for the output
    x_head_stride,
    out_head_stride,
    n_heads,
    cos1,  # (1, BLOCK_HALF) fp32: cos for the first half of head_dim
    cos2,
    sin1,
    sin2,
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    heads = tl.arange(0, BLOCK_H)[:, None].to(tl.int64)  # (BLOCK_H, 1); long: heads * stride
    cols = tl.arange(0, BLOCK_HALF)[None, :]  # (1, BLOCK_HALF)
    mask = (heads < n_heads) & (cols < HALF)
    x_offs = heads * x_head_stride + cols
    x1 = tl.load(x_ptr + x_offs, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + x_offs + HALF, mask=mask, other=0.0).to(tl.float32)
    # (x1, x2) * cos + (-x2, x1) * sin
    o1 = x1 * cos1 - x2 * sin1
    o2 = x2 * cos2 + x1 * sin2
    out_offs = heads * out_head_stride + cols
    tl.store(out_ptr + out_offs, cast(o1, out_ptr.dtype.element_ty), mask=mask)
    tl.store(out_ptr + out_offs + HALF, cast(o2, out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_kernel(
    q_ptr,  # (b, n_q_heads, s, 2 * HALF), any strides but the last dim's, which is 1
    k_ptr,  # (b, n_k_heads, s, 2 * HALF)
    q_out_ptr,  # like q, own strides
    k_out_ptr,  # like k, own strides
    cos_ptr,  # (s, 2 * HALF), rows cos_row_stride apart, any float dtype
    sin_ptr,  # (s, 2 * HALF), rows sin_row_stride apart
    seq_len,
    q_sb, q_sh, q_ss,
    k_sb, k_sh, k_ss,
    qo_sb, qo_sh, qo_ss,
    ko_sb, ko_sh, ko_ss,
    cos_row_stride,
    sin_row_stride,
    n_q_heads,
    n_k_heads,
    HALF: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    BLOCK_HQ: tl.constexpr,
    BLOCK_HK: tl.constexpr,
    BACKWARD: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0).to(tl.int64)  # int64: offsets pass 2**31 at training sizes
    b = pid // seq_len
    pos = pid % seq_len
    cols = tl.arange(0, BLOCK_HALF)[None, :]  # (1, BLOCK_HALF)
    cmask = cols < HALF
    dtype = q_ptr.dtype.element_ty
    cos_row = cos_ptr + pos * cos_row_stride
    sin_row = sin_ptr + pos * sin_row_stride
    # The tables are rounded to the activations' dtype first, as the reference casts them.
    cos1 = _table(cos_row + cols, cmask, dtype)
    cos2 = _table(cos_row + cols + HALF, cmask, dtype)
    sin1 = _table(sin_row + cols, cmask, dtype)
    sin2 = _table(sin_row + cols + HALF, cmask, dtype)
    if BACKWARD:  # the transposed rotation: sin's halves swapped and negated
        sin1, sin2 = -sin2, -sin1
    _rotate_heads(
        q_ptr + b * q_sb + pos * q_ss, q_out_ptr + b * qo_sb + pos * qo_ss, q_sh, qo_sh,
        n_q_heads, cos1, cos2, sin1, sin2, HALF, BLOCK_HQ, BLOCK_HALF,
    )  # fmt: skip
    _rotate_heads(
        k_ptr + b * k_sb + pos * k_ss, k_out_ptr + b * ko_sb + pos * ko_ss, k_sh, ko_sh,
        n_k_heads, cos1, cos2, sin1, sin2, HALF, BLOCK_HK, BLOCK_HALF,
    )  # fmt: skip


def _alloc_like(t: torch.Tensor) -> torch.Tensor:
    """Uninitialised output in t's layout (the kernel writes every element; tests poison this)."""
    return torch.empty_like(t)


def _last_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _rotate(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, backward: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    q, k = _last_contiguous(q), _last_contiguous(k)
    q_out, k_out = _alloc_like(q), _alloc_like(k)
    b, n_q_heads, s, head_dim = q.shape
    n_k_heads = k.shape[1]
    half = head_dim // 2
    if b * s:
        block_half = triton.next_power_of_2(half)
        block_hq, block_hk = triton.next_power_of_2(n_q_heads), triton.next_power_of_2(n_k_heads)
        tile = max(block_hq, block_hk) * block_half  # elements per half of the larger tile
        num_warps = 1 if tile <= 256 else 2 if tile <= 1024 else 4 if tile <= 4096 else 8
        _rotary_kernel[(b * s,)](
            q, k, q_out, k_out, cos, sin, s,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            q_out.stride(0), q_out.stride(1), q_out.stride(2),
            k_out.stride(0), k_out.stride(1), k_out.stride(2),
            cos.stride(0), sin.stride(0), n_q_heads, n_k_heads,
            HALF=half, BLOCK_HALF=block_half, BLOCK_HQ=block_hq, BLOCK_HK=block_hk,
            BACKWARD=backward, num_warps=num_warps,
        )  # fmt: skip
    return q_out, k_out


class _RotaryQK(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        q: torch.Tensor,  # (b, n_heads, s, head_dim)
        k: torch.Tensor,  # (b, n_kv_heads, s, head_dim)
        cos: torch.Tensor,  # (s, head_dim)
        sin: torch.Tensor,  # (s, head_dim)
    ) -> tuple[torch.Tensor, torch.Tensor]:
        ctx.save_for_backward(cos, sin)
        return _rotate(q, k, cos, sin, backward=False)

    @staticmethod
    def backward(ctx, dq_out: torch.Tensor, dk_out: torch.Tensor):
        cos, sin = ctx.saved_tensors
        dq, dk = _rotate(dq_out, dk_out, cos, sin, backward=True)
        return dq, dk, None, None


def _check(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    if q.dtype not in DTYPES or k.dtype != q.dtype:
        raise TypeError(f"apply_rotary_qk takes q and k of one dtype in {DTYPES}")
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must be (b, heads, s, hd)")
    b, _, s, head_dim = q.shape
    if (k.shape[0], k.shape[2], k.shape[3]) != (b, s, head_dim) or head_dim % 2:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} do not match (even hd)")
    if cos.shape != (s, head_dim) or sin.shape != (s, head_dim):
        raise ValueError(f"cos/sin must be ({s}, {head_dim}), got {cos.shape} and {sin.shape}")
    if torch.is_grad_enabled() and (cos.requires_grad or sin.requires_grad):
        raise ValueError("apply_rotary_qk gives cos/sin no gradient; pass detached tables")


def apply_rotary_qk(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)) in one kernel.

    q (b, n_heads, s, head_dim), k (b, n_kv_heads, s, head_dim), one dtype (fp32, bf16, fp16);
    cos, sin (s, head_dim) in any float dtype, rounded to q's dtype. Outputs keep the inputs'
    layouts. Triton on CUDA, or on CPU tensors under TRITON_INTERPRET=1.
    """
    _check(q, k, cos, sin)
    return _RotaryQK.apply(q, k, _last_contiguous(cos), _last_contiguous(sin))
