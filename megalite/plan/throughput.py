"""Step time and tokens per second of a layout: compute at an assumed MFU, the pipeline bubble,
recomputation, and the communication megalite does not overlap.

The model, per step of m = global_batch / (micro_batch x dp) micro-batches:

    step = (m + pp - 1) x slowest stage's time per micro-batch  +  data-parallel communication

A stage's time per micro-batch is its matmul FLOPs (recomputation included) divided by
peak x `mfu`, plus its tensor-parallel collectives (4 per block: an all-reduce, or an all-gather
and a reduce-scatter, after attention and after the MLP, forward and backward; 2 more when `full`
recomputation reruns the forward) and its pipeline sends. Collectives are ring algorithms
(2 (n-1)/n of the bytes for an all-reduce) at the link's nominal bandwidth: NVLink inside a node,
the network (default 50 GB/s per GPU, one 400 Gb/s NIC each) between nodes; none of them overlaps
compute (megalite leaves DeepSpeed's overlap_comm off). Data parallelism per step: ZeRO 0
all-reduces the gradients (and under a pipeline in bf16 all-gathers the weights its BF16_Optimizer
updated 1/dp each), ZeRO 1 reduce-scatters them and all-gathers the weights, ZeRO 2 does its
reduce-scatter every micro-batch, ZeRO 3 also all-gathers the weights twice per micro-batch (three
times with full recomputation).

So `mfu` is the utilisation a layout would reach without bubble, recomputation or exposed
communication; each layout's own MFU (model FLOPs / (step time x GPUs x peak)) comes out lower.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from megalite.config import ModelConfig
from megalite.model.flops import (
    attention_flops_fwd,
    flops_per_token,
    head_flops_fwd,
    layer_flops_fwd,
)
from megalite.plan.gpus import GPU
from megalite.plan.shape import stage_blocks, stage_param_count

if TYPE_CHECKING:
    from megalite.plan.layout import Layout


@dataclass(frozen=True)
class Network:
    gpus_per_node: int = 8
    inter_node_gb_s: float = 50.0  # per GPU and direction


@dataclass(frozen=True)
class StepTime:
    step_s: float
    tokens_per_s: float
    mfu: float  # model FLOPs / (step time x GPUs x peak)
    bubble: float  # (pp - 1) / (m + pp - 1)
    model_flops: float  # per step, exact count (flops_per_token x tokens)
    executed_flops: float  # per step, with recomputation
    compute_s: float  # the slowest stage's matmuls over the step, bubble included
    tp_comm_s: float
    pp_comm_s: float
    dp_comm_s: float


def _ring_all_reduce(nbytes: float, n: int, gb_s: float) -> float:
    return 0.0 if n == 1 else 2 * (n - 1) / n * nbytes / (gb_s * 1e9)


def _ring_half(nbytes: float, n: int, gb_s: float) -> float:
    """An all-gather or a reduce-scatter of `nbytes` (the full tensor) over n ranks."""
    return 0.0 if n == 1 else (n - 1) / n * nbytes / (gb_s * 1e9)


def stage_flops_per_token(cfg: ModelConfig, layout: Layout, stage: int) -> tuple[float, float]:
    """(model, executed) training FLOPs per token of `stage` on the whole TP group."""
    blocks = len(stage_blocks(cfg.n_layers, layout.pp, stage))
    layer = layer_flops_fwd(cfg, layout.seq_len)
    model = 3 * blocks * layer
    if stage == layout.pp - 1:
        model += 3 * head_flops_fwd(cfg)
    extra = {"none": 0.0, "selective": attention_flops_fwd(cfg, layout.seq_len), "full": layer}
    return model, model + blocks * extra[layout.ac]


def step_time(
    cfg: ModelConfig, layout: Layout, gpu: GPU, *, mfu: float, network: Network
) -> StepTime:
    e = 2 if layout.precision == "bf16" else 4
    t, pp, dp, m = layout.tp, layout.pp, layout.dp, layout.grad_accum
    tokens_mb = layout.micro_batch * layout.seq_len
    inter, node = network.inter_node_gb_s, network.gpus_per_node
    activation = tokens_mb * cfg.dim * e  # one (b, s, h) tensor, whole
    # pipeline neighbours are tp x dp ranks apart: same node only if a node holds two stages
    pp_link = gpu.link_gb_s if 2 * t * dp <= node else inter
    dp_link = gpu.link_gb_s if t * dp <= node else inter

    stages = sorted({0, pp - 1})  # the others hold no more blocks than stage 0 and no head
    worst = (0.0, 0.0, 0.0, 0.0)  # (total, compute, tp comm, pp comm) per micro-batch
    for stage in stages:
        _, executed = stage_flops_per_token(cfg, layout, stage)
        compute = executed * tokens_mb / t / (gpu.peak_flops * mfu)
        blocks = len(stage_blocks(cfg.n_layers, pp, stage))
        collectives = blocks * (6 if layout.ac == "full" else 4)
        collectives += (stage == 0) + (stage == pp - 1)  # embedding and head
        tp_comm = collectives * _ring_all_reduce(activation, t, gpu.link_gb_s)
        pp_comm = 0.0 if pp == 1 else 2 * activation / t / (pp_link * 1e9)
        total = compute + tp_comm + pp_comm
        if total > worst[0]:
            worst = (total, compute, tp_comm, pp_comm)

    p = e  # weights and gradients share the dtype
    params = max(stage_param_count(cfg, tp=t, pp=pp, stage=s) for s in stages)
    zero = layout.effective_zero
    grads, weights = params * p, params * p
    if zero == 0:
        dp_comm = _ring_all_reduce(grads, dp, dp_link)
        if pp > 1 and layout.precision == "bf16":  # BF16_Optimizer: each rank updates 1/dp
            dp_comm += _ring_half(weights, dp, dp_link)
    elif zero == 1:
        dp_comm = _ring_half(grads, dp, dp_link) + _ring_half(weights, dp, dp_link)
    elif zero == 2:
        dp_comm = m * _ring_half(grads, dp, dp_link) + _ring_half(weights, dp, dp_link)
    else:
        gathers = 3 if layout.ac == "full" else 2
        dp_comm = m * (gathers * _ring_half(weights, dp, dp_link) + _ring_half(grads, dp, dp_link))

    slots = m + pp - 1
    step = slots * worst[0] + dp_comm
    tokens = layout.global_batch * layout.seq_len
    model_flops = flops_per_token(cfg, layout.seq_len) * tokens
    recompute = stage_flops_per_token(cfg, replace(layout, pp=1), 0)
    executed = (model_flops / tokens + recompute[1] - recompute[0]) * tokens
    return StepTime(
        step_s=step,
        tokens_per_s=tokens / step,
        mfu=model_flops / (step * layout.gpus * gpu.peak_flops),
        bubble=(pp - 1) / slots,
        model_flops=model_flops,
        executed_flops=executed,
        compute_s=slots * worst[1],
        tp_comm_s=slots * worst[2],
        pp_comm_s=slots * worst[3],
        dp_comm_s=dp_comm,
    )
