"""The torch paths of the hot ops against plain formulas, and backend selection."""

import math
import types

import pytest
import torch

from megalite.model import describe_backends, ops


def naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)  # (b, h, s, hd)
    s = q.shape[2]
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # (b, h, s, s)
    scores = scores.masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), float("-inf"))
    return scores.softmax(-1) @ v  # (b, h, s, hd)


@pytest.mark.parametrize("n_kv_heads", [1, 2, 6])
def test_attention_matches_naive(n_kv_heads: int) -> None:
    q = torch.randn(2, 6, 9, 8)  # (b, h, s, hd)
    k, v = torch.randn(2, 2, n_kv_heads, 9, 8).unbind(0)  # (b, kv, s, hd) each
    torch.testing.assert_close(ops.attention(q, k, v), naive_attention(q, k, v))


def test_attention_rejects_uneven_groups() -> None:
    q, k = torch.randn(1, 6, 4, 8), torch.randn(1, 4, 4, 8)
    with pytest.raises(ValueError, match="kv heads"):
        ops.attention(q, k, k)


def test_rms_norm_reference() -> None:
    x = torch.randn(3, 5, 16, dtype=torch.bfloat16)
    w = torch.rand(16, dtype=torch.bfloat16)
    x32 = x.float()
    expected = w * (x32 / x32.pow(2).mean(-1, keepdim=True).add(1e-5).sqrt()).bfloat16()
    out = ops.rms_norm(x, w, 1e-5)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, expected)


def test_describe_backends_on_cpu() -> None:
    torch_rest = {"rotary": "torch", "swiglu": "torch", "cross_entropy": "torch"}
    want = {"attention": "torch sdpa", "rms_norm": "torch", **torch_rest}
    assert describe_backends(device="cpu") == want  # kernels.backend=auto: Triton on CUDA only


def test_describe_backends_with_fake_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = {
        "flash_attn": types.SimpleNamespace(
            flash_attn_func=lambda *a, **k: None, __version__="2.9"
        ),
        "apex.normalization.fused_layer_norm": types.SimpleNamespace(
            fused_rms_norm_affine=lambda *a: None
        ),
    }
    monkeypatch.setattr(ops, "_optional", fake.get)
    torch_rest = {"rotary": "torch", "swiglu": "torch", "cross_entropy": "torch"}
    cuda_bf16 = describe_backends(device="cuda", dtype=torch.bfloat16)
    assert cuda_bf16 == {"attention": "flash-attn 2.9", "rms_norm": "apex fused", **torch_rest}
    cuda_fp32 = describe_backends(device="cuda", dtype=torch.float32)
    assert cuda_fp32 == {"attention": "torch sdpa", "rms_norm": "apex fused", **torch_rest}
    fake["triton"] = types.SimpleNamespace(__version__="3.4.0")  # too old: the references run
    old = describe_backends(device="cuda", dtype=torch.bfloat16)
    assert old["rms_norm"] == "apex fused"
    assert old["swiglu"] == "torch (triton 3.4.0 is older than 3.6, the oldest the kernels support)"
    with pytest.raises(RuntimeError, match="triton 3.4.0 is older than 3.6"):
        ops.configure("triton")
    fake["triton"] = types.SimpleNamespace(__version__="3.6.0")  # auto takes the kernels on CUDA
    with_triton = describe_backends(device="cuda", dtype=torch.bfloat16)
    assert (
        with_triton["rms_norm"] == "triton" and with_triton["cross_entropy"] == "triton (chunked)"
    )
    assert describe_backends(device="cpu", dtype=torch.bfloat16)["attention"] == "torch sdpa"
