"""A discarded update (trainer.anomaly=skip, parallel/discard.py) leaves weights, optimizer state
and LR schedule exactly as they were, for every optimizer DeepSpeed builds here: fp32 and bf16,
ZeRO 0-3, dp=2 on CPU; DeepSpeed counts it in `skipped_steps`, and the next step trains."""

from __future__ import annotations

import os

import torch

from tests.distributed import deepspeed_dp_rank, run_world, tensors_in

# Each optimizer class DeepSpeed builds here once (ZeRO 1 and 2 share one, bf16 ZeRO 0 has its own).
CASES = [("fp32", 0), ("bf16", 0), ("fp32", 1), ("bf16", 2), ("fp32", 3)]


def _snapshot(engine) -> list[torch.Tensor]:
    """Copies of everything an update changes: weights (ZeRO 3's partitions too), fp32 masters,
    the inner optimizer's moments and step counts."""
    opt = engine.optimizer
    # ZeRO 3: a rank's partition of each weight (the full weight is gathered only while in use)
    held = [getattr(p, "ds_tensor", p) for p in engine.module.parameters()]
    for name in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat",
                 "fp32_groups", "fp32_groups_flat_partition"):  # fmt: skip
        held += tensors_in(getattr(opt, name, None))
    inner = getattr(opt, "optimizer", opt)
    held += [t for state in inner.state.values() for t in tensors_in(state)]
    return [t.detach().clone() for t in held if isinstance(t, torch.Tensor) and t.numel()]


def _step(engine, loss_fn, vocab: int, *, skip: bool) -> None:
    """One optimizer step of random batches; its update discarded if `skip`."""
    from megalite.parallel.discard import discarded_update

    accum = engine.gradient_accumulation_steps()
    for micro in range(accum):
        x = torch.randint(0, vocab, (1, 9))
        engine.backward(loss_fn(engine(x[:, :-1]), x[:, 1:]))
        if skip and micro == accum - 1:
            with discarded_update(engine):
                engine.step()
        else:
            engine.step()


def _rank_world(rank: int, world: int, out_dir: str) -> None:
    from megalite.parallel.build import build_model
    from megalite.parallel.engine import build_engine
    from tests.helpers import compose_config

    dims = deepspeed_dp_rank(rank, world)
    results = {}
    for precision, zero in CASES:
        cfg = compose_config(["model=tiny", "parallel.dp=2", f"parallel.zero_stage={zero}",
                              f"trainer.precision={precision}", "trainer.seq_len=8",
                              "trainer.micro_batch_size=1", "trainer.global_batch_size=4",
                              "optim.warmup_steps=0", "logging.wandb.mode=disabled"])  # fmt: skip
        torch.manual_seed(rank)
        model, loss_fn = build_model(cfg, dims, torch.device("cpu"))
        engine, scheduler = build_engine(model, cfg, dims)

        vocab = cfg.model.vocab_size
        _step(engine, loss_fn, vocab, skip=False)  # the moments exist
        before, lr = _snapshot(engine), scheduler.get_last_lr()
        _step(engine, loss_fn, vocab, skip=True)
        after, lr_after = _snapshot(engine), scheduler.get_last_lr()
        kept = len(before) == len(after) and all(map(torch.equal, before, after))
        _step(engine, loss_fn, vocab, skip=False)
        trained = not all(map(torch.equal, after, _snapshot(engine)))
        name = type(engine.optimizer).__name__
        results[(precision, zero)] = (name, kept, lr == lr_after, engine.skipped_steps, trained)
        del engine, model
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


def test_discarded_update_changes_nothing(tmp_path) -> None:
    run_world(_rank_world, 2, str(tmp_path))
    for rank in range(2):
        for case, (name, kept, same_lr, skipped, trained) in torch.load(
            tmp_path / f"rank{rank}.pt"
        ).items():
            assert (kept, same_lr, skipped, trained) == (True, True, 1, True), (rank, case, name)
