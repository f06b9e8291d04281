"""The tensor-parallel cut: which part of a plain model's full tensor a TP rank holds, and back.

One object, `TPShard`, is the rule for construction (`parallel.build` draws only the pieces a rank
holds), checkpoints (meta.json records it per parameter; readers merge with it, layout-free
resumes cut with it), the conversion tools and the planner. Kinds:

- "full": not cut (replicated over TP);
- "rows" / "cols": dim 0 / dim 1 split evenly (column- / row-parallel linear layers);
- "vocab": dim 0 of the vocabulary padded to a multiple of tp (`full_rows` real rows; padding rows
  are zero);
- "kv": dim 0 split over kv heads; with fewer kv heads than ranks each head's rows are held by
  `replicas` neighbouring ranks;
- "gate_up": this rank's rows of the gate (`names[0]`), then its rows of the up projection
  (`names[1]`), fused into one column-parallel matmul.

`block_shards` and `vocab_shard` say which parameter of the model is cut which way. The module
is pure arithmetic until a tensor is cut or merged (torch is imported then), so the planner sizes
a rank's tensors with the same rule without importing torch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, cast

if TYPE_CHECKING:
    import torch

KINDS = ("full", "rows", "cols", "vocab", "kv", "gate_up")


class PlainNamed(Protocol):
    """An unsharded parameter of a built model, tagged with its plain name
    (`parallelize.tag_plain_names`)."""

    plain_name: str


@dataclass(frozen=True)
class Piece:
    """Units [start, stop) along `axis` of the full tensor `name`; units at or past `real` are
    padding (zeros)."""

    name: str
    axis: int
    start: int
    stop: int
    real: int

    @property
    def size(self) -> int:
        return self.stop - self.start

    @property
    def real_size(self) -> int:
        """Units of the piece that exist in the full tensor (the rest is padding)."""
        return max(0, min(self.stop, self.real) - self.start)


def part(n: int, tp: int, rank: int) -> range:
    """Rank `rank`'s share of n units split over tp ranks."""
    return range(rank * n // tp, (rank + 1) * n // tp)


@dataclass(frozen=True)
class TPShard:
    """How a parameter's full tensor(s) map to one TP rank's shard (see the module docstring)."""

    kind: str
    names: tuple[str, ...]  # the plain model's parameter name(s) this shard belongs to
    full_rows: int = 0
    replicas: int = 1

    @property
    def axis(self) -> int:
        return 1 if self.kind == "cols" else 0

    def pieces(self, extents: dict[str, int], *, tp: int, rank: int) -> list[Piece]:
        """The pieces of the full tensors that, concatenated along `axis`, make rank `rank`'s
        shard. `extents`: each name's full size along `axis`."""
        n = extents[self.names[0]]
        if self.kind == "full":
            span = range(n)
        elif self.kind in ("rows", "cols"):
            span = part(n, tp, rank)
        elif self.kind == "vocab":
            span = part(math.ceil(n / tp) * tp, tp, rank)
        elif self.kind == "kv":
            if self.replicas == 1:
                span = part(n, tp, rank)
            else:
                heads, head = tp // self.replicas, rank // self.replicas
                span = range(head * n // heads, (head + 1) * n // heads)
        elif self.kind == "gate_up":
            return [self._piece(n, part(extents[n], tp, rank), extents) for n in self.names]
        else:
            raise ValueError(f"unknown shard kind {self.kind!r}")
        return [self._piece(self.names[0], span, extents)]

    def _piece(self, name: str, span: range, extents: dict[str, int]) -> Piece:
        return Piece(name, self.axis, span.start, span.stop, extents[name])

    def shape(self, full_shapes: dict[str, tuple[int, ...]], *, tp: int, rank: int):
        """The shape of rank `rank`'s shard, from the full tensors' shapes."""
        extents = {name: shape[self.axis] for name, shape in full_shapes.items()}
        out = list(full_shapes[self.names[0]])
        out[self.axis] = sum(p.size for p in self.pieces(extents, tp=tp, rank=rank))
        return tuple(out)

    def assemble(
        self,
        out: torch.Tensor,
        fill: Callable[[Piece, torch.Tensor], object],
        extents: dict[str, int],
        *,
        tp: int,
        rank: int,
    ) -> torch.Tensor:
        """Write rank `rank`'s shard into `out` (the shard's shape): `fill(piece, region)` writes
        a piece's real units into `region`, a view of `out`; padding is zeroed. Returns `out`."""
        offset = 0
        for piece in self.pieces(extents, tp=tp, rank=rank):
            fill(piece, out.narrow(self.axis, offset, piece.real_size))
            out.narrow(self.axis, offset + piece.real_size, piece.size - piece.real_size).zero_()
            offset += piece.size
        return out

    def cut(self, full: dict[str, torch.Tensor], *, tp: int, rank: int) -> torch.Tensor:
        """Rank `rank`'s shard of the full tensors `full` (by name; the inverse of `merge`), a
        new tensor."""
        first = full[self.names[0]]
        shape = self.shape({n: tuple(full[n].shape) for n in self.names}, tp=tp, rank=rank)
        return self.assemble(
            first.new_empty(shape),
            lambda piece, region: region.copy_(
                full[piece.name].narrow(piece.axis, piece.start, piece.real_size)
            ),
            {name: full[name].shape[self.axis] for name in self.names},
            tp=tp,
            rank=rank,
        )

    def merge(self, parts: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """The full tensor(s), by plain name, from the shards of TP ranks 0..tp-1."""
        import torch

        if self.kind == "full":
            return {self.names[0]: parts[0]}
        if self.kind == "cols":
            return {self.names[0]: torch.cat(parts, dim=1)}
        if self.kind == "rows":
            return {self.names[0]: torch.cat(parts)}
        if self.kind == "vocab":
            return {self.names[0]: torch.cat(parts)[: self.full_rows]}
        if self.kind == "kv":
            return {self.names[0]: torch.cat(parts[:: self.replicas])}
        if self.kind == "gate_up":
            halves = [p.chunk(2) for p in parts]
            return {
                self.names[0]: torch.cat([h[0] for h in halves]),
                self.names[1]: torch.cat([h[1] for h in halves]),
            }
        raise ValueError(f"unknown shard kind {self.kind!r}")


def kv_replicas(tp: int, n_kv_heads: int) -> int:
    """TP ranks holding each kv head: 1 when the kv heads split over the ranks, else
    tp / n_kv_heads neighbouring ranks per head."""
    return max(1, tp // n_kv_heads)


def vocab_shard(name: str, vocab_size: int) -> TPShard:
    """The cut of the embedding or the head (`name`): vocabulary rows, padded to tp's multiple."""
    return TPShard("vocab", (name,), full_rows=vocab_size)


def block_shards(prefix: str, *, kv_replicas: int) -> dict[str, TPShard]:
    """The cut of each matrix of transformer block `prefix` (e.g. "layers.3"), by the sharded
    module's name in the block: q heads by rows, kv heads by rows (each head on `kv_replicas`
    ranks), the attention output by columns, gate and up fused as `mlp.w13`, down by columns."""

    def named(*names: str) -> tuple[str, ...]:
        return tuple(f"{prefix}.{n}.weight" for n in names)

    return {
        "attn.wq": TPShard("rows", named("attn.wq")),
        "attn.wk": TPShard("kv", named("attn.wk"), replicas=kv_replicas),
        "attn.wv": TPShard("kv", named("attn.wv"), replicas=kv_replicas),
        "attn.wo": TPShard("cols", named("attn.wo")),
        "mlp.w13": TPShard("gate_up", named("mlp.w1", "mlp.w3")),
        "mlp.w2": TPShard("cols", named("mlp.w2")),
    }


def shard_of(param: torch.nn.Parameter) -> TPShard:
    """The cut of a parameter of a built model: its `tp_shard`, or whole (`plain_name`)."""
    shard = getattr(param, "tp_shard", None)
    return shard if shard is not None else TPShard("full", (cast(PlainNamed, param).plain_name,))
