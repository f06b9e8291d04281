"""The rank grid: one `ParallelDims` object owns the tensor, context, data and pipeline process
groups.

Global ranks are laid out as DeepSpeed's `PipeModelDataParallelTopology` lays them out:
tensor-parallel ranks are neighbours (innermost, so a TP group sits on one node), then context
parallel, then data parallel, then pipeline (outermost):

    global_rank = pp_rank * (dp * cp * tp) + dp_rank * (cp * tp) + cp_rank * tp + tp_rank

With cp=1 this is the (pp, dp, tp) layout of before, rank for rank. The cp ranks of a data-parallel
replica read the same data and hold the same weights, each its part of every sequence; each one's
loss is the mean over its own tokens, so gradients are averaged (and ZeRO shards) over the "dp_cp"
group, the dp x cp ranks of one (tp, pp) coordinate: what DeepSpeed is told is data parallel.

No module-level state: the object is built once per process and passed to whoever needs a group.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.distributed as dist


@dataclass(frozen=True)
class Coords:
    tp_rank: int
    dp_rank: int
    pp_rank: int
    cp_rank: int = 0


def coords_of(global_rank: int, *, tp: int, dp: int, pp: int, cp: int = 1) -> Coords:
    """Where `global_rank` sits in the (pp, dp, cp, tp) grid."""
    if not 0 <= global_rank < tp * cp * dp * pp:
        raise ValueError(f"rank {global_rank} outside a world of {tp * cp * dp * pp}")
    return Coords(
        tp_rank=global_rank % tp,
        cp_rank=(global_rank // tp) % cp,
        dp_rank=(global_rank // (tp * cp)) % dp,
        pp_rank=global_rank // (tp * cp * dp),
    )


# For each axis, the coordinates that stay fixed along it: one group per value of them.
_FIXED = {
    "tp": ("cp_rank", "dp_rank", "pp_rank"),
    "cp": ("tp_rank", "dp_rank", "pp_rank"),
    "dp": ("tp_rank", "cp_rank", "pp_rank"),
    "pp": ("tp_rank", "cp_rank", "dp_rank"),
    "dp_cp": ("tp_rank", "pp_rank"),
}


@dataclass
class ParallelDims:
    """Degrees, this process's coordinates, and (once `build_groups` ran) its process groups."""

    tp: int
    pp: int
    dp: int
    global_rank: int
    cp: int = 1
    groups: dict[str, dist.ProcessGroup] = field(default_factory=dict, repr=False)
    group_ranks: dict[str, list[int]] = field(default_factory=dict, repr=False)

    @property
    def world_size(self) -> int:
        return self.tp * self.cp * self.pp * self.dp

    @property
    def coords(self) -> Coords:
        return coords_of(self.global_rank, tp=self.tp, dp=self.dp, pp=self.pp, cp=self.cp)

    @property
    def tp_rank(self) -> int:
        return self.coords.tp_rank

    @property
    def dp_rank(self) -> int:
        return self.coords.dp_rank

    @property
    def pp_rank(self) -> int:
        return self.coords.pp_rank

    @property
    def cp_rank(self) -> int:
        return self.coords.cp_rank

    @property
    def dp_cp(self) -> int:
        """The ranks gradients are averaged over: dp x cp."""
        return self.dp * self.cp

    @property
    def dp_cp_rank(self) -> int:
        """This rank's place in its "dp_cp" group (global order: dp_rank * cp + cp_rank)."""
        return self.dp_rank * self.cp + self.cp_rank

    def axis_ranks(self, axis: str) -> list[list[int]]:
        """All groups along `axis` ("tp" | "cp" | "dp" | "pp" | "dp_cp"), each a sorted list of
        global ranks."""
        sizes = {"tp": self.tp, "cp": self.cp, "dp": self.dp, "pp": self.pp, "dp_cp": self.dp_cp}
        groups: dict[tuple[int, ...], list[int]] = {}
        for r in range(self.world_size):
            c = coords_of(r, tp=self.tp, dp=self.dp, pp=self.pp, cp=self.cp)
            key = tuple(getattr(c, name) for name in _FIXED[axis])
            groups.setdefault(key, []).append(r)
        out = [sorted(v) for _, v in sorted(groups.items())]
        assert all(len(g) == sizes[axis] for g in out)
        return out

    def build_groups(self) -> None:
        """Create the TP, DP and PP groups, and with cp > 1 the CP and DP x CP groups (with cp=1
        "dp_cp" is the DP group itself, and there is no "cp" group). Collective: every rank calls
        it in the same order."""
        if dist.get_world_size() != self.world_size:
            raise RuntimeError(
                f"world size {dist.get_world_size()} != tp x cp x pp x dp = {self.world_size}"
            )
        for axis in ("tp", "dp", "pp") + (("cp", "dp_cp") if self.cp > 1 else ()):
            for ranks in self.axis_ranks(axis):
                group = dist.new_group(ranks)
                if self.global_rank in ranks:
                    self.groups[axis] = group
                    self.group_ranks[axis] = ranks
        if self.cp == 1:
            self.groups["dp_cp"], self.group_ranks["dp_cp"] = (
                self.groups["dp"],
                self.group_ranks["dp"],
            )

    def group(self, axis: str) -> dist.ProcessGroup:
        return self.groups[axis]


class DeepSpeedMPU:
    """The model-parallel-unit interface DeepSpeed asks for (`deepspeed.initialize(mpu=...)`).

    It tells ZeRO to shard, and gradients to be averaged, over the dp x cp ranks ("dp_cp": the
    DP group when cp=1), and gradient norms to be computed across the model-parallel (TP) group.
    """

    def __init__(self, dims: ParallelDims) -> None:
        self.dims = dims

    def get_model_parallel_rank(self) -> int:
        return self.dims.tp_rank

    def get_model_parallel_world_size(self) -> int:
        return self.dims.tp

    def get_model_parallel_group(self) -> dist.ProcessGroup:
        return self.dims.group("tp")

    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_group = get_model_parallel_group

    def get_tensor_model_parallel_src_rank(self) -> int:
        return self.dims.group_ranks["tp"][0]

    def get_data_parallel_rank(self) -> int:
        return self.dims.dp_cp_rank

    def get_data_parallel_world_size(self) -> int:
        return self.dims.dp_cp

    def get_data_parallel_group(self) -> dist.ProcessGroup:
        return self.dims.group("dp_cp")

    def get_data_parallel_group_ranks(self) -> list[int]:
        return self.dims.group_ranks["dp_cp"]

    def get_pipeline_model_parallel_rank(self) -> int:
        return self.dims.pp_rank

    def get_pipeline_model_parallel_world_size(self) -> int:
        return self.dims.pp

    def get_pipeline_model_parallel_group(self) -> dist.ProcessGroup:
        return self.dims.group("pp")
