"""The planner's weights, gradients and optimizer state per rank equal, to the byte, what a real
DeepSpeed engine holds: model=tiny, dp=2, ZeRO 0-3, fp32 and bf16, on CPU.

What is measured on each rank (distinct storages, so views of one flat buffer count once):
- weights: the module's parameters, and ZeRO 3's partitions (`ds_tensor`);
- gradients: after each backward of a two-micro-batch step, every tensor holding gradients
  (`p.grad`, ZeRO's partition buffers and per-parameter accumulations); the larger of the two;
- optimizer state: the fp32 master copies and the inner AdamW's state (moments and steps).
"""

from __future__ import annotations

import os

import torch

from megalite.plan.memory import model_state
from megalite.plan.presets import load_preset
from megalite.plan.shape import stage_tensors
from tests.distributed import deepspeed_dp_rank, run_world, tensors_in

CASES = [(precision, zero) for precision in ("fp32", "bf16") for zero in (0, 1, 2, 3)]


def _storages(tensors) -> dict[int, int]:
    out = {}
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.numel() > 0:
            s = t.untyped_storage()
            out[s.data_ptr()] = s.nbytes()
    return out


GRAD_HOLDERS = ("averaged_gradients", "all_grad_tensors", "grad_partitions_flat_buffer")
MASTER_HOLDERS = (
    "single_partition_of_fp32_groups",  # ZeRO 1/2
    "fp32_partitioned_groups_flat",  # ZeRO 3
    "fp32_groups",  # FP16_UnfusedOptimizer (bf16, ZeRO 0)
)


def _rank_world(rank: int, world: int, out_dir: str) -> None:
    """Build an engine per case on this rank, measure it, and save the figures for the test."""
    from megalite.parallel.build import build_model
    from megalite.parallel.engine import build_engine
    from tests.helpers import compose_config

    dims = deepspeed_dp_rank(rank, world)
    results = {}
    for precision, zero in CASES:
        cfg = compose_config(
            [
                "model=tiny",
                "parallel.dp=2",
                f"parallel.zero_stage={zero}",
                f"trainer.precision={precision}",
                "trainer.seq_len=8",
                "trainer.micro_batch_size=1",
                "trainer.global_batch_size=4",  # two micro-batches per rank
                "logging.wandb.mode=disabled",
            ]
        )
        model, loss_fn = build_model(cfg, dims, torch.device("cpu"))
        engine, _ = build_engine(model, cfg, dims)
        opt = engine.optimizer
        params = list(engine.module.parameters())
        grads = 0
        for _ in range(engine.gradient_accumulation_steps()):
            x = torch.randint(0, cfg.model.vocab_size, (1, 9))
            engine.backward(loss_fn(engine(x[:, :-1]), x[:, 1:]))
            held = [p.grad for p in params] + [
                t for a in GRAD_HOLDERS for t in tensors_in(getattr(opt, a, None))
            ]
            grads = max(grads, sum(_storages(held).values()))
            engine.step()
        weights = _storages(params + [getattr(p, "ds_tensor", None) for p in params])
        inner = getattr(opt, "optimizer", opt)
        state = [t for s in inner.state.values() for t in s.values()]
        masters = [t for a in MASTER_HOLDERS for t in tensors_in(getattr(opt, a, None))]
        results[(rank, precision, zero)] = (
            sum(weights.values()),
            grads,
            sum(_storages(state + masters).values()),
        )
        del engine, opt, model, params
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


def test_model_state_bytes_match_deepspeed(tmp_path) -> None:
    run_world(_rank_world, 2, str(tmp_path))
    tensors = stage_tensors(load_preset("tiny"), tp=1, pp=1, stage=0)
    mismatches = []
    for rank in range(2):
        measured = torch.load(tmp_path / f"rank{rank}.pt")
        for precision, zero in CASES:
            want = model_state(
                tensors, dp=2, zero=zero, precision=precision, pipeline=False, dp_rank=rank
            )
            got = measured[(rank, precision, zero)]
            assert min(got) > 0, (rank, precision, zero)
            planned = (want.weights, want.gradients, want.optimizer)
            if got != planned:
                mismatches.append(f"rank {rank} {precision} ZeRO {zero}: {got} != {planned}")
    assert not mismatches, "\n".join(mismatches)
