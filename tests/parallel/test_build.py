"""Sharded construction (parallel/build.py): every rank builds only what it holds, and what it
holds is bit for bit the single-process build's slice of it, in every layout.

Two spawned worlds, each building several layouts in turn (their own process groups each):
8 ranks build tp2 × pp2 × dp2 (one kv head replicated on both TP ranks, ZeRO 1), tp4 × pp2 (one
kv head replicated on all four TP ranks, ZeRO 0) and pp4 × dp2 (ZeRO 1, one block a stage);
4 ranks build tp2 × dp2 (kv heads split; ZeRO 0 and 3, the last partitioned at build) and
dp4 (ZeRO 3). The vocabulary (4093) is padded under TP. Each layout is built tied and untied;
every rank gathers its TP group's shards (and its ZeRO-3 partitions) back to full tensors and
compares them with `Llama(cfg, seed=…)`, and counts the parameter bytes alive in the process: a
pipeline rank holds its own stage's and nothing more.
"""

from __future__ import annotations

import gc
import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from tests.distributed import run_world

SEED = 7
WORLDS = {  # world size → the layouts it builds, in turn
    8: {
        "tp2-pp2-dp2": dict(tp=2, pp=2, dp=2, zero=(1,), vocab=4093, kv=1),
        "tp4-pp2": dict(tp=4, pp=2, dp=1, zero=(0,), vocab=4093, kv=1),
        "pp4-dp2": dict(tp=1, pp=4, dp=2, zero=(1,), vocab=4093, kv=2),
    },
    4: {
        "tp2-dp2": dict(tp=2, pp=1, dp=2, zero=(0, 3), vocab=4093, kv=2),
        "dp4": dict(tp=1, pp=1, dp=4, zero=(3,), vocab=4093, kv=2),
    },
}


def _config(world: dict, *, tied: bool, zero: int, partition: str = "uniform"):
    from tests.helpers import compose_config

    return compose_config([
        "model=tiny", f"model.vocab_size={world['vocab']}", f"model.n_kv_heads={world['kv']}",
        f"model.tie_embeddings={str(tied).lower()}", f"parallel.tp={world['tp']}",
        f"parallel.pp={world['pp']}", f"parallel.dp={world['dp']}", f"parallel.zero_stage={zero}",
        f"parallel.pipeline_partition={partition}", f"trainer.seed={SEED}",
        "trainer.micro_batch_size=1", f"trainer.global_batch_size={2 * world['dp']}",
        "logging.wandb.mode=disabled",
    ])  # fmt: skip


def _full_tensors(module: torch.nn.Module, dims) -> dict[str, torch.Tensor]:
    """This rank's parameters gathered over ZeRO-3 and TP to full tensors, by plain name."""
    from megalite.parallel.placement import shard_of

    params = list(module.parameters())
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        with deepspeed.zero.GatheredParameters(params):
            local = [p.detach().clone() for p in params]
    else:
        local = [p.detach().clone() for p in params]
    out: dict[str, torch.Tensor] = {}
    for p, t in zip(params, local, strict=True):
        parts = [torch.empty_like(t) for _ in range(dims.tp)]
        dist.all_gather(parts, t.contiguous(), group=dims.group("tp"))
        out.update(shard_of(p).merge(parts))
    return out


def _live_parameter_bytes() -> int:
    gc.collect()
    seen = {
        id(o): o for o in gc.get_objects() if isinstance(o, torch.nn.Parameter) and not o.is_meta
    }
    return sum(p.numel() * p.element_size() for p in seen.values())


def _rank(rank: int, world_size: int, out_dir: str) -> None:
    from megalite.model.llama import Llama
    from megalite.parallel.build import build_model
    from megalite.parallel.dims import ParallelDims
    from megalite.parallel.engine import build_engine
    from megalite.rank.env import join_deepspeed
    from megalite.train.worker import quiet_known_warnings

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    os.environ["LOCAL_WORLD_SIZE"] = str(world_size)
    torch.set_num_threads(1)
    join_deepspeed("gloo")
    quiet_known_warnings()
    report = []
    for name, world in WORLDS[world_size].items():
        dims = ParallelDims(tp=world["tp"], pp=world["pp"], dp=world["dp"], global_rank=rank)
        dims.build_groups()
        for tied in (False, True):
            for zero in world["zero"]:
                # Under a pipeline the untied model balances blocks, the tied one parameters.
                partition = "parameters" if tied and world["pp"] > 1 else "uniform"
                cfg = _config(world, tied=tied, zero=zero, partition=partition)
                reference = dict(Llama(cfg.model, seed=SEED).named_parameters())
                before = _live_parameter_bytes()
                module, _ = build_model(cfg, dims, torch.device("cpu"))
                held = _live_parameter_bytes() - before
                own = sum(p.numel() * p.element_size() for p in module.parameters())
                if zero == 3:
                    build_engine(module, cfg, dims)  # the engine keeps the partitions
                full = _full_tensors(module, dims)
                wrong = [n for n, t in full.items() if not torch.equal(t, reference[n].detach())]
                case = dict(layout=name, tied=tied, zero=zero, partition=partition)
                report.append(dict(case, names=sorted(full), wrong=wrong, held=held, own=own))
                del module, full, reference
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(report))


@pytest.mark.parametrize("size", list(WORLDS), ids=lambda n: f"{n}-ranks")
def test_every_rank_builds_exactly_its_slice(size: int, tmp_path: Path) -> None:
    run_world(_rank, size, str(tmp_path))
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(size)]
    built = [r["layout"] for r in reports[0]]
    assert sorted(set(built)) == sorted(WORLDS[size]), built
    for case in range(len(reports[0])):
        rows = [r[case] for r in reports]
        name = rows[0]["layout"]
        world = WORLDS[size][name]
        what = {k: rows[0][k] for k in ("tied", "zero", "partition")}
        for rank, row in enumerate(rows):
            assert row["wrong"] == [], (name, what, rank)
            # No parameter beyond its own: a ZeRO-3 rank keeps only flat partitions (≤ its own
            # full share), any other rank exactly what its module registers.
            assert row["held"] <= row["own"] or what["zero"] == 3, (name, what, rank, row)
        # Every plain tensor is built somewhere: the stages together hold the whole model.
        covered = set().union(*(set(r["names"]) for r in rows))
        tied = "head.weight" not in covered
        assert tied == what["tied"]
        n_blocks = len({n.split(".")[1] for n in covered if n.startswith("layers.")})
        assert n_blocks == 4, (name, what)
        if world["pp"] > 1:  # a stage does not hold other stages' blocks
            per_stage = [set(r["names"]) for r in rows[:: world["tp"] * world["dp"]]]
            blocks = [{n.split(".")[1] for n in s if n.startswith("layers.")} for s in per_stage]
            assert sum(len(b) for b in blocks) == 4, (name, blocks)
