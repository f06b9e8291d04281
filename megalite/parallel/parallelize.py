"""Apply tensor and context parallelism to a plain `Llama`, in place: the one place the model
meets ranks.

Applied to a model on the meta device (`parallel.build`, which then draws only this rank's
values), or to a built one (whose full tensors are cut; tests and tools). Each rank keeps its
slices, as `placement.TPShard` cuts them:

- attention: q heads split over TP; kv heads split too, or, when there are fewer kv heads than
  ranks (tp % n_kv_heads == 0), kv head `tp_rank // (tp / n_kv_heads)` replicated on each group of
  tp / n_kv_heads neighbouring ranks, its gradient summed over that group; `wo` row-parallel;
- MLP: gate and up fused column-parallel (`w13`), `w2` row-parallel;
- embedding and head: split over the vocabulary padded to a multiple of tp; padding rows are zero
  and masked out of the loss; the loss is the vocab-parallel cross-entropy;
- regions: one collective pair around attention, MLP and head: copy/all-reduce, or with sequence
  parallelism all-gather/reduce-scatter along the sequence, with norms and residuals sharded.

Context parallelism (`apply_cp`) shards no weight: the model takes the full window (b, s) and keeps
this cp rank's part of it (`context.split_sequence`: balanced for ring, contiguous for ulysses),
rotary embeddings use those tokens' global positions, every attention core becomes
`context.context_attention` over the cp group, and the loss takes the full targets and keeps the
same part, so it is the mean over this rank's tokens.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import torch
import torch.distributed as dist
from torch import nn

from megalite.model import ops
from megalite.model.documents import Documents
from megalite.model.llama import IGNORE_INDEX, Llama, TransformerBlock, cross_entropy
from megalite.parallel.context import context_attention, positions, split_sequence
from megalite.parallel.dims import ParallelDims
from megalite.parallel.placement import PlainNamed, TPShard, block_shards, kv_replicas, vocab_shard
from megalite.parallel.tensor import (
    copy_to_tp,
    gather_seq,
    reduce_from_tp,
    reduce_scatter_seq,
)
from megalite.parallel.tp_layers import (
    ParallelSwiGLU,
    SequenceParallelRMSNorm,
    ShardedLinear,
    VocabParallelEmbedding,
    mark,
)

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # the mean over trained targets


def weighted_loss(
    loss_fn: LossFn, logits: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor
) -> torch.Tensor:
    """`loss_fn`'s mean over this micro-batch's trained targets × `weight` (a () fp32 tensor on the
    logits' device), the micro-batch's share of its global batch (`data.loss_mask.loss_weights`):
    DeepSpeed's mean of these over micro-batches and DP ranks is then the mean over every trained
    target of the global batch, in the loss and in the gradients.

    Weight 1 (pretraining data) leaves the loss and its gradient as they are, bit for bit. Weight 0
    (no trained target here, whose mean is nan or 0 by the implementation) gives a zero loss that
    is still in the graph, with a zero gradient (each implementation's gradient of ignored rows)."""
    loss = loss_fn(logits, targets)  # ()
    return torch.where(weight > 0, loss, 0.0) * weight  # ()


@dataclass(frozen=True)
class TPPlan:
    """Sizes of this rank's shards."""

    tp: int
    tp_rank: int
    vocab_size: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int

    @property
    def padded_vocab(self) -> int:
        return math.ceil(self.vocab_size / self.tp) * self.tp

    @property
    def vocab_start(self) -> int:
        return self.tp_rank * self.padded_vocab // self.tp

    @property
    def kv_replicas(self) -> int:
        return kv_replicas(self.tp, self.n_kv_heads)

    def cut(self, shard: TPShard, *full: torch.Tensor) -> torch.Tensor:
        """This rank's shard of the full tensor(s) `full` (in `shard.names` order), a new tensor."""
        named = dict(zip(shard.names, full, strict=True))
        return shard.cut(named, tp=self.tp, rank=self.tp_rank)


def kv_replica_groups(dims: ParallelDims, replicas: int) -> dist.ProcessGroup | None:
    """The TP ranks sharing this rank's kv head (collective: every rank builds every group)."""
    if replicas == 1:
        return None
    mine = None
    for tp_ranks in dims.axis_ranks("tp"):
        for start in range(0, len(tp_ranks), replicas):
            ranks = tp_ranks[start : start + replicas]
            group = dist.new_group(ranks)
            if dims.global_rank in ranks:
                mine = group
    return mine


def apply_tp(model: Llama, dims: ParallelDims, *, sequence_parallel: bool) -> LossFn:
    """Shard `model` over the TP group in place; returns the loss function for its logits.

    With tp=1 the model is left untouched and the loss is the plain cross-entropy.
    """
    if dims.tp == 1:
        return cross_entropy
    cfg = model.cfg
    plan = TPPlan(
        tp=dims.tp,
        tp_rank=dims.tp_rank,
        vocab_size=cfg.vocab_size,
        n_heads=cfg.n_heads,
        n_kv_heads=cfg.n_kv_heads,
        head_dim=cfg.head_dim,
        ffn_dim=cfg.ffn_dim,
    )
    group = dims.group("tp")
    cut_model(model, plan, group=group, kv_group=kv_replica_groups(dims, plan.kv_replicas),
              sequence_parallel=sequence_parallel)  # fmt: skip
    entry, exit_ = region_collectives(sequence_parallel)
    for layer in model.layers:
        assert isinstance(layer, TransformerBlock)  # an nn.ModuleList types its items as Module
        _region(layer.attn, group, entry, exit_)
        _region(layer.mlp, group, entry, exit_)
        if sequence_parallel:
            layer.attn_norm = SequenceParallelRMSNorm(layer.attn_norm, group)
            layer.mlp_norm = SequenceParallelRMSNorm(layer.mlp_norm, group)
    if sequence_parallel:
        model.norm = SequenceParallelRMSNorm(model.norm, group)
    _region(model.head, group, entry, None)

    def loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return ops.cross_entropy(
            logits,
            targets,
            ignore_index=IGNORE_INDEX,
            group=group,
            vocab_start=plan.vocab_start,
            vocab_size=plan.vocab_size,
        )

    return loss


def apply_cp(model: Llama, dims: ParallelDims, *, impl: str, loss_fn: LossFn) -> LossFn:
    """Split each sequence over the cp group in place (see the module docstring); returns
    `loss_fn` taking the full targets (b, s). With cp=1 the model and `loss_fn` are untouched."""
    if dims.cp == 1:
        return loss_fn
    group, rank, size, balanced = dims.group("cp"), dims.cp_rank, dims.cp, impl == "ring"

    def local(x: torch.Tensor) -> torch.Tensor:  # (b, s, ...) -> (b, s / cp, ...)
        return split_sequence(x, 1, rank, size, balanced=balanced)

    @functools.cache
    def local_positions(s_local: int, device: torch.device) -> torch.Tensor:  # (s_local,)
        return positions(s_local * size, rank, size, balanced=balanced, device=device)

    def core(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, documents: Documents | None = None
    ) -> torch.Tensor:  # (b, heads, s / cp, hd) -> (b, n_heads, s / cp, hd)
        if documents is not None:
            raise ValueError("document masks do not run under context parallelism (parallel.cp)")
        return context_attention(q, k, v, impl=impl, group=group)

    model.rope.local_positions = local_positions
    for layer in model.layers:
        assert isinstance(layer, TransformerBlock)  # an nn.ModuleList types its items as Module
        layer.attn.core = core
    model.register_forward_pre_hook(lambda _m, args: (local(args[0]), *args[1:]))

    def loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return loss_fn(logits, local(targets))  # logits (b, s / cp, vocab), targets (b, s)

    return loss


@torch.no_grad()
def cut_model(
    model: Llama,
    plan: TPPlan,
    *,
    group: dist.ProcessGroup | None,
    kv_group: dist.ProcessGroup | None,
    sequence_parallel: bool,
) -> None:
    """Replace the model's embedding, head and block projections with this rank's shards (no
    hooks, no collectives: `apply_tp` adds those); on meta it allocates nothing."""
    _shard_vocab(model, plan, group, sequence_parallel)
    for i, layer in enumerate(model.layers):
        assert isinstance(layer, TransformerBlock)  # an nn.ModuleList types its items as Module
        _shard_block(layer, f"layers.{i}", plan, kv_group)


def region_collectives(sequence_parallel: bool) -> tuple[Callable, Callable]:
    """The (entry, exit) collectives of a TP region."""
    if sequence_parallel:
        return gather_seq, reduce_scatter_seq
    return copy_to_tp, reduce_from_tp


def head_entry(
    dims: ParallelDims, *, sequence_parallel: bool
) -> Callable[[torch.Tensor], torch.Tensor]:
    """What the head's input goes through (a pipeline's tied head applies it itself)."""
    if dims.tp == 1:
        return lambda h: h
    entry, _ = region_collectives(sequence_parallel)
    group = dims.group("tp")
    return lambda h: entry(h, group)


def _region(module: nn.Module, group, entry, exit_) -> None:
    """Run `module` between an entry and (optionally) an exit collective, via hooks, so its own
    forward and its parameter names stay those of the plain model."""
    module.register_forward_pre_hook(lambda _m, args: (entry(args[0], group), *args[1:]))
    if exit_ is not None:
        module.register_forward_hook(lambda _m, _args, out: exit_(out, group))


def _shard_vocab(model: Llama, plan: TPPlan, group, sequence_parallel: bool) -> None:
    shard = vocab_shard("embed.weight", plan.vocab_size)
    embed = VocabParallelEmbedding(
        plan.cut(shard, model.embed.weight),
        vocab_start=plan.vocab_start,
        group=group,
        sequence_parallel=sequence_parallel,
    )
    _replace(model, "embed", mark(embed, shard))
    if model.cfg.tie_embeddings:
        model.head = ShardedLinear(torch.empty(0, 0, device="meta"))
        model.head.weight = embed.weight
    else:
        shard = vocab_shard("head.weight", plan.vocab_size)
        model.head = ShardedLinear(plan.cut(shard, model.head.weight))
        mark(model.head, shard)


def _shard_block(layer: TransformerBlock, prefix: str, plan: TPPlan, kv_group) -> None:
    attn, mlp = layer.attn, layer.mlp
    shards = block_shards(prefix, kv_replicas=plan.kv_replicas)
    attn.wq = mark(ShardedLinear(plan.cut(shards["attn.wq"], attn.wq.weight)), shards["attn.wq"])
    first_replica = plan.tp_rank % plan.kv_replicas == 0
    for name in ("wk", "wv"):
        shard = shards[f"attn.{name}"]
        lin = ShardedLinear(plan.cut(shard, getattr(attn, name).weight), grad_group=kv_group)
        # A replicated kv head counts once in the gradient norm.
        setattr(attn, name, mark(lin, shard, counted=first_replica))
    attn.wo = mark(ShardedLinear(plan.cut(shards["attn.wo"], attn.wo.weight)), shards["attn.wo"])
    gate_up, down = shards["mlp.w13"], shards["mlp.w2"]
    swiglu = ParallelSwiGLU(
        plan.cut(gate_up, mlp.w1.weight, mlp.w3.weight), plan.cut(down, mlp.w2.weight)
    )
    mark(swiglu.w13, gate_up)
    mark(swiglu.w2, down)
    _replace(layer, "mlp", swiglu)


def _replace(parent: nn.Module, name: str, module: nn.Module) -> None:
    """Put a parallel module where the plain model has its plain one: same name, same forward
    contract, another class (which the plain model's attribute types do not name)."""
    setattr(parent, name, module)


def tag_plain_names(model: Llama) -> None:
    """Record each unsharded parameter's plain name on it (sharded ones carry `tp_shard`), so
    checkpoint tools can find it whatever module (e.g. a pipeline stage) holds it later."""
    for name, p in model.named_parameters():
        if getattr(p, "tp_shard", None) is None:
            cast(PlainNamed, p).plain_name = name


def shard_specs(model: nn.Module) -> dict[str, dict[str, object]]:
    """How this rank's TP-sharded parameters map to the plain model's tensors, keyed by the plain
    names (so a pipeline stage's module names do not matter); JSON-ready, for checkpoint
    metadata; empty for an unsharded model."""
    specs = {}
    for p in model.parameters():
        shard: TPShard | None = getattr(p, "tp_shard", None)
        if shard is not None:
            for name in shard.names:
                specs[name] = dataclasses.asdict(shard)
    return specs


def full_parameters(model: nn.Module, group: dist.ProcessGroup) -> dict[str, torch.Tensor]:
    """Every parameter gathered to the plain model's names and full shapes (vocabulary padding
    stripped). Collective over the TP group; for tests and conversion."""
    return _gather(model, group, grads=False)


def full_gradients(model: nn.Module, group: dist.ProcessGroup) -> dict[str, torch.Tensor]:
    """Like `full_parameters`, for the parameters' `.grad`."""
    return _gather(model, group, grads=True)


def _gather(model: nn.Module, group, *, grads: bool) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters():
        held = p.grad if grads else p
        assert held is not None, f"{name} has no gradient"
        t = held.detach()
        shard: TPShard | None = getattr(p, "tp_shard", None)
        if shard is None:
            out[name] = t.clone()
            continue
        parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, t.contiguous(), group=group)
        out.update(shard.merge(parts))
    return out
