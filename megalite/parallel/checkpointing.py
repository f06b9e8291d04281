"""Activation checkpointing, applied to a plain (or TP-sharded) model in place.

- `full`: each transformer block keeps only its input and recomputes everything in backward.
- `selective`: only the attention core (softmax(qkᵀ)v, the activation that grows with s²) is
  recomputed, as in Korthikanti et al. 2022; the projections' outputs are kept.

Non-reentrant `torch.utils.checkpoint`, which recomputes exactly what the forward computed (no RNG
is drawn in the model), so the loss and gradients do not change. The module tree and parameter
names do not change either: forwards are wrapped, modules are not.
"""

from __future__ import annotations

import functools

from torch.utils.checkpoint import checkpoint

from megalite.model.llama import Llama, TransformerBlock

MODES = ("none", "full", "selective")


def _checkpointed(fn):
    return functools.partial(checkpoint, fn, use_reentrant=False)


def apply_ac(model: Llama, mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"activation checkpointing {mode!r}: use one of {', '.join(MODES)}")
    for block in model.layers:
        if mode == "full":
            block.forward = _checkpointed(block.forward)
        elif mode == "selective":
            assert isinstance(block, TransformerBlock)  # an nn.ModuleList types its items as Module
            block.attn.core = _checkpointed(block.attn.core)
