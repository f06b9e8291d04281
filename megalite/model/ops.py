"""The hot ops of the model, each routed to the fastest implementation this machine has: the one
place that decides which implementation runs.

The model calls `attention`, `rms_norm`, `rotary_qk`, `swiglu` and `cross_entropy` (also on a
vocab-parallel shard, given the TP group) and never asks which kernel ran. `kernels.backend`
(`configure`) picks megalite's Triton kernels (`megalite.kernels`, imported lazily; auto = on CUDA
when triton imports) or their torch references (`megalite.kernels.reference`, torch only: one
reference per op, the one the kernels' tests hold them to, so the fallback is exact). Attention
uses flash-attn on CUDA in half precision when importable, and RMSNorm apex's fused kernel when
importable and Triton is not chosen. Optional packages are imported lazily and once
(`functools.cache`), so importing the model never fails for lack of them and never logs;
`describe_backends()` tells the trainer which path each op takes, for its log.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from types import ModuleType

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megalite.kernels import reference
from megalite.model.documents import Documents

_HALF = (torch.float16, torch.bfloat16)
# The oldest Triton whose interpreter passes tests/kernels (what torch 2.11 ships); older ones are
# not used by `auto` (the torch references run, and the log says why). tools/dev.py test checks it.
TRITON_OLDEST = (3, 6)
BACKENDS = ("auto", "triton", "torch")
_backend = "auto"  # kernels.backend; set once per process by `configure`
_flash_allowed = True  # kernels.attention=auto; sdpa turns flash-attn off


def configure(backend: str, *, attention: str = "auto") -> None:
    """Choose the kernels' backend (`kernels.backend`): auto (Triton on CUDA when triton imports,
    torch otherwise), triton (always; on CPU only under TRITON_INTERPRET=1) or torch; and whether
    attention may use flash-attn (`kernels.attention`: auto, or sdpa for torch's always)."""
    global _backend, _flash_allowed
    if backend not in BACKENDS:
        raise ValueError(f"kernels.backend={backend!r}: use one of {BACKENDS}")
    if backend == "triton" and _triton() is None:
        raise RuntimeError(f"kernels.backend=triton but {_triton_missing()}")
    _backend, _flash_allowed = backend, attention != "sdpa"


def use_triton(device: torch.device) -> bool:
    """Whether tensors on `device` go through megalite's Triton kernels."""
    if _backend == "torch":
        return False
    if _backend == "triton":
        return True
    return device.type == "cuda" and _triton() is not None


def _triton() -> ModuleType | None:
    """triton, if it imports and is a release the kernels are tested under (≥ TRITON_OLDEST)."""
    triton = _optional("triton")
    if triton is None or _release(getattr(triton, "__version__", "0")) < TRITON_OLDEST:
        return None
    return triton


def _triton_missing() -> str:
    """Why `_triton()` is None, for a log line or an error."""
    triton = _optional("triton")
    if triton is None:
        return "triton is not importable here"
    oldest = ".".join(map(str, TRITON_OLDEST))
    return f"triton {triton.__version__} is older than {oldest}, the oldest the kernels support"


def _release(version: str) -> tuple[int, ...]:
    """(3, 6) of "3.6.0" or "3.6.0+git1234"."""
    parts = version.split("+")[0].split(".")[:2]
    return tuple(int(p) if p.isdigit() else 0 for p in parts)


@functools.cache
def _optional(module: str) -> ModuleType | None:
    """Import `module` once; None if it is not installed or fails to load (e.g. a CUDA mismatch)."""
    try:
        return importlib.import_module(module)
    except (ImportError, OSError, RuntimeError):
        return None


def _flash_attn_func() -> Callable[..., torch.Tensor] | None:
    flash_attn = _optional("flash_attn")
    return None if flash_attn is None else getattr(flash_attn, "flash_attn_func", None)


def _apex_rms_norm() -> Callable[..., torch.Tensor] | None:
    fused = _optional("apex.normalization.fused_layer_norm")
    return None if fused is None else getattr(fused, "fused_rms_norm_affine", None)


def _use_flash(device: torch.device, dtype: torch.dtype) -> bool:
    return (
        _flash_allowed
        and device.type == "cuda"
        and dtype in _HALF
        and _flash_attn_func() is not None
    )


def _use_apex(device: torch.device) -> bool:
    return device.type == "cuda" and _apex_rms_norm() is not None


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, documents: Documents | None = None
) -> torch.Tensor:
    """Causal softmax attention with scale 1/sqrt(head_dim), no dropout; with `documents`, a
    token attends only to its own document's (flash-attn's varlen path, or SDPA with a mask).

    q is (b, n_heads, s, head_dim); k and v are (b, n_kv_heads, s, head_dim) with n_kv_heads
    dividing n_heads (grouped-query attention). Query head i reads kv head i // (n_heads //
    n_kv_heads), the grouping of Hugging Face's `repeat_kv`. flash-attn handles the groups
    natively; the torch path expands k and v first. Returns (b, n_heads, s, head_dim).
    """
    n_heads, n_kv_heads = q.shape[1], k.shape[1]
    if n_heads % n_kv_heads != 0:
        raise ValueError(f"{n_heads} query heads cannot share {n_kv_heads} kv heads evenly")
    if _use_flash(q.device, q.dtype):
        return _flash_attention(q, k, v, documents)
    groups = n_heads // n_kv_heads
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)  # (b, n_heads, s, head_dim)
        v = v.repeat_interleave(groups, dim=1)  # (b, n_heads, s, head_dim)
    if documents is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (b, n_heads, s, hd)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=documents.mask)  # (b, n_heads, s, hd)


def _flash_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, documents: Documents | None
) -> torch.Tensor:
    """flash-attn on (b, heads, s, hd) tensors: its dense kernel, or with documents its varlen
    one over the flattened (b * s) tokens, each document a sequence."""
    flash_attn = _optional("flash_attn")
    assert flash_attn is not None  # _use_flash checked it
    b, n_heads, s, hd = q.shape
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (b, s, heads, hd)
    if documents is None:
        return flash_attn.flash_attn_func(q, k, v, causal=True).transpose(1, 2)
    cu, longest = documents.cu_seqlens, documents.max_len
    flat = [t.reshape(b * s, t.shape[2], hd) for t in (q, k, v)]  # (b * s, heads, hd)
    out = flash_attn.flash_attn_varlen_func(*flat, cu, cu, longest, longest, causal=True)
    return out.view(b, s, n_heads, hd).transpose(1, 2)  # (b, n_heads, s, hd)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim: megalite's Triton kernel, else apex's fused kernel on CUDA if
    importable, else `reference.rms_norm`."""
    if use_triton(x.device):
        from megalite.kernels.rmsnorm import rms_norm as triton_rms_norm

        return triton_rms_norm(x, weight, eps)
    fused = _apex_rms_norm() if _use_apex(x.device) else None
    if fused is not None:
        return fused(x, weight, weight.shape, eps)
    return reference.rms_norm(x, weight, eps)


def rotary_qk(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """q (b, n_heads, s, hd) and k (b, n_kv_heads, s, hd) rotated by tables (s, hd): one Triton
    kernel for both, or `reference.apply_rotary_qk`; per-window tables (b, 1, s, hd), of
    per-document positions, always take the reference."""
    if use_triton(q.device) and cos.dim() == 2:
        from megalite.kernels.rotary import apply_rotary_qk

        return apply_rotary_qk(q, k, cos, sin)
    return reference.apply_rotary_qk(q, k, cos, sin)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up (views of a fused projection are fine): the Triton kernel or
    `reference.swiglu`."""
    if use_triton(gate.device):
        from megalite.kernels.swiglu import swiglu as triton_swiglu

        return triton_swiglu(gate, up)
    return reference.swiglu(gate, up)


def cross_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    ignore_index: int,
    group: dist.ProcessGroup | None = None,
    vocab_start: int = 0,
    vocab_size: int | None = None,
) -> torch.Tensor:
    """Mean cross-entropy (fp32) of logits (..., v_local) against targets (...): the chunked
    Triton kernel (no fp32 copy of the logits) or `reference.cross_entropy`.

    group None: the logits hold the whole vocabulary. Otherwise they are this rank's shard of a
    vocab-parallel head, global columns [vocab_start, vocab_start + v_local) of a vocabulary of
    `vocab_size` real columns (the rest padding), and the loss is the unsharded one, with (n,)-sized
    all-reduces over `group` only.
    """
    loss = reference.cross_entropy
    if use_triton(logits.device):
        from megalite.kernels.cross_entropy import cross_entropy as fused

        loss = fused
    return loss(
        logits,
        targets,
        ignore_index=ignore_index,
        group=group,
        vocab_start=vocab_start,
        vocab_size=vocab_size,
    )


def describe_backends(
    *, device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> dict[str, str]:
    """Which implementation each op uses for tensors on `device` in `dtype`.

    Defaults: CUDA when available else CPU, and torch's default dtype; a trainer should pass the
    device and compute dtype it runs with. Example: {"attention": "flash-attn 2.6.3", "rms_norm":
    "triton", ...} or {"attention": "torch sdpa", "rms_norm": "torch", ...}.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    dtype = torch.get_default_dtype() if dtype is None else dtype
    if _use_flash(device, dtype):
        flash_attn = _optional("flash_attn")
        attn = f"flash-attn {getattr(flash_attn, '__version__', '(unknown version)')}"
    else:
        attn = "torch sdpa"
    if use_triton(device):
        return {"attention": attn, "rms_norm": "triton", "rotary": "triton", "swiglu": "triton",
                "cross_entropy": "triton (chunked)"}  # fmt: skip
    fallback = "torch"
    if device.type == "cuda" and _optional("triton") is not None:  # importable, but too old
        fallback = f"torch ({_triton_missing()})"
    norm = "apex fused" if _use_apex(device) else fallback
    return {"attention": attn, "rms_norm": norm, "rotary": fallback, "swiglu": fallback,
            "cross_entropy": fallback}  # fmt: skip
