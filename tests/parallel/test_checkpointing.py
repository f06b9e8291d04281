"""Activation checkpointing changes no loss and no gradient, full or selective."""

from __future__ import annotations

import copy

import pytest
import torch

from megalite.config import ModelConfig
from megalite.model.llama import Llama, cross_entropy
from megalite.parallel.checkpointing import apply_ac

CFG = ModelConfig(
    name="ac-test", dim=64, n_layers=3, n_heads=4, n_kv_heads=2, ffn_dim=96, vocab_size=97,
    max_seq_len=64,
)  # fmt: skip


def loss_and_grads(model: Llama, batch: torch.Tensor) -> tuple[torch.Tensor, dict]:
    loss = cross_entropy(model(batch[:, :-1]), batch[:, 1:])
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_checkpointing_changes_nothing(mode: str) -> None:
    torch.manual_seed(0)
    plain = Llama(CFG)
    ac = copy.deepcopy(plain)
    apply_ac(ac, mode)
    batch = torch.randint(0, CFG.vocab_size, (2, 33), generator=torch.Generator().manual_seed(1))
    want_loss, want_grads = loss_and_grads(plain, batch)
    got_loss, got_grads = loss_and_grads(ac, batch)
    assert torch.equal(got_loss, want_loss)
    assert set(got_grads) == set(want_grads)  # parameter names unchanged
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-6, atol=1e-7, msg=name)


def test_checkpointing_recomputes() -> None:
    """The wrapped forward really runs again in backward (counted through the attention core)."""
    torch.manual_seed(0)
    model = Llama(CFG)
    calls = []
    for block in model.layers:
        core = block.attn.core
        block.attn.core = lambda q, k, v, docs, core=core: calls.append(1) or core(q, k, v, docs)
    apply_ac(model, "selective")
    batch = torch.randint(0, CFG.vocab_size, (2, 9))
    cross_entropy(model(batch[:, :-1]), batch[:, 1:]).backward()
    assert len(calls) == 2 * CFG.n_layers


def test_unknown_mode() -> None:
    with pytest.raises(ValueError, match="use one of none, full, selective"):
        apply_ac(Llama(CFG), "some")
