"""Tensor parallelism against the unsharded model: logits, loss and every parameter's gradient
(gathered to full shape) for tp=2 and tp=4, with and without sequence parallelism, GQA with fewer
kv heads than ranks, a vocabulary not divisible by tp, tied and untied embeddings."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
import torch.distributed as dist

from megalite.config import ModelConfig
from megalite.model import ops
from megalite.model.llama import IGNORE_INDEX, Llama, cross_entropy
from megalite.parallel.dims import ParallelDims
from megalite.parallel.parallelize import apply_tp, full_gradients, full_parameters
from tests.distributed import run_world

CFG = ModelConfig(
    name="tp-test", dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96, vocab_size=101,
    max_seq_len=64,
)  # fmt: skip


def close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m: f"{what}: {m}")


EOD = 7  # with documents: the end-of-document id


def _tp_matches_reference(
    rank: int, tp: int, cfg: ModelConfig, sp: bool, documents: bool = False
) -> None:
    dims = ParallelDims(tp=tp, pp=1, dp=1, global_rank=rank)
    dims.build_groups()
    group = dims.group("tp")
    torch.manual_seed(0)
    ref = Llama(cfg)
    ref.document_eod = EOD if documents else None
    model = copy.deepcopy(ref)
    loss_fn = apply_tp(model, dims, sequence_parallel=sp)
    g = torch.Generator().manual_seed(1)
    batch = torch.randint(0, cfg.vocab_size, (3, 17), generator=g)  # (b, s + 1)
    batch[0, 5] = -100  # an ignored target
    inputs, targets = batch[:, :-1].clamp(min=0), batch[:, 1:]
    if documents:  # three documents in the first window, two in the second
        inputs[0, [3, 9]] = inputs[1, 6] = EOD

    ref_logits = ref(inputs)
    ref_loss = cross_entropy(ref_logits, targets)
    ref_loss.backward()

    local = model(inputs)  # (b, s, padded_vocab / tp)
    loss = loss_fn(local, targets)
    loss.backward()
    parts = [torch.empty_like(local) for _ in range(tp)]
    dist.all_gather(parts, local.detach().contiguous(), group=group)
    close(torch.cat(parts, dim=-1)[..., : cfg.vocab_size], ref_logits.detach(), "logits")
    close(loss.detach(), ref_loss.detach(), "loss")

    full = full_parameters(model, group)
    grads = full_gradients(model, group)
    ref_params = dict(ref.named_parameters())
    assert set(full) == set(ref_params)
    for name, p in ref_params.items():
        close(full[name], p.detach(), f"weight {name}")
        close(grads[name], p.grad, f"grad {name}")


CASES = [
    pytest.param(2, CFG, False, id="tp2"),
    pytest.param(2, CFG, True, id="tp2-sp"),
    pytest.param(4, CFG, True, id="tp4-kv-replicated-sp"),
    pytest.param(4, replace(CFG, n_kv_heads=1, tie_embeddings=True), True, id="tp4-mqa-tied-sp"),
    pytest.param(2, replace(CFG, n_kv_heads=4, tie_embeddings=True), False, id="tp2-mha-tied"),
]


@pytest.mark.parametrize("tp,cfg,sp", CASES)
def test_tp_matches_unsharded(tp: int, cfg: ModelConfig, sp: bool) -> None:
    run_world(_tp_matches_reference, tp, cfg, sp)


def test_tp_matches_unsharded_with_documents() -> None:
    """data.document_mask under TP and sequence parallelism."""
    run_world(_tp_matches_reference, 2, CFG, True, True)


def _vocab_ce(rank: int, tp: int) -> None:
    dims = ParallelDims(tp=tp, pp=1, dp=1, global_rank=rank)
    dims.build_groups()
    vocab, per = 13, 4  # padded to 16: the last rank holds 1 real column and 3 padding columns
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(5, 7, vocab, generator=g, dtype=torch.float64)
    targets = torch.randint(0, vocab, (5, 7), generator=g)
    targets[1, :3] = -100
    want = torch.nn.functional.cross_entropy(logits.reshape(-1, vocab), targets.reshape(-1))
    padded = torch.cat([logits, torch.full((5, 7, 3), 1e3, dtype=torch.float64)], dim=-1)
    local = padded[..., rank * per : (rank + 1) * per].clone().requires_grad_()
    got = ops.cross_entropy(
        local,
        targets,
        ignore_index=IGNORE_INDEX,
        group=dims.group("tp"),
        vocab_start=rank * per,
        vocab_size=vocab,
    )
    full = logits.clone().requires_grad_()
    torch.nn.functional.cross_entropy(full.reshape(-1, vocab), targets.reshape(-1)).backward()
    got.backward()
    close(got.double(), want, "loss")
    want_grad = torch.cat([full.grad, torch.zeros(5, 7, 3, dtype=torch.float64)], dim=-1)
    close(local.grad.double(), want_grad[..., rank * per : (rank + 1) * per], "grad")


def test_vocab_parallel_cross_entropy() -> None:
    run_world(_vocab_ce, 4)
