"""A plain Llama-style decoder: RMSNorm, rotary embeddings, grouped-query attention, SwiGLU.

The model knows nothing of ranks: tensor and pipeline parallelism are applied from outside by
replacing its `nn.Linear` layers and cutting `layers`, a flat list of identical blocks. Head counts
are read off the projection widths at run time, so a block whose projections were sharded keeps
working. The parameter set is exactly Llama's (embed, per layer wq wk wv wo w1 w2 w3 and two norms,
final norm, head unless tied), with no biases and no dropout, and RoPE uses Hugging Face's
rotate-half layout, so a conversion to `LlamaForCausalLM` is a renaming of tensors.

Every rotary table is one `RotaryEmbedding` shared by all attention layers: a pipeline stage cut
from `layers` is self-contained, yet the tables exist once.

For generation, `Llama.forward(tokens, cache=KVCache(...))` runs the new tokens only, attending
to the keys and values of the earlier ones kept in the cache; without a cache (training) the ops
are exactly those of the plain forward.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from megalite.config import ModelConfig
from megalite.kernels.reference import apply_rotary as apply_rotary  # re-exported: RoPE reference
from megalite.model import ops
from megalite.model.documents import Documents, find_documents

IGNORE_INDEX = -100


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned gain and no bias (see `ops.rms_norm`)."""

    def __init__(self, dim: int, *, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(x, self.weight, self.eps)  # (..., dim)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for positions [0, max_seq_len), in Hugging Face's rotate-half layout.

    The tables are computed in fp32 and kept as non-persistent buffers (rebuilt by `init_tables`,
    never checkpointed). `apply_rotary` casts them to the activations' dtype, as HF does; if the
    model is cast to bf16 the tables are rounded the same way.

    `local_positions`, None in the plain model, is set where the sequence is split over ranks
    (context parallelism, `parallelize.apply_cp`): it maps a rank's local length s to the global
    positions (s,) of its tokens, which `forward` then returns the tables of.
    """

    cos: torch.Tensor  # (max_seq_len, head_dim) fp32
    sin: torch.Tensor  # (max_seq_len, head_dim) fp32

    def __init__(self, head_dim: int, *, max_seq_len: int, theta: float) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.theta = theta
        self.local_positions: Callable[[int, torch.device], torch.Tensor] | None = None
        shape = (max_seq_len, head_dim)
        self.register_buffer("cos", torch.empty(shape, dtype=torch.float32), persistent=False)
        self.register_buffer("sin", torch.empty(shape, dtype=torch.float32), persistent=False)

    @torch.no_grad()
    def init_tables(self, device: torch.device | None = None) -> None:
        """Compute the tables, on `device` (default: where they are; from meta, one must be
        given). New tensors: no meta tensor is touched (that would import torch's compiler)."""
        device = self.cos.device if device is None else device
        d = self.head_dim
        inv_freq = 1.0 / (
            self.theta ** (torch.arange(0, d, 2, dtype=torch.int64, device=device).float() / d)
        )  # (d/2,)
        positions = torch.arange(self.cos.shape[0], device=device).float()  # (s_max,)
        angles = torch.outer(positions, inv_freq)  # (s_max, d/2)
        angles = torch.cat((angles, angles), dim=-1)  # (s_max, d)
        self.cos, self.sin = angles.cos(), angles.sin()

    def forward(self, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The tables for positions [0, seq_len), or for `local_positions(seq_len)` where it is
        set: two (seq_len, head_dim) fp32 tensors."""
        if self.local_positions is not None:
            positions = self.local_positions(seq_len, self.cos.device)  # (seq_len,)
            return self.cos[positions], self.sin[positions]
        if seq_len > self.cos.shape[0]:
            raise ValueError(f"sequence length {seq_len} exceeds max_seq_len {self.cos.shape[0]}")
        return self.cos[:seq_len], self.sin[:seq_len]

    def at(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The tables at per-token positions (b, s): two (b, 1, s, head_dim) fp32 tensors."""
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)


class KVCache:
    """The keys and values of the tokens seen so far, per layer, for incremental decoding.

    `Llama.forward(tokens, cache=c)` takes tokens (b, s) as the next s positions of each of the b
    sequences: it appends their keys and values to every layer (buffers (b, n_kv_heads, max_len,
    head_dim), allocated on first use in the activations' dtype) and advances `length` by s.
    `pad` (b,) counts each sequence's left padding: those key slots are never attended to (a pad
    query sees only itself, so no row is empty), and rotary positions are shifted so that each
    sequence's first real token is at position 0 — Hugging Face's `generate` with an attention
    mask does the same. pad None: no padding.
    """

    def __init__(self, *, max_len: int, pad: torch.Tensor | None = None) -> None:
        self.max_len = max_len
        self.pad = pad  # (b,) int64, or None
        self.length = 0
        self.k: dict[int, torch.Tensor] = {}  # layer -> (b, n_kv_heads, max_len, hd)
        self.v: dict[int, torch.Tensor] = {}
        self.positions: torch.Tensor | None = None  # (b, s) of the chunk being run
        self.mask: torch.Tensor | None = None  # (b, 1, s, length + s) bool: True = attend

    def begin(self, b: int, s: int, device: torch.device) -> None:
        """Prepare the rotary positions and attention mask of a chunk of s new tokens."""
        start, end = self.length, self.length + s
        if end > self.max_len:
            raise ValueError(f"cache of {self.max_len} positions cannot take {end}")
        q_pos = torch.arange(start, end, device=device)  # (s,)
        k_pos = torch.arange(end, device=device)  # (end,)
        pad = torch.zeros(b, dtype=torch.long, device=device) if self.pad is None else self.pad
        self.positions = (q_pos[None, :] - pad[:, None]).clamp(min=0)  # (b, s)
        if self.pad is None and s == 1:
            self.mask = None  # one new token attends to all before it
            return
        causal = k_pos[None, :] <= q_pos[:, None]  # (s, end)
        real = k_pos[None, :] >= pad[:, None]  # (b, end)
        itself = k_pos[None, :] == q_pos[:, None]  # (s, end)
        mask = causal[None] & (real[:, None, :] | itself[None])  # (b, s, end)
        self.mask = mask.unsqueeze(1)  # (b, 1, s, end)

    def append(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store layer's new k, v (b, n_kv_heads, s, hd); returns all of its k, v so far."""
        if layer not in self.k:
            shape = (k.shape[0], k.shape[1], self.max_len, k.shape[3])
            self.k[layer] = k.new_zeros(shape)
            self.v[layer] = v.new_zeros(shape)
        end = self.length + k.shape[2]
        self.k[layer][:, :, self.length : end] = k
        self.v[layer][:, :, self.length : end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]  # (b, n_kv_heads, end, hd)

    def end(self, s: int) -> None:
        self.length += s
        self.positions = self.mask = None


# What a block's attention sees besides its input: the documents of packed windows
# (data.document_mask), the cache of earlier tokens (generation), or neither (one sequence per row).
Context = Documents | KVCache | None


def _cached_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
) -> torch.Tensor:
    """Softmax attention of q (b, n_heads, s, hd) over k, v (b, n_kv_heads, t, hd) under `mask`
    (b, 1, s, t) bool, or none: every query sees every key. Returns (b, n_heads, s, hd)."""
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)  # (b, n_heads, t, hd)
        v = v.repeat_interleave(groups, dim=1)  # (b, n_heads, t, hd)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (b, n_heads, s, hd)


class Attention(nn.Module):
    """Causal grouped-query self-attention; n_kv_heads divides n_heads."""

    def __init__(self, cfg: ModelConfig, rope: RotaryEmbedding, *, layer_index: int = 0) -> None:
        super().__init__()
        self.head_dim = cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        self.rope = rope
        self.layer_index = layer_index  # its place in Llama.layers: its KVCache buffers
        # The attention core, a swappable function (selective activation checkpointing wraps it).
        self.core: Callable[..., torch.Tensor] = ops.attention

    def forward(self, x: torch.Tensor, context: Context = None) -> torch.Tensor:
        b, s, _ = x.shape  # (b, s, dim)
        q = self.wq(x).view(b, s, -1, self.head_dim).transpose(1, 2)  # (b, n_heads, s, hd)
        k = self.wk(x).view(b, s, -1, self.head_dim).transpose(1, 2)  # (b, n_kv_heads, s, hd)
        v = self.wv(x).view(b, s, -1, self.head_dim).transpose(1, 2)  # (b, n_kv_heads, s, hd)
        if isinstance(context, KVCache):
            return self._cached(q, k, v, context)
        documents = context
        if documents is None:
            cos, sin = self.rope(s)  # (s, hd)
        else:
            cos, sin = self.rope.at(documents.positions)  # (b, 1, s, hd)
        q, k = ops.rotary_qk(q, k, cos, sin)  # (b, heads, s, hd) each
        out = self.core(q, k, v, documents)  # (b, n_heads, s, hd)
        return self.wo(out.transpose(1, 2).reshape(b, s, -1))  # (b, s, dim)

    def _cached(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: KVCache
    ) -> torch.Tensor:
        """The attention of new tokens over the cache and themselves (see `KVCache`)."""
        b, _, s, _ = q.shape  # (b, n_heads, s, hd)
        assert cache.positions is not None  # KVCache.begin ran
        cos, sin = self.rope.at(cache.positions)  # (b, 1, s, hd)
        q, k = ops.rotary_qk(q, k, cos, sin)  # (b, heads, s, hd) each
        k, v = cache.append(self.layer_index, k, v)  # (b, n_kv_heads, length + s, hd)
        out = _cached_attention(q, k, v, cache.mask)  # (b, n_heads, s, hd)
        return self.wo(out.transpose(1, 2).reshape(b, s, -1))  # (b, s, dim)


class MLP(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x), w1 the gate, w3 the up and w2 the down projection."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.w3 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.w2 = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = ops.swiglu(self.w1(x), self.w3(x))  # (b, s, ffn_dim)
        return self.w2(gate)  # (b, s, dim)


class TransformerBlock(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then + mlp(norm(.)). Maps (b, s, dim) to (b, s, dim)."""

    def __init__(self, cfg: ModelConfig, rope: RotaryEmbedding, *, layer_index: int = 0) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.attn = Attention(cfg, rope, layer_index=layer_index)
        self.mlp_norm = RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, context: Context = None) -> torch.Tensor:
        h = x + self.attn(self.attn_norm(x), context)  # (b, s, dim)
        return h + self.mlp(self.mlp_norm(h))  # (b, s, dim)


class Llama(nn.Module):
    """The decoder: `embed`, `layers` (a flat ModuleList of TransformerBlock), `norm`, `head`.

    Construction allocates on meta, then (unless `device` is meta) materialises on `device`
    (default: torch's current default device) and fills every parameter from `seed` by
    `megalite.model.init`: each unit of each weight has its own generator, so a rank that builds
    only its shard (`megalite.parallel.build`) draws exactly these values. The global RNG is never
    touched.
    """

    def __init__(
        self, cfg: ModelConfig, *, seed: int = 0, device: torch.device | str | None = None
    ) -> None:
        super().__init__()
        self.cfg = cfg
        # data.document_mask: the end-of-document id that ends each document of a window; None
        # (the default): a window is one sequence.
        self.document_eod: int | None = None
        with torch.device("meta"):
            self.rope = RotaryEmbedding(
                cfg.head_dim, max_seq_len=cfg.max_seq_len, theta=cfg.rope_theta
            )
            # A weight given skips nn.Embedding's own init, whose normal_ on meta imports
            # torch's compiler stack (2 s a process).
            weight = torch.empty(cfg.vocab_size, cfg.dim)
            self.embed = nn.Embedding(cfg.vocab_size, cfg.dim, _weight=weight)
            self.layers = nn.ModuleList(
                TransformerBlock(cfg, self.rope, layer_index=i) for i in range(cfg.n_layers)
            )
            self.norm = RMSNorm(cfg.dim, eps=cfg.norm_eps)
            self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self._tie()
        device = torch.get_default_device() if device is None else torch.device(device)
        if device.type != "meta":
            self.to_empty(device=device)
            self.init_weights(seed)

    def _tie(self) -> None:
        if self.cfg.tie_embeddings:
            self.head.weight = self.embed.weight

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        """Fill every parameter from `seed` (see `megalite.model.init`) and the rotary tables.
        Re-ties the head to the embedding (`to_empty` breaks the tie)."""
        from megalite.model.init import draw_into, init_rules

        self._tie()
        self.rope.init_tables()
        rules = init_rules(self.cfg, seed)
        for name, p in self.named_parameters():
            draw_into(p, rules[name], 0)

    def forward(self, tokens: torch.Tensor, *, cache: KVCache | None = None) -> torch.Tensor:
        """tokens (b, s) int64 -> logits (b, s, vocab_size) in the parameters' dtype. With
        `document_eod` set (data.document_mask), each document of a window is on its own. With
        a `cache`, tokens continue the sequences it holds (see `KVCache`), which it then holds
        too."""
        if cache is not None:
            return self._forward_cached(tokens, cache)
        documents = None if self.document_eod is None else find_documents(tokens, self.document_eod)
        h = self.embed(tokens)  # (b, s, dim)
        for layer in self.layers:
            h = layer(h, documents)  # (b, s, dim)
        return self.head(self.norm(h))  # (b, s, vocab_size)

    def _forward_cached(self, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
        if self.document_eod is not None:
            raise ValueError("a KV cache cannot be used with document_eod (data.document_mask)")
        b, s = tokens.shape
        cache.begin(b, s, tokens.device)
        h = self.embed(tokens)  # (b, s, dim)
        for layer in self.layers:
            h = layer(h, cache)  # (b, s, dim)
        cache.end(s)
        return self.head(self.norm(h))  # (b, s, vocab_size)


def cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, *, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """Mean next-token cross-entropy over targets != ignore_index, computed in fp32 (see
    `ops.cross_entropy`). logits (..., vocab) in any dtype; targets (...) int64, already shifted."""
    return ops.cross_entropy(logits, targets, ignore_index=ignore_index)
