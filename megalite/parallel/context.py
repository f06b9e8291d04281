"""Context parallelism: one sequence split over the ranks of a cp group, and the attention that
still sees the whole of it.

Two implementations behind `context_attention` (`parallel.cp_impl`):
- ring: the sequence is cut into 2 * cp chunks and cp rank r holds chunks r and 2 * cp - 1 - r
  (the causal load-balanced, "zigzag" split: every rank has the same causal work). K/V blocks go
  round the ring with point-to-point ops, the next transfer overlapping this block's compute, and
  the blocks' softmaxes are merged by their log-sum-exp in fp32. The backward is its own ring pass:
  K/V go round again and each block's dK/dV travel with it back to its owner, so no rank holds more
  than two K/V blocks at once (memory O(s_local)). Any head count works, GQA included (K/V travel
  with n_kv_heads).
- ulysses: the contiguous split; an all-to-all turns the sequence split into a head split, each
  rank runs the ordinary full causal `ops.attention` (flash-attn on GPU) on cp-th of the heads,
  and an all-to-all turns it back. Needs n_heads divisible by cp.

Positions for rotary embeddings come from `positions`; `split_sequence` / `gather_sequence` cut
and rebuild full tensors in either layout. Document masks are not supported under cp (a packed
window's tokens attend across document boundaries there).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from megalite.model import ops

CP_IMPLS = ("ring", "ulysses")
_KV_TAG, _DKV_TAG = 0, 1  # the two kinds of messages on the ring (gloo matches sends by tag)


# --- layouts ----------------------------------------------------------------------------------


def sequence_ranges(s: int, cp_rank: int, cp_size: int, *, balanced: bool) -> list[tuple[int, int]]:
    """The [start, end) ranges of the global sequence that cp rank `cp_rank` holds, in local
    order: chunks r and 2 * cp - 1 - r of 2 * cp when `balanced` (ring), else the r-th of cp."""
    parts = 2 * cp_size if balanced else cp_size
    if s % parts != 0:
        layout = "balanced (ring)" if balanced else "contiguous (ulysses)"
        raise ValueError(f"sequence length {s} must divide by {parts} for the {layout} cp split")
    chunk = s // parts
    chunks = [cp_rank, parts - 1 - cp_rank] if balanced else [cp_rank]
    return [(c * chunk, (c + 1) * chunk) for c in chunks]


def positions(
    s: int,
    cp_rank: int,
    cp_size: int,
    *,
    balanced: bool,
    device: torch.device | None = None,
) -> torch.Tensor:
    """The global positions (s_local,) of this rank's tokens, for rotary embeddings."""
    ranges = sequence_ranges(s, cp_rank, cp_size, balanced=balanced)
    return torch.cat([torch.arange(a, b, device=device) for a, b in ranges])


def split_sequence(
    x: torch.Tensor, dim: int, cp_rank: int, cp_size: int, *, balanced: bool
) -> torch.Tensor:
    """This rank's part of the full-sequence tensor `x` along `dim` (s -> s / cp)."""
    ranges = sequence_ranges(x.shape[dim], cp_rank, cp_size, balanced=balanced)
    return torch.cat([x.narrow(dim, a, b - a) for a, b in ranges], dim=dim)


def merge_parts(parts: list[torch.Tensor], dim: int, *, balanced: bool) -> torch.Tensor:
    """The full sequence from every cp rank's part (in cp-rank order): `split_sequence`'s
    inverse."""
    cp_size = len(parts)
    if not balanced:
        return torch.cat(parts, dim=dim)
    halves = [p.chunk(2, dim=dim) for p in parts]  # rank r: (chunk r, chunk 2 cp - 1 - r)
    firsts = [h[0] for h in halves]
    seconds = [halves[r][1] for r in reversed(range(cp_size))]
    return torch.cat(firsts + seconds, dim=dim)


def gather_sequence(
    x_local: torch.Tensor, dim: int, group: dist.ProcessGroup, *, balanced: bool
) -> torch.Tensor:
    """The full sequence on every rank of `group`: all-gather, then reorder. Not differentiable
    (for checks, logging and evaluation)."""
    parts = [torch.empty_like(x_local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x_local.contiguous(), group=group)
    return merge_parts(parts, dim, balanced=balanced)


# --- entry point ------------------------------------------------------------------------------


def context_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    impl: str,
    group: dist.ProcessGroup,
) -> torch.Tensor:
    """Causal attention over the whole sequence from this rank's part of it.

    q is (b, n_heads, s_local, hd), k and v are (b, n_kv_heads, s_local, hd), laid out as
    `split_sequence` cuts them (balanced for ring, contiguous for ulysses); returns this rank's
    output (b, n_heads, s_local, hd) in the same layout. No document masks.
    """
    if impl == "ring":
        return ring_attention(q, k, v, group)
    if impl == "ulysses":
        return ulysses_attention(q, k, v, group)
    raise ValueError(f"parallel.cp_impl={impl!r}: use one of {CP_IMPLS}")


# --- ring attention ---------------------------------------------------------------------------


class _Pending:
    """A receive in flight: `wait()` returns its buffer once it has landed."""

    def __init__(self, buffer: torch.Tensor, works: list[Any]) -> None:
        self.buffer, self.works = buffer, works

    def wait(self) -> torch.Tensor:
        """The received tensor; the finished works are dropped (a send's work holds the tensor
        sent, which would otherwise stay alive as long as this object)."""
        for work in self.works:
            work.wait()
        self.works = []
        return self.buffer


class _Ring:
    """The cp group as a ring: each rank sends to the next and receives from the previous."""

    def __init__(self, group: dist.ProcessGroup) -> None:
        self.group = group
        self.rank, self.size = dist.get_rank(group), dist.get_world_size(group)
        self.next = dist.get_global_rank(group, (self.rank + 1) % self.size)
        self.prev = dist.get_global_rank(group, (self.rank - 1) % self.size)

    def exchange(self, tensor: torch.Tensor, tag: int) -> _Pending:
        """Start sending `tensor` to the next rank and receiving the previous rank's tensor of
        the same shape; the two ops go in one batch (NCCL needs that to not deadlock)."""
        if self.size == 1:
            return _Pending(tensor, [])
        received = torch.empty_like(tensor)
        ops_ = [
            dist.P2POp(dist.isend, tensor, self.next, group=self.group, tag=tag),
            dist.P2POp(dist.irecv, received, self.prev, group=self.group, tag=tag),
        ]
        return _Pending(received, list(dist.batch_isend_irecv(ops_)))


def _chunks_of(cp_rank: int, cp_size: int) -> tuple[int, int]:
    """The global indices (of 2 * cp chunks) of the two chunks cp rank `cp_rank` holds."""
    return cp_rank, 2 * cp_size - 1 - cp_rank


def visible_blocks(q_rank: int, kv_rank: int, cp_size: int) -> list[tuple[int, int, bool]]:
    """The (query half, kv half, causal) blocks that need computing when `q_rank`'s queries meet
    `kv_rank`'s keys: a query chunk sees an earlier chunk fully, its own causally and a later
    one not at all (skipped). Halves are 0 / 1, the local order of the two chunks."""
    q_chunks, kv_chunks = _chunks_of(q_rank, cp_size), _chunks_of(kv_rank, cp_size)
    return [
        (qi, ki, a == c)
        for qi, a in enumerate(q_chunks)
        for ki, c in enumerate(kv_chunks)
        if c <= a
    ]


def _grouped(x: torch.Tensor, n_kv_heads: int, dtype: torch.dtype) -> torch.Tensor:
    """(b, n_heads, c, hd) -> (b, n_kv_heads, groups * c, hd): the query heads that share a kv
    head stacked along the rows, so GQA needs no expanded K/V (head i reads kv head i // groups)."""
    b, n_heads, c, hd = x.shape
    return x.reshape(b, n_kv_heads, n_heads // n_kv_heads * c, hd).to(dtype)


def _ungrouped(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """`_grouped`'s inverse: (b, n_kv_heads, groups * c, hd) -> (b, n_heads, c, hd)."""
    b, n_kv_heads, rows, hd = x.shape
    return x.reshape(b, n_heads, rows * n_kv_heads // n_heads, hd)


def _scores(q: torch.Tensor, k: torch.Tensor, *, causal: bool, scale: float) -> torch.Tensor:
    """Scaled scores (b, kv, g * c, c) of grouped queries (b, kv, g * c, hd) against keys
    (b, kv, c, hd), the future masked to -inf when the block is on the diagonal."""
    scores = q @ k.transpose(-1, -2) * scale  # (b, kv, g * c, c)
    if causal:
        c = k.shape[2]
        future = torch.ones(c, c, dtype=torch.bool, device=q.device).triu(1)  # (c, c)
        scores.masked_fill_(future.repeat(q.shape[2] // c, 1), float("-inf"))  # (g * c, c)
    return scores


def _block_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """One block's output (b, kv, g * c, hd) and log-sum-exp (b, kv, g * c)."""
    scores = _scores(q, k, causal=causal, scale=scale)  # (b, kv, g * c, c)
    lse = torch.logsumexp(scores, dim=-1)  # (b, kv, g * c)
    return torch.exp(scores - lse.unsqueeze(-1)) @ v, lse


def _merge(
    acc: tuple[torch.Tensor, torch.Tensor] | None, block: tuple[torch.Tensor, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Two partial softmax attentions over disjoint keys combined into one by their LSEs."""
    if acc is None:
        return block
    (out, lse), (b_out, b_lse) = acc, block
    new_lse = torch.logaddexp(lse, b_lse)  # (b, kv, g * c)
    out = out * torch.exp(lse - new_lse).unsqueeze(-1)
    out = out + b_out * torch.exp(b_lse - new_lse).unsqueeze(-1)
    return out, new_lse


def _block_backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dout: torch.Tensor,
    lse: torch.Tensor,
    delta: torch.Tensor,
    *,
    causal: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One block's (dq, dk, dv), shaped like (q, k, v), from the final LSE and delta =
    rowsum(dout * out), both (b, kv, g * c): the flash-attention backward."""
    p = torch.exp(_scores(q, k, causal=causal, scale=scale) - lse.unsqueeze(-1))  # (b, kv, gc, c)
    dv = p.transpose(-1, -2) @ dout  # (b, kv, c, hd)
    ds = p * (dout @ v.transpose(-1, -2) - delta.unsqueeze(-1))  # (b, kv, g * c, c)
    return ds @ k * scale, ds.transpose(-1, -2) @ q * scale, dv


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _ring_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ring: _Ring
) -> tuple[torch.Tensor, torch.Tensor]:
    """The output (b, n_heads, s_local, hd) and the LSE (2, b, kv, g * c) of each query half."""
    n_heads, n_kv_heads = q.shape[1], k.shape[1]
    scale, acc_dtype = q.shape[-1] ** -0.5, _acc_dtype(q.dtype)
    q_halves = [_grouped(h, n_kv_heads, acc_dtype) for h in q.chunk(2, dim=2)]  # (b, kv, gc, hd)
    acc: list[tuple[torch.Tensor, torch.Tensor] | None] = [None, None]
    kv = torch.stack([k, v])  # (2, b, kv, s_local, hd): what travels
    for step in range(ring.size):
        pending = ring.exchange(kv, _KV_TAG) if step + 1 < ring.size else None
        blocks = visible_blocks(ring.rank, (ring.rank - step) % ring.size, ring.size)
        _forward_step(q_halves, kv, blocks, acc, scale=scale)
        if pending is not None:
            kv = pending.wait()  # the block just used is freed: two alive at most
    halves = [a for a in acc if a is not None]  # step 0 gave each half its diagonal block
    out = torch.cat([_ungrouped(o, n_heads) for o, _ in halves], dim=2).to(q.dtype)
    return out, torch.stack([lse for _, lse in halves])


def _forward_step(
    q_halves: list[torch.Tensor],
    kv: torch.Tensor,
    blocks: list[tuple[int, int, bool]],
    acc: list[tuple[torch.Tensor, torch.Tensor] | None],
    *,
    scale: float,
) -> None:
    """Merge the visible blocks of one travelling K/V (2, b, kv, s_local, hd) into `acc`, each
    query half's (output, LSE). A function of its own so that nothing of `kv` outlives it."""
    k, v = kv.to(q_halves[0].dtype)  # (b, kv, s_local, hd) each
    ks, vs = k.chunk(2, dim=2), v.chunk(2, dim=2)  # (b, kv, c, hd) each
    for qi, ki, causal in blocks:
        block = _block_forward(q_halves[qi], ks[ki], vs[ki], causal=causal, scale=scale)
        acc[qi] = _merge(acc[qi], block)


@dataclass
class _Queries:
    """What the backward keeps of this rank's queries, per query half, grouped (b, kv, g * c, .):
    q, the upstream gradient, the LSE, delta = rowsum(dout * out) and the dq accumulators."""

    q: list[torch.Tensor]
    dout: list[torch.Tensor]
    lse: torch.Tensor
    delta: list[torch.Tensor]
    dq: list[torch.Tensor]
    scale: float


def _ring_backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    dout: torch.Tensor,
    ring: _Ring,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of this rank's q, k, v: K/V go round the ring once more, and the dK/dV of
    each block travel with it, each rank adding its part, until they are back with the owner."""
    n_heads, n_kv_heads, acc_dtype = q.shape[1], k.shape[1], _acc_dtype(q.dtype)

    def halves(x: torch.Tensor) -> list[torch.Tensor]:  # (b, h, s_local, hd) -> 2 x (b, kv, gc, hd)
        return [_grouped(h, n_kv_heads, acc_dtype) for h in x.chunk(2, dim=2)]

    q_h, dout_h = halves(q), halves(dout)
    delta = [(d * o).sum(-1) for d, o in zip(dout_h, halves(out), strict=True)]  # (b, kv, gc)
    queries = _Queries(
        q_h, dout_h, lse, delta, [torch.zeros_like(h) for h in q_h], q.shape[-1] ** -0.5
    )
    kv = torch.stack([k, v])  # (2, b, kv, s_local, hd)
    dkv_pending: _Pending | None = None
    for step in range(ring.size):
        pending = ring.exchange(kv, _KV_TAG) if step + 1 < ring.size else None
        blocks = visible_blocks(ring.rank, (ring.rank - step) % ring.size, ring.size)
        dkv = _backward_step(queries, kv, blocks)  # this block's dK/dV from our queries
        if dkv_pending is not None:  # plus what the ranks before added
            dkv += dkv_pending.wait()
        dkv_pending = ring.exchange(dkv, _DKV_TAG)
        del dkv
        if pending is not None:
            kv = pending.wait()
    assert dkv_pending is not None
    dkv = dkv_pending.wait()  # our own block's, back from the whole ring
    dq = torch.cat([_ungrouped(d, n_heads) for d in queries.dq], dim=2)
    return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype)


def _backward_step(
    queries: _Queries, kv: torch.Tensor, blocks: list[tuple[int, int, bool]]
) -> torch.Tensor:
    """Add one travelling K/V block's part of dq into `queries.dq` and return its dK/dV from
    this rank's queries (2, b, kv, s_local, hd) in the accumulators' dtype."""
    dtype = queries.q[0].dtype
    k, v = kv.to(dtype)  # (b, kv, s_local, hd) each
    c = k.shape[2] // 2
    ks, vs = k.chunk(2, dim=2), v.chunk(2, dim=2)  # (b, kv, c, hd) each
    dkv = torch.zeros(kv.shape, dtype=dtype, device=kv.device)  # (2, b, kv, s_local, hd)
    for qi, ki, causal in blocks:
        dq, dk, dv = _block_backward(
            queries.q[qi], ks[ki], vs[ki], queries.dout[qi], queries.lse[qi], queries.delta[qi],
            causal=causal, scale=queries.scale,
        )  # fmt: skip
        queries.dq[qi] += dq
        dkv[0, :, :, ki * c : (ki + 1) * c] += dk
        dkv[1, :, :, ki * c : (ki + 1) * c] += dv
    return dkv


class _RingAttention(torch.autograd.Function):
    """Ring attention with a hand-written ring backward; saves only local tensors (q, k, v, the
    output and the LSE), never another rank's K/V."""

    @staticmethod
    def forward(
        ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: dist.ProcessGroup
    ) -> torch.Tensor:
        ring = _Ring(group)
        out, lse = _ring_forward(q, k, v, ring)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.ring = ring
        return out

    @staticmethod
    def backward(
        ctx: Any, dout: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, None]:
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = _ring_backward(q, k, v, out, lse, dout.contiguous(), ctx.ring)
        return dq, dk, dv, None


def ring_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: dist.ProcessGroup
) -> torch.Tensor:
    """Causal attention over the whole sequence, the sequence split in the balanced layout.

    q is (b, n_heads, s_local, hd), k and v (b, n_kv_heads, s_local, hd) with n_kv_heads dividing
    n_heads; returns (b, n_heads, s_local, hd). The math is torch matmuls with fp32 (or fp64)
    accumulators on every device: flash-attn's LSE-returning kernels are not used (untested here),
    so on GPU this path is correct but slower than ulysses' flash-attn.
    """
    if q.shape[2] % 2 != 0:
        raise ValueError(f"ring attention needs an even local sequence, got {q.shape[2]}")
    if q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"{q.shape[1]} query heads cannot share {k.shape[1]} kv heads evenly")
    out: torch.Tensor = _RingAttention.apply(q, k, v, group)
    return out


# --- ulysses ----------------------------------------------------------------------------------


def _local_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """`ops.attention` on DeepSpeed's (b, s, heads, hd) layout."""
    out = ops.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))  # (b, h, s, hd)
    return out.transpose(1, 2)  # (b, s, h, hd)


def kv_repeats(n_heads: int, n_kv_heads: int, cp_size: int) -> int:
    """How many times ulysses repeats each kv head so that the kv heads divide by cp (each rank
    then gets whole query groups with their kv heads); raises where the query heads do not."""
    if n_heads % cp_size != 0:
        raise ValueError(
            f"cp_impl=ulysses splits the {n_heads} attention heads over cp={cp_size} ranks, "
            "which does not divide them: use parallel.cp_impl=ring (or a cp dividing n_heads)"
        )
    return cp_size // math.gcd(n_kv_heads, cp_size)


def ulysses_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: dist.ProcessGroup
) -> torch.Tensor:
    """Causal attention over the whole sequence, the sequence split contiguously: all-to-alls
    to a head split and back around the ordinary `ops.attention`.

    q is (b, n_heads, s_local, hd), k and v (b, n_kv_heads, s_local, hd); returns (b, n_heads,
    s_local, hd). The all-to-alls are DeepSpeed's `DistributedAttention` (on its (b, s, heads, hd)
    layout: scatter the heads, dim 2, gather the sequence, dim 1), which needs DeepSpeed's comm
    layer initialised (`deepspeed.init_distributed`, as the trainer does). Its autograd is a
    pair of all-to-alls (each the other's backward). K/V heads are repeated up to a multiple of
    cp first, which keeps DeepSpeed on its even path (its uneven one reads DeepSpeed's global
    sequence-parallel group, not `group`).
    """
    import deepspeed.comm
    from deepspeed.sequence.layer import DistributedAttention

    repeats = kv_repeats(q.shape[1], k.shape[1], dist.get_world_size(group))
    if not deepspeed.comm.is_initialized():
        raise RuntimeError("cp_impl=ulysses needs deepspeed.init_distributed() before attention")
    if repeats > 1:  # kv head j -> j * repeats ... (j + 1) * repeats - 1, grouping kept
        k = k.repeat_interleave(repeats, dim=1)  # (b, n_kv_heads * repeats, s_local, hd)
        v = v.repeat_interleave(repeats, dim=1)
    local: Callable[..., torch.Tensor] = _local_attention
    attn = DistributedAttention(local, group, scatter_idx=2, gather_idx=1)
    out = attn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), batch_dim_idx=0)
    return out.transpose(1, 2)  # (b, n_heads, s_local, hd)
