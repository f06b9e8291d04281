"""The SwiGLU kernels, silu(gate) * up, against `reference.swiglu`.

Relative error is max|kernel - reference| / max|reference| over the whole tensor; bounds: 1e-5 in
fp32, 1e-2 in bf16 (the reference runs in the same dtype, autograd included). Every output buffer
the wrapper allocates is pre-filled with NaN, so an element a kernel fails to write fails the test.
"""

import pytest
import torch

from megalite.kernels import reference
from megalite.kernels import swiglu as swiglu_module
from megalite.kernels.swiglu import swiglu
from tests.kernels.helpers import assert_close


@pytest.fixture(autouse=True)
def poison(monkeypatch: pytest.MonkeyPatch) -> None:
    def alloc(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(swiglu_module, "_alloc", alloc)


def run(fn, leaves: tuple[torch.Tensor, ...], split, dout: torch.Tensor):
    """fn(*split(leaves)) and the gradients of the leaves for upstream gradient dout."""
    leaves = tuple(t.detach().requires_grad_() for t in leaves)
    out = fn(*split(*leaves))
    out.backward(dout)
    return (out,) + tuple(t.grad for t in leaves)


# odd row counts; 96, 130 not powers of two; 1030 spans two column blocks of 1024
SHAPES = [(7, 96), (13, 130), (2, 3, 1030)]
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])


@DTYPES
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_separate_tensors(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    """The model's MLP: gate = w1(x) and up = w3(x), two tensors."""
    torch.manual_seed(sum(shape))
    gate, up, dout = (3 * torch.randn(shape, dtype=dtype) for _ in range(3))
    got = run(swiglu, (gate, up), lambda g, u: (g, u), dout)
    ref = run(reference.swiglu, (gate, up), lambda g, u: (g, u), dout)
    for name, a, b in zip(("out", "dgate", "dup"), got, ref, strict=True):
        assert_close(a, b, dtype, name)


@DTYPES
@pytest.mark.parametrize("shape", [(5, 130), (2, 3, 96)], ids=lambda s: "x".join(map(str, s)))
def test_fused_w13_halves(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    """The TP MLP: the halves of one [gate | up] tensor, row-strided views read in place."""
    torch.manual_seed(sum(shape) + 1)
    *lead, f = shape
    w13_out = 3 * torch.randn(*lead, 2 * f, dtype=dtype)
    dout = torch.randn(shape, dtype=dtype)
    halves = lambda t: t.chunk(2, dim=-1)  # (..., f) each, rows 2f apart
    got = run(swiglu, (w13_out,), halves, dout)
    ref = run(reference.swiglu, (w13_out,), halves, dout)
    for name, a, b in zip(("out", "dw13_out"), got, ref, strict=True):
        assert_close(a, b, dtype, name)


def test_strided_last_dim_and_empty() -> None:
    torch.manual_seed(2)
    gate, up = torch.randn(24, 5).t(), torch.randn(5, 24)  # gate's last dim is strided
    got = run(swiglu, (gate, up), lambda g, u: (g, u), torch.ones(5, 24))
    ref = run(reference.swiglu, (gate, up), lambda g, u: (g, u), torch.ones(5, 24))
    for name, a, b in zip(("out", "dgate", "dup"), got, ref, strict=True):
        assert_close(a, b, torch.float32, name)
    empty = swiglu(torch.randn(0, 7), torch.randn(0, 7))
    assert empty.shape == (0, 7)


def test_rejects_mismatches() -> None:
    with pytest.raises(ValueError, match="must match"):
        swiglu(torch.randn(3, 8), torch.randn(3, 7))
    with pytest.raises(TypeError):
        swiglu(torch.randn(3, 8), torch.randn(3, 8, dtype=torch.bfloat16))
