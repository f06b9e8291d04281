"""The DeepSpeed engine, built from our config: ZeRO over the data-parallel group.

Choices that matter for correctness:
- a client `torch.optim.AdamW` (DeepSpeed's FusedAdam would compile for a minute on CPU), with no
  weight decay on norms and biases;
- `gradient_clipping` always set explicitly (DeepSpeed's default would silently clip at 1.0);
- the LR schedule as a client `LambdaLR`, stepped by the engine at each optimizer step and saved
  in its checkpoints;
- with one data-parallel rank, ZeRO 0 and no pipeline, no gradient all-reduce (over one rank it
  changes nothing and costs ~2% of a small model's step).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from megalite.config import Config
from megalite.parallel.deepspeed_compat import skip_lone_reduction
from megalite.parallel.dims import DeepSpeedMPU, ParallelDims
from megalite.parallel.schedule import build_scheduler


def param_groups(model: nn.Module, *, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices (linear and embedding weights); never norms' gains or biases (ndim < 2).
    A ZeRO-3 parameter is judged by its full shape (`ds_shape`; its data is a flat partition)."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for _, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        if not p.requires_grad:
            continue
        (decay if len(getattr(p, "ds_shape", p.shape)) >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, cfg: Config) -> torch.optim.AdamW:
    o = cfg.optim
    return torch.optim.AdamW(
        param_groups(model, weight_decay=o.weight_decay),
        lr=o.lr,
        betas=(o.beta1, o.beta2),
        eps=o.eps,
        foreach=False,
    )


def megalite_clips(cfg: Config) -> bool:
    """fp32 without ZeRO and without a pipeline: DeepSpeed would clip but not report the norm, so
    the trainer clips (and DeepSpeed's own clipping is off)."""
    p = cfg.parallel
    return p.effective_zero_stage == 0 and cfg.trainer.precision == "fp32" and p.pp == 1


def deepspeed_config(cfg: Config) -> dict[str, Any]:
    t = cfg.trainer
    stage = cfg.parallel.effective_zero_stage
    ds: dict[str, Any] = {
        # DeepSpeed's data-parallel ranks are dp x cp (dims.DeepSpeedMPU), each counted as
        # holding micro_batch_size sequences: its batch is cp x the global batch of windows.
        "train_batch_size": t.global_batch_size * cfg.parallel.cp,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum_steps,
        "gradient_clipping": 0.0 if megalite_clips(cfg) else float(cfg.optim.grad_clip),
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": t.precision == "bf16"},
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
        "dump_state": False,
    }
    if cfg.parallel.pp > 1:
        # DeepSpeed splits stage-boundary activations over the TP ranks and re-gathers them,
        # which assumes they are identical on every TP rank; under sequence parallelism each
        # rank holds its own slice of the sequence, so they are sent whole.
        sp = cfg.parallel.sequence_parallel
        ds["pipeline"] = {"pipe_partitioned": not sp, "grad_partitioned": not sp}
    if stage == 3:
        # Keep every parameter partitioned between uses; the small-model defaults are fine.
        ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = False
    return ds


def build_engine(model: nn.Module, cfg: Config, dims: ParallelDims) -> tuple[Any, Any]:
    """Wrap `model` in a DeepSpeed engine; returns (engine, lr_scheduler)."""
    import deepspeed

    engine, _, _, scheduler = deepspeed.initialize(
        model=model,
        optimizer=build_optimizer(model, cfg),
        # A callable, so the schedule drives the optimizer DeepSpeed actually steps.
        lr_scheduler=lambda opt: build_scheduler(
            opt, optim=cfg.optim, max_steps=cfg.trainer.max_steps
        ),
        config=deepspeed_config(cfg),
        # A PipelineModule brings its own grid (same rank order); DeepSpeed refuses an mpu then.
        mpu=None if dims.pp > 1 else DeepSpeedMPU(dims),
        dist_init_required=False,
    )
    if dims.dp_cp == 1 and dims.pp == 1 and cfg.parallel.effective_zero_stage == 0:
        skip_lone_reduction(engine)  # an all-reduce over one rank: the gradients unchanged
    return engine, scheduler
