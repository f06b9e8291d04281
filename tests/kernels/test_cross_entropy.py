"""The chunked cross-entropy kernel against `reference.cross_entropy` (F.cross_entropy of fp32
logits on one device, its vocab-parallel form over a 2-rank gloo world), through Triton's
interpreter on CPU tensors.

Relative error is max|got - want| / max|want|, want computed in fp32 from the same (possibly bf16)
logits. The loss is accumulated in fp32 whatever the logits' dtype, so it is held to 1e-5 in every
dtype; gradients to 1e-5 in fp32 and 1e-2 in bf16/fp16 (one rounding of the output: the
interpreter truncates fp32 to bf16 where a GPU rounds to nearest, up to 2**-7 relative).
Every output buffer is filled with NaN before the kernels run, so an element they skip fails.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import megalite.kernels.cross_entropy as ce
from megalite.kernels import reference
from tests.distributed import run_world

GRAD_TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}
LOSS_TOL = 1e-5


def _poisoned(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


@pytest.fixture(autouse=True)
def poison(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ce, "_alloc", _poisoned)


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).abs().max() / want.double().abs().max()).item()


def _inputs(shape: tuple[int, ...], vocab: int, dtype: torch.dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(*shape, vocab, generator=g)).to(dtype)  # (..., vocab)
    targets = torch.randint(0, vocab, shape, generator=g)  # (...)
    targets[torch.rand(shape, generator=g) < 0.25] = -100
    targets.view(-1)[:2] = torch.tensor([vocab - 1, 0])[: targets.numel()]  # both edge columns
    scale = 0.5 + torch.rand((), generator=g).item()  # upstream gradient != 1
    return logits, targets, scale


def _loss_and_grad(fn, logits: torch.Tensor, targets: torch.Tensor, scale: float, **kw):
    x = logits.clone().requires_grad_()
    loss = fn(x, targets, **kw)
    (loss * scale).backward()
    return loss.detach(), x.grad


CASES = [
    pytest.param((1,), 1000, 256, torch.float32, id="1x1000-fp32"),
    pytest.param((7,), 1000, 256, torch.float32, id="7x1000-fp32"),
    pytest.param((3, 5), 333, 64, torch.float32, id="3x5x333-fp32"),
    pytest.param((11,), 77, None, torch.float32, id="11x77-default-block"),
    pytest.param((9,), 1000, 256, torch.bfloat16, id="9x1000-bf16"),
    pytest.param((2, 3), 333, 128, torch.float16, id="2x3x333-fp16"),
]


@pytest.mark.parametrize("shape,vocab,block_v,dtype", CASES)
def test_matches_torch(shape: tuple[int, ...], vocab: int, block_v: int | None, dtype) -> None:
    logits, targets, scale = _inputs(shape, vocab, dtype, seed=vocab + len(shape))
    want, want_grad = _loss_and_grad(reference.cross_entropy, logits.float(), targets, scale)
    got, grad = _loss_and_grad(ce.cross_entropy, logits, targets, scale, block_v=block_v)
    assert got.dtype == torch.float32 and grad.dtype == dtype and grad.shape == logits.shape
    assert rel_err(got, want) <= LOSS_TOL
    assert rel_err(grad, want_grad) <= GRAD_TOL[dtype]


def test_strided_rows_and_padding_columns() -> None:
    """Rows read through a stride (a slice of wider storage); the columns past vocab_size are
    padding: huge logits there change nothing and get a zero gradient."""
    vocab, padded = 300, 320
    logits, targets, scale = _inputs((5,), vocab, torch.float32, seed=1)
    wide = torch.full((5, 400), 1e3)
    wide[:, :vocab] = logits
    x = wide[:, :padded].requires_grad_()  # wide is a leaf; this view's rows have stride 400
    loss = ce.cross_entropy(x, targets, vocab_size=vocab, block_v=64)
    (loss * scale).backward()
    want, want_grad = _loss_and_grad(reference.cross_entropy, logits, targets, scale)
    assert rel_err(loss.detach(), want) <= LOSS_TOL
    assert rel_err(x.grad[:, :vocab], want_grad) <= 1e-5
    assert torch.equal(x.grad[:, vocab:], torch.zeros(5, padded - vocab))


def test_all_rows_ignored_is_nan_with_zero_grad() -> None:
    """As the reference (F.cross_entropy): the mean over no rows is nan, and nothing flows back."""
    logits = torch.randn(4, 300)
    targets = torch.full((4,), -100)
    want, want_grad = _loss_and_grad(reference.cross_entropy, logits, targets, 1.0)
    got, grad = _loss_and_grad(ce.cross_entropy, logits, targets, 1.0, block_v=128)
    assert want.isnan() and got.isnan()
    assert torch.equal(grad, want_grad) and torch.equal(grad, torch.zeros_like(logits))


@pytest.mark.parametrize("vocab_start,n_real", [(0, 200), (200, 200), (400, 150), (600, 0)])
def test_row_stats_of_a_shard(vocab_start: int, n_real: int) -> None:
    """Per-row (max, sum-exp, target logit) of one shard of 200 columns, n_real of them real:
    targets inside and outside the shard, ignored, and a shard of padding only."""
    g = torch.Generator().manual_seed(vocab_start)
    logits = torch.randn(9, 200, generator=g).bfloat16()
    targets = torch.tensor([0, 199, 200, 250, 399, 400, 549, 599, -100])
    got = ce._row_stats(logits, targets, vocab_start=vocab_start, n_real=n_real,
                        ignore_index=-100, block_v=64)  # fmt: skip
    real = logits.float()[:, :n_real]  # (9, n_real)
    m = real.max(-1).values if n_real else torch.full((9,), float("-inf"))
    local = targets - vocab_start
    owned = (targets != -100) & (local >= 0) & (local < n_real)
    t = torch.where(owned, logits.float().gather(1, (local * owned).unsqueeze(1)).squeeze(1), 0)
    want = m, (real - m.unsqueeze(-1)).exp().sum(-1), t
    for name, a, b in zip(("max", "sum_exp", "target_logit"), got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


# ---- vocab-parallel over a gloo world -------------------------------------------------------

TP, VOCAB = 2, 999  # padded to 1000: rank 1 holds 499 real columns and one padding column


def _tp_worker(rank: int, tp: int, interpret: str | None) -> None:
    # Spawned children import afresh: the interpreter flag must have come through the environment.
    assert os.environ.get("TRITON_INTERPRET") == interpret
    ce._alloc = _poisoned
    group = dist.group.WORLD
    per = -(-VOCAB // tp)
    start = rank * per
    for dtype in (torch.float32, torch.bfloat16):
        logits, targets, scale = _inputs((3, 5), VOCAB, dtype, seed=7)
        want, want_grad = _loss_and_grad(reference.cross_entropy, logits.float(), targets, scale)
        padded = torch.cat([logits, torch.full((3, 5, tp * per - VOCAB), 1e3, dtype=dtype)], -1)
        local = padded[..., start : start + per]  # (3, 5, per)
        kw = dict(vocab_start=start, vocab_size=VOCAB)
        got, grad = _loss_and_grad(ce.cross_entropy, local, targets, scale, group=group,
                                   block_v=128, **kw)  # fmt: skip
        assert rel_err(got, want) <= LOSS_TOL, (dtype, got, want)
        want_local = F.pad(want_grad, (0, tp * per - VOCAB))[..., start : start + per]
        assert rel_err(grad, want_local) <= GRAD_TOL[dtype], dtype
        if dtype == torch.float32:  # the torch TP loss, the fallback of this kernel
            tp_loss, tp_grad = _loss_and_grad(reference.cross_entropy, local, targets, scale,
                                              group=group, **kw)  # fmt: skip
            assert rel_err(got, tp_loss) <= LOSS_TOL and rel_err(grad, tp_grad) <= 1e-5


def test_vocab_parallel_matches_single_device() -> None:
    run_world(_tp_worker, TP, os.environ.get("TRITON_INTERPRET"))
