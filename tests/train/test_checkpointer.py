"""Checkpointer on its own, in a dp=2 ZeRO-1 world: a synchronous save is committed on return, an
async one once `last_good` waits for it; `load` restores the engine's weights and returns the
rank's own state; `load_newest` passes over a damaged newest checkpoint to the next; the meta
schema is what the tools read."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from tests.distributed import deepspeed_dp_rank, run_world


def _weights(engine) -> list[torch.Tensor]:
    return [p.detach().clone() for p in engine.module.parameters()]


def _rank(rank: int, world: int, root: str) -> None:
    import torch.distributed as dist

    from megalite.checkpoint import store
    from megalite.parallel.build import build_model
    from megalite.parallel.engine import build_engine
    from megalite.train.checkpointer import Checkpointer
    from tests.helpers import compose_config

    dims = deepspeed_dp_rank(rank, world)
    cfg = compose_config(["model=tiny", "parallel.dp=2", "parallel.zero_stage=1",
                          "trainer.seq_len=8", "trainer.micro_batch_size=1",
                          "trainer.global_batch_size=2", "trainer.async_save=true",
                          "data.path=/data/sample", "logging.wandb.mode=disabled"])  # fmt: skip
    model, loss_fn = build_model(cfg, dims, torch.device("cpu"))
    engine, _ = build_engine(model, cfg, dims)
    ck = Checkpointer(cfg, engine=engine, dims=dims, root=Path(root), data_path="/data/sample",
                      wandb_run_id="run-1")  # fmt: skip

    def state(step: int) -> dict:
        return {"step": step, "consumed_tokens": 16 * step, "mine": rank}

    group, ck.save_group = ck.save_group, None  # the synchronous save first
    ck.save(1, state(1))
    first = Path(root) / store.step_name(1)
    assert ck.last == first and ck.is_saved(1) and ck.pending is None
    at_first = _weights(engine)

    x = torch.randint(0, cfg.model.vocab_size, (1, 9))
    engine.backward(loss_fn(engine(x[:, :-1]), x[:, 1:]))
    engine.step()
    assert not all(map(torch.equal, at_first, _weights(engine)))

    ck.save_group = group  # trainer.async_save: written in the background
    ck.save(2, state(2))
    second = Path(root) / store.step_name(2)
    assert ck.is_saved(2) and ck.pending is not None
    assert ck.last_good() == second and ck.pending is None

    assert ck.load(first) == state(1)
    assert all(map(torch.equal, at_first, _weights(engine)))
    assert ck.last == first and ck.is_saved(1) and not ck.is_saved(2)

    meta = store.read_meta(first)
    assert meta["layout"] == {"tp": 1, "pp": 1, "dp": 2} and meta["zero_stage"] == 1
    assert meta["model"] == asdict(cfg.model) and meta["config"] == asdict(cfg)
    assert (meta["consumed_tokens"], meta["wandb_run_id"]) == (16, "run-1")
    assert (meta["data_path"], meta["tp_shards"]) == ("/data/sample", {})

    if rank == 0:  # the newest damaged: one of its files cut short
        name = sorted(store.read_meta(second)["files"])[0]
        (second / name).write_bytes((second / name).read_bytes()[:-1])
    dist.barrier()
    assert ck.load_newest([second, first]) == state(1) and ck.last == first
    with pytest.raises(store.CheckpointError, match=store.step_name(2)):
        ck.load_newest([second])


def test_checkpointer_saves_and_loads(tmp_path) -> None:
    run_world(_rank, 2, str(tmp_path / "checkpoints"))
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*")) == [
        "step_00000001",
        "step_00000002",
    ]
