"""RMSNorm over the last dim as Triton kernels, optionally fused with the residual add before it.

The contract is `reference.rms_norm`, Hugging Face's LlamaRMSNorm: normalise in fp32, round the
normalised row to the input's dtype, then multiply by the weight (the output has the promoted
dtype of input and weight, as the torch product does). With `residual`, the row normalised is
h = x + residual, rounded to x's dtype exactly as the torch add rounds it, and h is returned as
well: a pre-norm block's `h = x + attn(...)` then `mlp_norm(h)` in one pass over memory. h's
gradient is then the sum of the norm's and the residual stream's, and it is the gradient of both
x and residual.

- forward: one program per row holds the whole row in registers (BLOCK_N, the next power of two
  of the hidden size, masked), writes y (and h) and the row's fp32 1/rms, the only statistic the
  backward needs.
- backward: persistent programs (about RESIDENT_WARPS_PER_SM warps' worth per SM) each take a
  contiguous block of rows, write dx per row and accumulate that block's dweight in fp32
  registers; the (programs, dim) fp32 partials are summed by torch and cast to the weight's dtype
  once.

Inputs may have any leading shape and row stride; only the last dim must be contiguous (a copy is
made otherwise). Outputs are new contiguous tensors from `_alloc`, which tests poison.
"""

from __future__ import annotations

import functools
from typing import overload

import torch
import triton
import triton.language as tl

from megalite.kernels._common import cast

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_BLOCK_N = 32768  # a row lives in registers: larger hidden sizes need a looped kernel
RESIDENT_WARPS_PER_SM = 32  # backward occupancy target (H100: 64 warps per SM at most)


@triton.jit
def _rms_norm_fwd_kernel(
    x_ptr,  # (m, n), rows x_row_stride apart, last dim contiguous
    res_ptr,  # (m, n) like x, read only if HAS_RESIDUAL
    w_ptr,  # (n,)
    y_ptr,  # (m, n) contiguous out, promoted dtype of x and w
    h_ptr,  # (m, n) contiguous out, x's dtype: x + residual, written only if HAS_RESIDUAL
    rstd_ptr,  # (m,) fp32 out
    x_row_stride,
    res_row_stride,
    n_cols,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # int64: m * n passes 2**31 at training sizes
    cols = tl.arange(0, BLOCK_N)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * x_row_stride + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * res_row_stride + cols, mask=mask, other=0.0)
        x = cast(x.to(tl.float32) + r.to(tl.float32), x_ptr.dtype.element_ty)  # as torch rounds
        tl.store(h_ptr + row * n_cols + cols, x, mask=mask)
    x32 = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x32 * x32, axis=0) / n_cols + eps)
    normed = cast(x32 * rstd, x_ptr.dtype.element_ty).to(tl.float32)  # HF rounds before the weight
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * n_cols + cols, cast(normed * w, y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def _rms_norm_bwd_kernel(
    dy_ptr,  # (m, n), rows dy_row_stride apart, last dim contiguous
    dh_ptr,  # (m, n) like dy: gradient of the returned h, read only if HAS_DRESIDUAL
    h_ptr,  # (m, n), rows h_row_stride apart: the normalised input, x's dtype
    w_ptr,  # (n,)
    rstd_ptr,  # (m,) fp32
    dx_ptr,  # (m, n) contiguous out, x's dtype
    dw_partial_ptr,  # (programs, n) fp32 out: this program's rows' share of dweight
    dy_row_stride,
    dh_row_stride,
    h_row_stride,
    n_rows,
    n_cols,
    rows_per_program,
    HAS_DRESIDUAL: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < n_cols
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_N,), dtype=tl.float32)
    row_start = pid.to(tl.int64) * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    for row in range(row_start, row_end):
        h = tl.load(h_ptr + row * h_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + row * dy_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + row)
        normed = h * rstd  # fp32, as the reference's autograd sees it
        dw += dy * cast(normed, h_ptr.dtype.element_ty).to(tl.float32)  # y = w * round(normed)
        dn = dy * w
        # d/dh of h * rsqrt(mean(h^2) + eps): rstd * (dn - normed * mean(dn * normed))
        dx = rstd * (dn - normed * (tl.sum(dn * normed, axis=0) / n_cols))
        if HAS_DRESIDUAL:
            dx += tl.load(dh_ptr + row * dh_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(dx_ptr + row * n_cols + cols, cast(dx, dx_ptr.dtype.element_ty), mask=mask)
    tl.store(dw_partial_ptr + pid * n_cols + cols, dw, mask=mask)


def _alloc(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Uninitialised output storage (the kernels write every element; tests poison this)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """t as (rows, last dim) with a contiguous last dim; a view when the layout allows it."""
    flat = t.reshape(-1, t.shape[-1])
    return flat if flat.stride(-1) == 1 else flat.contiguous()


def _launch_config(n_cols: int, *, backward: bool) -> tuple[int, int]:
    """(BLOCK_N, num_warps) for a row of n_cols held in registers.

    At most 16 elements of a row per thread in the forward and 8 in the backward, which keeps
    five row-sized fp32 values live (ptxas for sm_90: 50-60 registers, no spills up to 8192
    columns; 16384 spills a little in the backward, 32768 more).
    """
    block = triton.next_power_of_2(n_cols)
    if block > MAX_BLOCK_N:
        raise ValueError(f"rms_norm supports hidden sizes up to {MAX_BLOCK_N}, got {n_cols}")
    per_thread = 8 if backward else 16
    return block, min(32, max(4, block // (32 * per_thread)))


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _bwd_programs(n_rows: int, num_warps: int, device: torch.device) -> int:
    """Persistent programs for the backward: about RESIDENT_WARPS_PER_SM warps on every SM, so
    that all are resident at once and the dweight partials stay few. Under the interpreter a
    handful, so that tests cover several rows per program and uneven blocks."""
    if device.type == "cuda":
        target = _sm_count(device) * max(1, RESIDENT_WARPS_PER_SM // num_warps)
    else:
        target = 4
    return max(1, min(n_rows, target))


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        x: torch.Tensor,  # (..., n)
        weight: torch.Tensor,  # (n,)
        residual: torch.Tensor | None,  # (..., n) like x
        eps: float,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        shape, n = x.shape, x.shape[-1]
        x2 = _rows(x)  # (m, n)
        r2 = None if residual is None else _rows(residual)  # (m, n)
        m = x2.shape[0]
        out_dtype = torch.promote_types(x.dtype, weight.dtype)
        y = _alloc((m, n), out_dtype, x.device)
        h = x2 if r2 is None else _alloc((m, n), x.dtype, x.device)
        rstd = _alloc((m,), torch.float32, x.device)
        if m:
            block, num_warps = _launch_config(n, backward=False)
            _rms_norm_fwd_kernel[(m,)](
                x2, x2 if r2 is None else r2, weight, y, h, rstd, x2.stride(0),
                0 if r2 is None else r2.stride(0), n, eps,
                HAS_RESIDUAL=r2 is not None, BLOCK_N=block, num_warps=num_warps,
            )  # fmt: skip
        ctx.save_for_backward(h, weight, rstd)
        ctx.shape, ctx.fused = shape, residual is not None
        if residual is None:
            return y.view(shape)
        return y.view(shape), h.view(shape)

    @staticmethod
    def backward(ctx, dy: torch.Tensor, dh: torch.Tensor | None = None):
        h, weight, rstd = ctx.saved_tensors  # (m, n), (n,), (m,)
        m, n = h.shape
        dy2 = _rows(dy)  # (m, n)
        dh2 = None if dh is None else _rows(dh)  # (m, n)
        dx = _alloc((m, n), h.dtype, h.device)
        block, num_warps = _launch_config(n, backward=True)
        programs = _bwd_programs(m, num_warps, h.device)
        dw_partial = _alloc((programs, n), torch.float32, h.device)
        if m:
            _rms_norm_bwd_kernel[(programs,)](
                dy2, dy2 if dh2 is None else dh2, h, weight, rstd, dx, dw_partial, dy2.stride(0),
                0 if dh2 is None else dh2.stride(0), h.stride(0), m, n, triton.cdiv(m, programs),
                HAS_DRESIDUAL=dh2 is not None, BLOCK_N=block, num_warps=num_warps,
            )  # fmt: skip
        else:
            dw_partial.zero_()
        dw = dw_partial.sum(0).to(weight.dtype) if ctx.needs_input_grad[1] else None
        dx = dx.view(ctx.shape)
        return dx, dw, dx if ctx.fused and ctx.needs_input_grad[2] else None, None


def _check(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None) -> None:
    if x.dtype not in DTYPES or weight.dtype not in DTYPES:
        raise TypeError(f"rms_norm takes {DTYPES}, got x {x.dtype} and weight {weight.dtype}")
    if x.dim() == 0 or weight.shape != x.shape[-1:]:
        raise ValueError(f"weight {tuple(weight.shape)} does not match x {tuple(x.shape)}")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(
            f"residual {tuple(residual.shape)} {residual.dtype} must match x "
            f"{tuple(x.shape)} {x.dtype}"
        )


@overload
def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, *, residual: None = None
) -> torch.Tensor: ...
@overload
def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, *, residual: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]: ...
def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, *, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm of x (..., n) with weight (n,), or with residual: (norm(x + residual), x + residual).

    fp32, bf16 or fp16 inputs, statistics in fp32; y has the promoted dtype of x and weight, h the
    dtype of x (residual must match x's shape and dtype). Triton on CUDA, or on CPU tensors under
    TRITON_INTERPRET=1.
    """
    _check(x, weight, residual)
    return _RMSNorm.apply(x, weight.contiguous(), residual, float(eps))
