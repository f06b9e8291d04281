"""Run a function in a local gloo world of N ranks; a failing rank fails the test with its
traceback (torch's ProcessRaisedException carries it)."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch.distributed as dist

from megalite.cluster.local import free_port, start_processes


def _entry(rank: int, fn: Callable[..., Any], world_size: int, port: int, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()


def run_world(fn: Callable[..., Any], world_size: int, *args: Any) -> None:
    """Call `fn(rank, world_size, *args)` on every rank of a fresh gloo world; `fn` must be a
    module-level function (it is pickled by reference)."""
    start_processes(_entry, nprocs=world_size, args=(fn, world_size, free_port(), args))


def deepspeed_dp_rank(rank: int, world: int) -> Any:
    """In a rank of `run_world`: DeepSpeed on the gloo world (its logs quiet, one torch thread)
    and the groups of a pure data-parallel layout; returns the ParallelDims."""
    import logging

    import torch

    from megalite.parallel.dims import ParallelDims
    from megalite.rank.env import join_deepspeed
    from megalite.train.worker import quiet_known_warnings

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    os.environ["LOCAL_WORLD_SIZE"] = str(world)
    torch.set_num_threads(1)
    join_deepspeed("gloo")
    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
    quiet_known_warnings()
    dims = ParallelDims(tp=1, pp=1, dp=world, global_rank=rank)
    dims.build_groups()
    return dims


def tensors_in(value: Any) -> list[Any]:
    """Every tensor in a nest of dicts, lists and tuples, in order."""
    import torch

    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, list | tuple):
        return [t for v in value for t in tensors_in(v)]
    return []
