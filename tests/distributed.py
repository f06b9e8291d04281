"""Run a function in a local gloo world of N ranks; a failing rank fails the test with its
traceback (torch's ProcessRaisedException carries it)."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch.distributed as dist
import torch.multiprocessing as mp

from megalite.cluster.local import free_port


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
    mp.start_processes(
        _entry,
        args=(fn, world_size, free_port(), args),
        nprocs=world_size,
        join=True,
        start_method="spawn",
    )
