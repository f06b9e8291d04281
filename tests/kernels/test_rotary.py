"""The rotary kernel (q and k in one launch) against `reference.apply_rotary_qk`.

Relative error is max|kernel - reference| / max|reference| over the whole tensor; bounds: 1e-5 in
fp32, 1e-2 in bf16 (the reference runs in the same dtype, autograd included). Every output buffer
the wrapper allocates is pre-filled with NaN, so an element the kernel skips fails the test.
"""

import pytest
import torch

from megalite.kernels import reference, rotary
from megalite.kernels.rotary import apply_rotary_qk
from megalite.model.llama import RotaryEmbedding
from tests.kernels.helpers import assert_close


@pytest.fixture(autouse=True)
def poison(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rotary, "_alloc_like", lambda t: torch.full_like(t, float("nan")))


def model_layout(b: int, heads: int, s: int, head_dim: int, dtype: torch.dtype) -> torch.Tensor:
    """(b, heads, s, head_dim) viewed from (b, s, heads, head_dim) memory, as the model's q is."""
    return torch.randn(b, s, heads, head_dim, dtype=dtype).transpose(1, 2)


def check(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Outputs and the gradients of q and k against the reference, for random upstream grads."""
    dtype = q.dtype
    dq, dk = torch.randn(q.shape, dtype=dtype), torch.randn(k.shape, dtype=dtype)
    results = []
    for fn in (apply_rotary_qk, reference.apply_rotary_qk):
        qs, ks = q.detach().requires_grad_(), k.detach().requires_grad_()
        q_out, k_out = fn(qs, ks, cos, sin)
        torch.autograd.backward((q_out, k_out), (dq, dk))
        results.append((q_out, k_out, qs.grad, ks.grad))
    for name, a, b in zip(("q", "k", "dq", "dk"), *results, strict=True):
        assert_close(a, b, dtype, name)


# (b, n_heads, n_kv_heads, s, head_dim): MHA, GQA, MQA; odd lengths, head_dim / 2 not a power of 2
SHAPES = [(1, 4, 4, 7, 64), (2, 6, 2, 5, 96), (1, 3, 1, 13, 130)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_reference(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    b, n_heads, n_kv_heads, s, head_dim = shape
    torch.manual_seed(sum(shape))
    q = model_layout(b, n_heads, s, head_dim, dtype)
    k = model_layout(b, n_kv_heads, s, head_dim, dtype)
    cos, sin = torch.randn(s, head_dim), torch.randn(s, head_dim)  # halves differ: the general case
    check(q, k, cos, sin)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_model_tables_and_layouts(dtype: torch.dtype) -> None:
    """The model's own fp32 tables (a slice of the max_seq_len buffer); q contiguous, k with a
    strided last dim (copied), and the outputs keeping the inputs' layouts."""
    torch.manual_seed(1)
    b, s, head_dim = 2, 9, 48
    rope = RotaryEmbedding(head_dim, max_seq_len=16, theta=10000.0)
    rope.init_tables()
    cos, sin = rope(s)
    q = torch.randn(b, 4, s, head_dim, dtype=dtype)
    k = torch.randn(b, 2, head_dim, s, dtype=dtype).transpose(-1, -2)
    check(q, k, cos, sin)
    q_model = model_layout(b, 4, s, head_dim, dtype)
    q_out, _ = apply_rotary_qk(q_model, q[:, :2], cos, sin)
    assert q_out.stride() == q_model.stride()


def test_rejects_bad_inputs() -> None:
    q, k = torch.randn(1, 4, 5, 8), torch.randn(1, 2, 5, 8)
    cos, sin = torch.randn(5, 8), torch.randn(5, 8)
    with pytest.raises(ValueError, match="cos/sin"):
        apply_rotary_qk(q, k, cos[:4], sin[:4])
    with pytest.raises(ValueError, match="do not match"):
        apply_rotary_qk(q, torch.randn(1, 2, 5, 6), cos, sin)
    with pytest.raises(TypeError):
        apply_rotary_qk(q, k.bfloat16(), cos, sin)
    with pytest.raises(ValueError, match="gradient"):
        apply_rotary_qk(q, k, cos.requires_grad_(), sin)
