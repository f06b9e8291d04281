"""SwiGLU's elementwise core, silu(gate) * up, as Triton kernels, forward and backward.

The contract is `reference.swiglu` (F.silu(gate) * up, the model's MLP before its down
projection), computed in fp32 and rounded once to the inputs' dtype.

gate and up are two tensors of one shape (..., f) that may be strided views: the model's MLP passes
two projections, the tensor-parallel MLP the halves of its fused `w13` output,
`w13(x).chunk(2, dim=-1)`, whose rows are 2f apart. Each is read through its own row stride, so
neither layout is copied; only a strided last dim is. The output and the gradients are new
contiguous (..., f) tensors (for the fused layout, autograd's chunk backward concatenates the two
gradients into the (..., 2f) gradient of w13's output).

The grid is (rows, column blocks of BLOCK_N): a purely memory-bound map, which reads two and
writes one element per output in the forward and reads three and writes two in the backward
(silu is recomputed from the saved gate rather than stored).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from megalite.kernels._common import cast

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_BLOCK_N = 1024


@triton.jit
def _swiglu_fwd_kernel(
    gate_ptr,  # (m, f), rows gate_row_stride apart, last dim contiguous
    up_ptr,  # (m, f), rows up_row_stride apart
    out_ptr,  # (m, f) contiguous out
    gate_row_stride,
    up_row_stride,
    n_cols,
    BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # int64: m * f passes 2**31 at training sizes
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = cols < n_cols
    g = tl.load(gate_ptr + row * gate_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + row * up_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    out = g * tl.sigmoid(g) * u
    tl.store(out_ptr + row * n_cols + cols, cast(out, out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(
    dout_ptr,  # (m, f), rows dout_row_stride apart, last dim contiguous
    gate_ptr,  # (m, f), rows gate_row_stride apart
    up_ptr,  # (m, f), rows up_row_stride apart
    dgate_ptr,  # (m, f) contiguous out
    dup_ptr,  # (m, f) contiguous out
    dout_row_stride,
    gate_row_stride,
    up_row_stride,
    n_cols,
    BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = cols < n_cols
    dout = tl.load(dout_ptr + row * dout_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(gate_ptr + row * gate_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + row * up_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    silu = g * sig
    # silu'(g) = sig + g * sig * (1 - sig)
    dgate = dout * u * (sig + silu * (1.0 - sig))
    offs = row * n_cols + cols
    tl.store(dgate_ptr + offs, cast(dgate, dgate_ptr.dtype.element_ty), mask=mask)
    tl.store(dup_ptr + offs, cast(dout * silu, dup_ptr.dtype.element_ty), mask=mask)


def _alloc(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Uninitialised output storage (the kernels write every element; tests poison this)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """t as (rows, last dim) with a contiguous last dim; a view when the layout allows it."""
    flat = t.reshape(-1, t.shape[-1])
    return flat if flat.stride(-1) == 1 else flat.contiguous()


def _launch(n_rows: int, n_cols: int) -> tuple[tuple[int, int], int, int]:
    """(grid, BLOCK_N, num_warps)."""
    block = min(MAX_BLOCK_N, triton.next_power_of_2(n_cols))
    return (n_rows, triton.cdiv(n_cols, block)), block, 4 if block >= 512 else 2


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:  # (..., f) each
        shape, f = gate.shape, gate.shape[-1]
        gate2, up2 = _rows(gate), _rows(up)  # (m, f) each
        m = gate2.shape[0]
        out = _alloc((m, f), gate.dtype, gate.device)
        if m and f:
            grid, block, num_warps = _launch(m, f)
            _swiglu_fwd_kernel[grid](
                gate2, up2, out, gate2.stride(0), up2.stride(0), f,
                BLOCK_N=block, num_warps=num_warps,
            )  # fmt: skip
        ctx.save_for_backward(gate2, up2)
        ctx.shape = shape
        return out.view(shape)

    @staticmethod
    def backward(ctx, dout: torch.Tensor):
        gate2, up2 = ctx.saved_tensors  # (m, f) each
        m, f = gate2.shape
        dout2 = _rows(dout)  # (m, f)
        dgate = _alloc((m, f), gate2.dtype, gate2.device)
        dup = _alloc((m, f), gate2.dtype, gate2.device)
        if m and f:
            grid, block, num_warps = _launch(m, f)
            _swiglu_bwd_kernel[grid](
                dout2, gate2, up2, dgate, dup, dout2.stride(0), gate2.stride(0), up2.stride(0),
                f, BLOCK_N=block, num_warps=num_warps,
            )  # fmt: skip
        return dgate.view(ctx.shape), dup.view(ctx.shape)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate, up (..., f) of one shape and dtype (fp32, bf16, fp16).

    Either may be a strided view, e.g. the halves of a fused [gate | up] projection from
    `.chunk(2, dim=-1)`. Returns a contiguous (..., f) tensor in the inputs' dtype. Triton on
    CUDA, or on CPU tensors under TRITON_INTERPRET=1.
    """
    if gate.dtype not in DTYPES or up.dtype != gate.dtype:
        raise TypeError(f"swiglu takes gate and up of one dtype in {DTYPES}")
    if gate.shape != up.shape or gate.dim() == 0:
        raise ValueError(f"gate {tuple(gate.shape)} and up {tuple(up.shape)} must match")
    return _SwiGLU.apply(gate, up)
