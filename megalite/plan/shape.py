"""Each rank's parameter tensors, from a `ModelConfig`'s shape alone: pure arithmetic (as the
parameter counts and FLOPs of megalite/model/flops.py are), so every planning command answers in
milliseconds, without torch.

`stage_tensors` lists the parameters one rank holds after megalite/parallel shards the model:
tensor parallelism by placement's own cut (`block_shards`, `vocab_shard`: q/kv/o heads, the fused
gate-up `w13` and `w2` of the MLP, vocabulary padded to a multiple of tp), pipeline stages as in
pipeline.build_pipeline (`uniform`: blocks split evenly, the first stages taking one more;
embedding on the first stage, final norm and head on the last; a tied embedding held by both).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from megalite.config import ModelConfig
from megalite.model.flops import widths
from megalite.parallel.placement import block_shards, kv_replicas, vocab_shard

# ---------------------------------------------------------------------------------------------
# What one rank holds


@dataclass(frozen=True)
class RankTensor:
    name: str  # the parameter's name in the (TP-sharded, pipeline-less) model
    numel: int
    ndim: int


def stage_blocks(n_layers: int, pp: int, stage: int) -> range:
    """Block indices of pipeline stage `stage` (`uniform`): the first n_layers % pp stages hold
    one block more."""
    base, extra = divmod(n_layers, pp)
    start = stage * base + min(stage, extra)
    return range(start, start + base + (1 if stage < extra else 0))


def _block_matrices(cfg: ModelConfig, index: int) -> dict[str, tuple[int, int]]:
    """The full shapes of block `index`'s weight matrices, by plain name."""
    d, f = cfg.dim, cfg.ffn_dim
    a, g = widths(cfg)
    p = f"layers.{index}."
    shapes = {"attn.wq": (a, d), "attn.wk": (g, d), "attn.wv": (g, d), "attn.wo": (d, a)}
    shapes |= {"mlp.w1": (f, d), "mlp.w3": (f, d), "mlp.w2": (d, f)}
    return {f"{p}{name}.weight": shape for name, shape in shapes.items()}


def _tp_shapes(cfg: ModelConfig, tp: int, index: int) -> dict[str, tuple[int, ...]]:
    """Block `index`'s matrices on one TP rank, by the sharded module's name (placement's cut:
    gate and up fused as `mlp.w13` when tp > 1)."""
    full = _block_matrices(cfg, index)
    if tp == 1:
        return {name.removesuffix(".weight").split(".", 2)[2]: s for name, s in full.items()}
    shards = block_shards(f"layers.{index}", kv_replicas=kv_replicas(tp, cfg.n_kv_heads))
    return {
        module: shard.shape({n: full[n] for n in shard.names}, tp=tp, rank=0)
        for module, shard in shards.items()
    }


def kv_rows(cfg: ModelConfig, tp: int) -> int:
    """Rows of wk (and wv) on one TP rank: a slice of kv heads, or one whole kv head replicated
    over tp / n_kv_heads ranks when there are fewer kv heads than ranks."""
    return _tp_shapes(cfg, tp, 0)["attn.wk"][0]


def vocab_rows(cfg: ModelConfig, tp: int) -> int:
    """Rows of the embedding (and head) on one TP rank: the vocabulary padded to tp's multiple."""
    shard = vocab_shard("embed.weight", cfg.vocab_size)
    return shard.shape({"embed.weight": (cfg.vocab_size, cfg.dim)}, tp=tp, rank=0)[0]


def block_tensors(cfg: ModelConfig, tp: int, index: int) -> list[RankTensor]:
    """Block `index`'s parameters on one TP rank (all TP ranks hold equal sizes)."""
    p = f"layers.{index}."
    shapes = _tp_shapes(cfg, tp, index)
    out = []
    for part in ("attn", "mlp"):  # the model's order: each part's norm gain, then its matrices
        out.append(RankTensor(f"{p}{part}_norm.weight", cfg.dim, 1))
        out += [
            RankTensor(f"{p}{module}.weight", math.prod(shape), len(shape))
            for module, shape in shapes.items()
            if module.startswith(part + ".")
        ]
    return out


def stage_tensors(cfg: ModelConfig, *, tp: int, pp: int, stage: int) -> list[RankTensor]:
    """The parameters one rank of pipeline stage `stage` holds (all TP ranks hold equal sizes)."""
    first, last = stage == 0, stage == pp - 1
    vocab = vocab_rows(cfg, tp) * cfg.dim
    out: list[RankTensor] = []
    if first:
        out.append(RankTensor("embed.weight", vocab, 2))
    for i in stage_blocks(cfg.n_layers, pp, stage):
        out += block_tensors(cfg, tp, i)
    if last:
        out.append(RankTensor("norm.weight", cfg.dim, 1))
        if not cfg.tie_embeddings:
            out.append(RankTensor("head.weight", vocab, 2))
        elif not first:  # DeepSpeed's TiedLayerSpec keeps a copy of the embedding here
            out.append(RankTensor("tied_modules.embed.weight", vocab, 2))
    return out


def stage_param_count(cfg: ModelConfig, *, tp: int, pp: int, stage: int) -> int:
    """Sum of `stage_tensors`' numels, without listing them."""
    blocks = len(stage_blocks(cfg.n_layers, pp, stage))
    out = blocks * sum(t.numel for t in block_tensors(cfg, tp, 0))
    vocab = vocab_rows(cfg, tp) * cfg.dim
    first, last = stage == 0, stage == pp - 1
    if first:
        out += vocab
    if last:
        out += cfg.dim + (vocab if not cfg.tie_embeddings or not first else 0)
    return out
