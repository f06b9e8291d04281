"""Save and load the whole training state through the DeepSpeed engine, atomically.

DeepSpeed writes model, optimizer (ZeRO-partitioned) and LR-scheduler state; megalite adds one
small file per rank (data-stream position and RNG states, which differ per rank) and the metadata
that `store.commit` seals. Every rank calls `save` and `load`; they are collective.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from megalite.checkpoint import store


def rng_state() -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(
    engine: Any,
    *,
    root: Path,
    step: int,
    global_rank: int,
    rank_state: dict[str, Any],
    meta: dict[str, Any],
) -> Path:
    """Write a checkpoint of `step` under `root` and commit it; returns the committed folder."""
    if global_rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        store.discard_partial(root)
    dist.barrier()
    tmp = root / store.tmp_name(step)
    engine.save_checkpoint(str(root), tag=tmp.name, save_latest=False)
    torch.save({**rank_state, "rng": rng_state()}, tmp / store.rank_file(global_rank))
    dist.barrier()  # every rank's files are on disk before one rank seals the folder
    final = [store.commit(root, step, meta) if global_rank == 0 else None]
    dist.broadcast_object_list(final, src=0)
    return final[0]


def load(engine: Any, ckpt: Path, *, global_rank: int) -> dict[str, Any]:
    """Restore engine state from a committed checkpoint; returns this rank's own saved state."""
    load_path, _ = engine.load_checkpoint(
        str(ckpt.parent),
        tag=ckpt.name,
        load_optimizer_states=True,
        load_lr_scheduler_states=True,
    )
    if load_path is None:
        raise store.CheckpointError(f"{ckpt}: DeepSpeed found no model states to load")
    rank_state = torch.load(ckpt / store.rank_file(global_rank), weights_only=False)
    set_rng_state(rank_state.pop("rng"))
    return rank_state
