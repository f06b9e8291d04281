"""Parameter counts and training FLOPs per token of a `ModelConfig`, without allocating it.

Conventions (those of Megatron-LM and PaLM's MFU, so our MFU compares with theirs):
- one multiply-add = 2 FLOPs; training = forward + backward = 3 x forward;
- only matmuls count: the embedding lookup, norms, rotary, softmax and the loss count 0;
- causal attention is counted over the full s x s score matrix, not the half that a causal kernel
  computes: scores q.k^T and the weighted sum of v cost 2 * 2 * s * (n_heads * head_dim) FLOPs
  per layer per token forward.

Per token forward, with d = dim, a = n_heads * head_dim, g = n_kv_heads * head_dim, f = ffn_dim,
L = n_layers, V = vocab_size, s = seq_len:

    F_fwd = L * (2*d*a + 2*2*d*g + 2*a*d + 3*2*d*f + 2*2*s*a) + 2*d*V
            (q)     (k, v)     (o)      (MLP)     (attention)  (head)

    flops_per_token = 3 * F_fwd  =  6 * N_matmul + 12 * L * s * a

where N_matmul counts the weights that enter a matmul: every non-embedding parameter except the
norm gains, plus the head (once, even when tied to the embedding, since the head matmul runs
either way). `flops_per_token_6n` is the usual 6N approximation with N = non-embedding params +
head: it drops the attention term and over-counts the norm gains (2L+1)*d.
"""

from __future__ import annotations

import torch

from megalite.config import ModelConfig
from megalite.model.llama import Llama


def count_params(cfg: ModelConfig, *, exclude_embeddings: bool = False) -> int:
    """Parameters of `Llama(cfg)`, built on the meta device; tied weights count once.

    exclude_embeddings drops every vocab x dim matrix (the embedding and the head, tied or not),
    giving Kaplan et al.'s "non-embedding" N.
    """
    with torch.device("meta"):
        model = Llama(cfg)
    vocab_tables = {id(model.embed.weight), id(model.head.weight)}
    return sum(
        p.numel()
        for p in model.parameters()  # yields a tied parameter once
        if not (exclude_embeddings and id(p) in vocab_tables)
    )


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Exact training (forward + backward) matmul FLOPs per token at `seq_len`; see module doc."""
    d, f, s = cfg.dim, cfg.ffn_dim, seq_len
    a = cfg.n_heads * cfg.head_dim
    g = cfg.n_kv_heads * cfg.head_dim
    projections = 2 * d * a + 2 * 2 * d * g + 2 * a * d  # q, k and v, o
    mlp = 3 * 2 * d * f  # w1, w3, w2
    scores_and_mix = 2 * 2 * s * a  # q.k^T and probs @ v over the full s x s
    head = 2 * d * cfg.vocab_size
    forward = cfg.n_layers * (projections + mlp + scores_and_mix) + head
    return float(3 * forward)


def flops_per_token_6n(cfg: ModelConfig) -> float:
    """6 * N with N = non-embedding parameters + the head matrix (counted even when tied)."""
    n = count_params(cfg, exclude_embeddings=True) + cfg.vocab_size * cfg.dim
    return float(6 * n)
