"""Parameter counts and training FLOPs per token of a `ModelConfig`, from its shape alone: pure
arithmetic (no torch), so the planner uses it as the trainer's MFU does. `count_params` counts
the real model's parameters (built on meta) to check it.

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

from megalite.config import ModelConfig


def widths(cfg: ModelConfig) -> tuple[int, int]:
    """(q width a = n_heads * head_dim, kv width g = n_kv_heads * head_dim)."""
    return cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim


def block_params(cfg: ModelConfig) -> int:
    """Parameters of one transformer block: wq wk wv wo, w1 w2 w3, two norm gains."""
    d, f = cfg.dim, cfg.ffn_dim
    a, g = widths(cfg)
    return d * a + 2 * d * g + a * d + 3 * d * f + 2 * d


def param_count(cfg: ModelConfig, *, exclude_embeddings: bool = False) -> int:
    """Parameters of `Llama(cfg)`, tied weights once; `exclude_embeddings` drops every vocab x dim
    matrix (Kaplan et al.'s non-embedding N). Equals `count_params`."""
    vocab_tables = (1 if cfg.tie_embeddings else 2) * cfg.vocab_size * cfg.dim
    body = cfg.n_layers * block_params(cfg) + cfg.dim  # + final norm
    return body if exclude_embeddings else body + vocab_tables


def layer_flops_fwd(cfg: ModelConfig, seq_len: int) -> float:
    """Forward matmul FLOPs per token of one block: projections, MLP, scores and mix."""
    d, f = cfg.dim, cfg.ffn_dim
    a, g = widths(cfg)
    return 2 * d * a + 2 * 2 * d * g + 2 * a * d + 3 * 2 * d * f + attention_flops_fwd(cfg, seq_len)


def attention_flops_fwd(cfg: ModelConfig, seq_len: int) -> float:
    """Forward FLOPs per token of the attention core (q.k^T and probs @ v over the full s x s)."""
    return 2 * 2 * seq_len * widths(cfg)[0]


def head_flops_fwd(cfg: ModelConfig) -> float:
    return 2 * cfg.dim * cfg.vocab_size


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Exact training (forward + backward) matmul FLOPs per token at `seq_len`; see the module
    docstring."""
    return float(3 * (cfg.n_layers * layer_flops_fwd(cfg, seq_len) + head_flops_fwd(cfg)))


def flops_per_token_6n(cfg: ModelConfig) -> float:
    """6 * N with N = non-embedding parameters + the head matrix (counted even when tied)."""
    return float(6 * (param_count(cfg, exclude_embeddings=True) + cfg.vocab_size * cfg.dim))


def count_params(cfg: ModelConfig, *, exclude_embeddings: bool = False) -> int:
    """Parameters of `Llama(cfg)`, built on the meta device; tied weights count once.

    exclude_embeddings drops every vocab x dim matrix (the embedding and the head, tied or not),
    giving Kaplan et al.'s "non-embedding" N. The check of `param_count`.
    """
    from megalite.model.llama import Llama

    model = Llama(cfg, device="meta")
    vocab_tables = {id(model.embed.weight), id(model.head.weight)}
    return sum(
        p.numel()
        for p in model.parameters()  # yields a tied parameter once
        if not (exclude_embeddings and id(p) in vocab_tables)
    )
