"""Context-parallel attention against full causal attention on the whole sequence: outputs and
dq, dk, dv (gathered) for ring and ulysses at cp=2 (on two groups of non-neighbouring ranks, so
group and global ranks differ) and cp=4, GQA with fewer kv heads than cp, a head count cp does
not divide; ring attention's memory (what it saves, how many K/V blocks live at once); and the
layouts (split, gather, positions), which need no world."""

from __future__ import annotations

import weakref
from typing import Any

import pytest
import torch
import torch.distributed as dist

from megalite.model import ops
from megalite.parallel import context
from megalite.parallel.context import (
    context_attention,
    gather_sequence,
    kv_repeats,
    merge_parts,
    positions,
    ring_attention,
    sequence_ranges,
    split_sequence,
    visible_blocks,
)
from tests.distributed import run_world

B, HD = 2, 8  # batch, head_dim; the sequence is 8 tokens per cp rank
# (impl, n_heads, n_kv_heads, dtype), run at cp=2 and cp=4
CASES = [
    ("ring", 4, 2, torch.float64),
    ("ring", 4, 1, torch.float64),  # fewer kv heads than cp
    ("ring", 3, 3, torch.float64),  # heads not divisible by cp
    ("ring", 4, 4, torch.float32),
    ("ulysses", 4, 2, torch.float64),
    ("ulysses", 4, 1, torch.float64),  # kv heads repeated up to cp
    ("ulysses", 4, 4, torch.float32),
]


def _inputs(s: int, n_heads: int, n_kv_heads: int, dtype: torch.dtype) -> list[torch.Tensor]:
    """q, k, v and an upstream gradient, the same on every rank."""
    g = torch.Generator().manual_seed(1000 * n_heads + 10 * n_kv_heads + s)
    shapes = [(B, n_heads, s, HD), (B, n_kv_heads, s, HD), (B, n_kv_heads, s, HD)]
    shapes.append((B, n_heads, s, HD))
    return [torch.randn(shape, generator=g, dtype=torch.float64).to(dtype) for shape in shapes]


def _close(got: torch.Tensor, want: torch.Tensor, rtol: float, atol: float, what: str) -> None:
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def _check_case(
    group: dist.ProcessGroup, impl: str, n_heads: int, n_kv_heads: int, dtype: torch.dtype
) -> None:
    cp_rank, cp = dist.get_rank(group), dist.get_world_size(group)
    s, balanced = 8 * cp, impl == "ring"
    q, k, v, dout = _inputs(s, n_heads, n_kv_heads, dtype)
    full = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = ops.attention(full[0], full[1], full[2])  # (b, n_heads, s, hd)
    ref.backward(dout)

    local = [
        split_sequence(t, 2, cp_rank, cp, balanced=balanced).requires_grad_() for t in (q, k, v)
    ]
    out = context_attention(local[0], local[1], local[2], impl=impl, group=group)  # s / cp
    out.backward(split_sequence(dout, 2, cp_rank, cp, balanced=balanced))

    rtol, atol = (1e-7, 1e-9) if dtype == torch.float64 else (1e-5, 1e-5)
    case = f"cp={cp} {impl} heads={n_heads} kv={n_kv_heads} {dtype}"
    pairs: list[tuple[str, torch.Tensor | None, torch.Tensor | None]] = [
        ("out", out.detach(), ref.detach())
    ]
    pairs += [(f"d{n}", t.grad, f.grad) for n, t, f in zip("qkv", local, full, strict=True)]
    for name, got, want in pairs:
        assert got is not None and want is not None
        gathered = gather_sequence(got, 2, group, balanced=balanced)
        _close(gathered, want, rtol, atol, f"{case} {name}")


def _check_ulysses_refuses(group: dist.ProcessGroup) -> None:
    q, k, v, _ = _inputs(8 * dist.get_world_size(group), 3, 3, torch.float64)
    local = [split_sequence(t, 2, dist.get_rank(group), 2, balanced=False) for t in (q, k, v)]
    with pytest.raises(ValueError, match="use parallel.cp_impl=ring"):
        context_attention(local[0], local[1], local[2], impl="ulysses", group=group)


def _correctness(rank: int, world: int) -> None:
    from megalite.rank.env import join_deepspeed

    torch.set_num_threads(1)
    join_deepspeed("gloo")  # ulysses' all-to-alls run on DeepSpeed's comm layer
    pairs = [dist.new_group([0, 2]), dist.new_group([1, 3])]  # every rank makes every group
    for group in (pairs[rank % 2], dist.group.WORLD):
        assert group is not None
        for case in CASES:
            _check_case(group, *case)
    _check_ulysses_refuses(pairs[rank % 2])


def test_matches_full_attention() -> None:
    run_world(_correctness, 4)


def _ring_memory(rank: int, world: int) -> None:
    """Every tensor ring attention saves is local, and no more than two K/V blocks (the one in
    use and the one arriving), nor two dK/dV blocks, are alive at any time, forward or back."""
    torch.set_num_threads(1)
    q, k, v, dout = _inputs(8 * world, 4, 1, torch.float64)
    local = [split_sequence(t, 2, rank, world, balanced=True).requires_grad_() for t in (q, k, v)]
    saved: list[torch.Size] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.shape)
        return t

    live: dict[int, Any] = {tag: weakref.WeakSet() for tag in (context._KV_TAG, context._DKV_TAG)}
    peak = dict.fromkeys(live, 0)
    exchanges = dict.fromkeys(live, 0)
    original = context._Ring.exchange

    def counting_exchange(ring: Any, tensor: torch.Tensor, tag: int) -> Any:
        pending = original(ring, tensor, tag)
        assert pending.buffer.shape == (2, *local[1].shape)  # one rank's k and v, never more
        live[tag].add(pending.buffer)
        peak[tag], exchanges[tag] = max(peak[tag], len(live[tag])), exchanges[tag] + 1
        return pending

    context._Ring.exchange = counting_exchange  # type: ignore[method-assign,assignment]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = ring_attention(local[0], local[1], local[2], dist.group.WORLD)  # type: ignore[arg-type]
        out.backward(split_sequence(dout, 2, rank, world, balanced=True))
    finally:
        context._Ring.exchange = original  # type: ignore[method-assign]

    lse = (2, B, 1, 4 * local[0].shape[2] // 2)  # (half, b, kv, g * c)
    assert sorted(map(tuple, saved)) == sorted(
        [tuple(local[0].shape)] * 2 + [tuple(local[1].shape)] * 2 + [lse]
    ), saved  # q, k, v, out and the LSE: nothing of another rank's
    assert exchanges == {context._KV_TAG: 2 * (world - 1), context._DKV_TAG: world}, exchanges
    assert peak == {context._KV_TAG: 2, context._DKV_TAG: 2}, peak


def test_ring_memory_stays_local() -> None:
    run_world(_ring_memory, 4)


# --- layouts (no world) -------------------------------------------------------------------------


@pytest.mark.parametrize("balanced", [True, False])
@pytest.mark.parametrize("cp", [2, 4])
def test_split_gather_round_trip_and_positions(cp: int, balanced: bool) -> None:
    s = 16
    x = torch.randn(2, s, 3)  # (b, s, h)
    parts = [split_sequence(x, 1, r, cp, balanced=balanced) for r in range(cp)]
    assert all(p.shape == (2, s // cp, 3) for p in parts)
    torch.testing.assert_close(merge_parts(parts, 1, balanced=balanced), x, rtol=0, atol=0)
    ids = torch.arange(s)
    pos = [positions(s, r, cp, balanced=balanced) for r in range(cp)]
    for r in range(cp):
        assert torch.equal(split_sequence(ids, 0, r, cp, balanced=balanced), pos[r])
        assert bool((pos[r][1:] > pos[r][:-1]).all())  # local order is global order: causal holds
    assert torch.equal(torch.cat(pos).sort().values, ids)


def test_layouts_by_hand() -> None:
    assert positions(8, 0, 2, balanced=True).tolist() == [0, 1, 6, 7]
    assert positions(8, 1, 2, balanced=True).tolist() == [2, 3, 4, 5]
    assert positions(8, 1, 2, balanced=False).tolist() == [4, 5, 6, 7]
    assert sequence_ranges(16, 1, 4, balanced=True) == [(2, 4), (12, 14)]
    with pytest.raises(ValueError, match="must divide by 8"):
        sequence_ranges(12, 0, 4, balanced=True)


@pytest.mark.parametrize("cp", [2, 4, 8])
def test_ring_work_is_balanced(cp: int) -> None:
    """Every rank computes the same number of blocks over the ring (a diagonal block is half
    one), and all of the causal triangle's (2 cp)^2 / 2 chunk blocks are computed once."""
    work = [
        sum(0.5 if causal else 1.0 for step in range(cp) for *_, causal in
            visible_blocks(r, (r - step) % cp, cp))
        for r in range(cp)
    ]  # fmt: skip
    assert work == [work[0]] * cp
    assert sum(work) == (2 * cp) ** 2 / 2


def test_kv_repeats_for_ulysses() -> None:
    assert [kv_repeats(4, 1, 4), kv_repeats(4, 1, 2), kv_repeats(8, 2, 4)] == [4, 2, 2]
    assert [kv_repeats(4, 4, 2), kv_repeats(8, 8, 4)] == [1, 1]
    with pytest.raises(ValueError, match="use parallel.cp_impl=ring"):
        kv_repeats(3, 3, 2)
