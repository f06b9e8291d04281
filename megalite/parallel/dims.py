"""The rank grid: one `ParallelDims` object owns the tensor, data and pipeline process groups.

Global ranks are laid out as DeepSpeed's `PipeModelDataParallelTopology` lays them out:
tensor-parallel ranks are neighbours (innermost, so a TP group sits on one node), then data
parallel, then pipeline (outermost):

    global_rank = pp_rank * (dp * tp) + dp_rank * tp + tp_rank

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


def coords_of(global_rank: int, *, tp: int, dp: int, pp: int) -> Coords:
    """Where `global_rank` sits in the (pp, dp, tp) grid."""
    if not 0 <= global_rank < tp * dp * pp:
        raise ValueError(f"rank {global_rank} outside a world of {tp * dp * pp}")
    return Coords(
        tp_rank=global_rank % tp,
        dp_rank=(global_rank // tp) % dp,
        pp_rank=global_rank // (tp * dp),
    )


@dataclass
class ParallelDims:
    """Degrees, this process's coordinates, and (once `build_groups` ran) its process groups."""

    tp: int
    pp: int
    dp: int
    global_rank: int
    groups: dict[str, dist.ProcessGroup] = field(default_factory=dict, repr=False)
    group_ranks: dict[str, list[int]] = field(default_factory=dict, repr=False)

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def coords(self) -> Coords:
        return coords_of(self.global_rank, tp=self.tp, dp=self.dp, pp=self.pp)

    @property
    def tp_rank(self) -> int:
        return self.coords.tp_rank

    @property
    def dp_rank(self) -> int:
        return self.coords.dp_rank

    @property
    def pp_rank(self) -> int:
        return self.coords.pp_rank

    def axis_ranks(self, axis: str) -> list[list[int]]:
        """All groups along `axis` ("tp" | "dp" | "pp"), each a sorted list of global ranks."""
        sizes = {"tp": self.tp, "dp": self.dp, "pp": self.pp}
        groups: dict[tuple[int, int], list[int]] = {}
        for r in range(self.world_size):
            c = coords_of(r, tp=self.tp, dp=self.dp, pp=self.pp)
            key = {
                "tp": (c.dp_rank, c.pp_rank),
                "dp": (c.tp_rank, c.pp_rank),
                "pp": (c.tp_rank, c.dp_rank),
            }[axis]
            groups.setdefault(key, []).append(r)
        out = [sorted(v) for _, v in sorted(groups.items())]
        assert all(len(g) == sizes[axis] for g in out)
        return out

    def build_groups(self) -> None:
        """Create the TP, DP and PP groups. Collective: every rank calls it in the same order."""
        if dist.get_world_size() != self.world_size:
            raise RuntimeError(
                f"world size {dist.get_world_size()} != tp x pp x dp = {self.world_size}"
            )
        for axis in ("tp", "dp", "pp"):
            for ranks in self.axis_ranks(axis):
                group = dist.new_group(ranks)
                if self.global_rank in ranks:
                    self.groups[axis] = group
                    self.group_ranks[axis] = ranks

    def group(self, axis: str) -> dist.ProcessGroup:
        return self.groups[axis]


class DeepSpeedMPU:
    """The model-parallel-unit interface DeepSpeed asks for (`deepspeed.initialize(mpu=...)`).

    It tells ZeRO to shard over the DP group only and to compute gradient norms across the
    model-parallel (TP) group.
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
        return self.dims.dp_rank

    def get_data_parallel_world_size(self) -> int:
        return self.dims.dp

    def get_data_parallel_group(self) -> dist.ProcessGroup:
        return self.dims.group("dp")

    def get_data_parallel_group_ranks(self) -> list[int]:
        return self.dims.group_ranks["dp"]

    def get_pipeline_model_parallel_rank(self) -> int:
        return self.dims.pp_rank

    def get_pipeline_model_parallel_world_size(self) -> int:
        return self.dims.pp

    def get_pipeline_model_parallel_group(self) -> dist.ProcessGroup:
        return self.dims.group("pp")
