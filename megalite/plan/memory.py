"""Memory per GPU of a training layout: model state under ZeRO 0-3, activations, buffers.

Model state (weights, gradients, optimizer state) is counted tensor by tensor the way the DeepSpeed
engine megalite builds (megalite/parallel/engine.py: a client AdamW, two parameter groups, default
ZeRO settings) actually holds it; tests/plan/test_engine_bytes.py checks every figure against a
real engine to the byte. With p the weights' bytes per element (2 bf16, 4 fp32), per rank:

- ZeRO 0: weights p, gradients p, AdamW moments 8 bytes per parameter. In bf16 DeepSpeed wraps
  the optimizer with an fp32 master copy (FP16_UnfusedOptimizer, one per tensor; under a
  pipeline BF16_Optimizer, which flattens and shards it over dp like ZeRO 1).
- ZeRO 1 and 2: each parameter group is flattened and padded to a multiple of 2 x dp; each rank
  keeps the fp32 master, exp_avg and exp_avg_sq of its 1/dp slice (12 bytes per element, in fp32
  too: DeepSpeed always clones the master). ZeRO 1 keeps whole gradients while micro-batches
  accumulate; ZeRO 2 keeps the gradients of the parameters that overlap its slice (whole).
- ZeRO 3: every parameter is split into ceil(numel / dp) pieces; parameters of at most 1e5
  elements (`stage3_param_persistence_threshold`) also stay whole on every rank.

Plus one 4-byte `step` tensor per tensor the inner AdamW steps (per parameter, or per flat group).

Host memory at start-up (`host_memory`, per rank of a GPU run; on a CPU run the device memory is
the host's): the process itself (torch, DeepSpeed and megalite loaded, the process group joined:
`PROCESS_BYTES`, measured on CPU; the CUDA driver's own host memory comes on top and is not
measured here) plus the larger of the build's scratch (each parameter shard is drawn in fp32 on
the CPU, one at a time, then copied to the GPU) and a resume's largest read (DeepSpeed loads each
checkpoint file whole into host memory: the model states, then the rank's ZeRO optimizer
partition; without ZeRO one file holds both).

Activations follow Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer
Models", arXiv:2205.05198, section 4): every tensor saved for backward, per layer, for megalite's
Llama block (RMSNorm, GQA, SwiGLU, no dropout) rather than their GPT block, assuming the fast
kernels megalite picks on GPUs (flash-attn: no s x s matrix is stored, only its output and the
fp32 log-sum-exp; apex's fused RMSNorm: input and fp32 inverse rms). Per layer and micro-batch, with
r = s*b*h, split t ways by sequence parallelism, and e the activations' bytes per element:

    norms' inputs 2r + linear inputs (qkv, gate-up) 2sbh + q, o, wo input 3sbh/t + k, v 2sbg/t
    + MLP 4sbf/t (gate-up output, silu, w2 input)  [x e]  + fp32: rms 2*4sb(/t), lse 4bs*heads/t

Departure from the paper: megalite's sequence-parallel all-gather keeps its (full-sequence) output
for the linear layer's backward, so the two linear inputs stay 2sbh under SP (Megatron re-gathers
them, dividing them by t too). `selective` recomputation (megalite: the attention core only) drops
the core's output and lse; `full` keeps each block's input (s*b*h/t with SP) plus one block's full
set while it is recomputed. Pipeline stages hold min(pp - stage, micro-batches) micro-batches in
flight under 1F1B, and their output tensors; the last stage adds the logits and their fp32 copy.
"""

from __future__ import annotations

import math
from bisect import bisect_left, bisect_right
from dataclasses import dataclass, fields
from functools import lru_cache
from itertools import accumulate
from typing import TYPE_CHECKING

from megalite.config import ModelConfig
from megalite.plan.shape import (
    RankTensor,
    block_tensors,
    kv_rows,
    stage_blocks,
    stage_tensors,
    vocab_rows,
)

if TYPE_CHECKING:
    from megalite.plan.layout import Layout

# DeepSpeed defaults megalite does not override (deepspeed/runtime/zero/config.py).
PERSISTENCE_THRESHOLD = 100_000  # stage3_param_persistence_threshold, elements
SUB_GROUP_SIZE = 1_000_000_000  # stage 3 sub_group_size, elements
REDUCE_BUCKET = 500_000_000  # reduce_bucket_size / allreduce_bucket_size, elements
MAX_LIVE_PARAMETERS = 1_000_000_000  # stage3_max_live_parameters, elements
STEP_BYTES = 4  # torch AdamW's per-tensor `step` (a float32 scalar)


@dataclass(frozen=True)
class ModelState:
    """Bytes one rank holds for the model: weights, gradients, optimizer state (AdamW moments, fp32
    master copy, steps), and the transient buffers of the backward pass and of the step."""

    weights: int
    gradients: int
    optimizer: int
    backward_buffers: int  # gradient-reduction buckets, ZeRO-3 gathered parameters
    step_buffers: int  # fp32 gradient copies made by the optimizer step


def param_groups(tensors: list[RankTensor]) -> list[list[RankTensor]]:
    """engine.param_groups: matrices (decayed) then vectors, each sorted by name; empty dropped."""
    ordered = sorted(tensors, key=lambda t: t.name)
    groups = [[t for t in ordered if t.ndim >= 2], [t for t in ordered if t.ndim < 2]]
    return [g for g in groups if g]


def _overlaps(numels: list[int], flat: int, dp: int, ranks: range | list[int]) -> list[int]:
    """For each of `ranks`: the numels of the tensors (laid end to end in a flat buffer of `flat`
    elements cut into dp slices) that overlap the rank's slice, counted whole."""
    ends = list(accumulate(numels))
    starts = [e - n for e, n in zip(ends, numels, strict=True)]
    prefix = [0, *ends]
    out = []
    for r in ranks:
        lo, hi = r * flat // dp, (r + 1) * flat // dp
        first = bisect_right(ends, lo)  # the first tensor ending after lo
        last = bisect_left(starts, hi)  # past the last tensor starting before hi
        out.append(prefix[last] - prefix[first] if last > first else 0)
    return out


def model_state(
    tensors: list[RankTensor],
    *,
    dp: int,
    zero: int,
    precision: str,
    pipeline: bool,
    dp_rank: int | None = None,
) -> ModelState:
    """What one rank holds for `tensors` (its TP/PP share) under ZeRO stage `zero` as it runs
    (the effective stage: 0 when dp = pp = 1). `dp_rank` None: the largest over the dp ranks
    (only ZeRO 2's gradients differ between ranks)."""
    p = 2 if precision == "bf16" else 4  # weights and gradients (DeepSpeed accumulates in them)
    groups = [[t.numel for t in g] for g in param_groups(tensors)]
    total = sum(map(sum, groups))
    n_tensors = sum(map(len, groups))
    bucket = min(REDUCE_BUCKET, total) * p

    def padded(numel: int) -> int:  # a flat group, padded to a multiple of 2 x dp
        return math.ceil(numel / (2 * dp)) * 2 * dp

    if zero == 0 and precision == "fp32":  # the client AdamW, unwrapped
        return ModelState(
            weights=total * p,
            gradients=total * p,
            optimizer=8 * total + STEP_BYTES * n_tensors,
            backward_buffers=bucket,
            step_buffers=0,
        )
    if zero == 0 and not pipeline:  # bf16: FP16_UnfusedOptimizer, an fp32 master per tensor
        return ModelState(
            weights=total * p,
            gradients=total * p,
            optimizer=12 * total + STEP_BYTES * n_tensors,
            backward_buffers=bucket,
            step_buffers=4 * total,
        )
    if zero in (0, 1, 2):  # ZeRO 1/2, or bf16 ZeRO 0 under a pipeline (BF16_Optimizer: alike)
        flats = [padded(sum(g)) for g in groups]
        part = sum(f // dp for f in flats)
        if zero == 2:
            ranks = range(dp) if dp_rank is None else [dp_rank]
            per_group = [_overlaps(g, f, dp, ranks) for g, f in zip(groups, flats, strict=True)]
            grads = max(map(sum, zip(*per_group, strict=True)))
        elif zero == 1:
            grads = total
        else:  # BF16_Optimizer accumulates into a padded flat buffer of the weights' dtype
            grads = sum(flats)
        return ModelState(
            weights=sum(flats) * p,
            gradients=grads * p,
            optimizer=12 * part + STEP_BYTES * len(groups),
            backward_buffers=bucket,
            step_buffers=4 * part,
        )
    # ZeRO 3
    pieces = [[math.ceil(n / dp) for n in g] for g in groups]
    part = sum(map(sum, pieces))
    persistent = sum(n for g in groups for n in g if n <= PERSISTENCE_THRESHOLD)
    sub_groups = sum(_sub_groups(g) for g in pieces)
    return ModelState(
        weights=(part + persistent) * p,
        gradients=part * p,
        optimizer=12 * part + STEP_BYTES * sub_groups,
        backward_buffers=bucket,  # + the gathered parameters, added by stage_memory
        step_buffers=4 * part,
    )


def _sub_groups(pieces: list[int]) -> int:
    """How many sub-groups DeepSpeed's stage 3 cuts a group of partitions into."""
    if sum(pieces) <= SUB_GROUP_SIZE:
        return 1
    count, size = 0, 0
    for i, n in enumerate(pieces):
        size += n
        if size >= SUB_GROUP_SIZE or i == len(pieces) - 1:
            count, size = count + 1, 0
    return count


# ---------------------------------------------------------------------------------------------
# Activations


def block_activation_bytes(cfg: ModelConfig, layout: Layout, *, recompute: str) -> int:
    """Bytes one block saves for backward for one micro-batch (see the module doc)."""
    s, b, t = layout.seq_len, layout.micro_batch, layout.tp
    e = 2 if layout.precision == "bf16" else 4
    seq_split = t if layout.sp else 1
    h, f = cfg.dim, cfg.ffn_dim
    a = cfg.n_heads * cfg.head_dim
    residual = s * b * h // seq_split
    if recompute == "full":
        return residual * e
    linear_inputs = 2 * s * b * h  # gathered (SP) or replicated (TP) inputs of qkv and gate-up
    q_k_v = s * b * (a // t + 2 * kv_rows(cfg, t))
    attn_out = s * b * (a // t)  # the core's output (flash keeps it) ...
    wo_in = s * b * (a // t)  # ... and its (b, s, heads x hd) copy, wo's input
    mlp = 4 * s * b * (f // t)
    fp32 = 2 * 4 * s * b // seq_split  # RMSNorm inverse rms, two norms
    lse = 4 * b * (cfg.n_heads // t) * s  # flash-attn's log-sum-exp, fp32
    saved = (2 * residual + linear_inputs + q_k_v + wo_in + mlp) * e + fp32
    if recompute == "selective":  # the core is rerun: its output and lse are not kept
        return saved
    return saved + attn_out * e + lse


def head_activation_bytes(cfg: ModelConfig, layout: Layout) -> int:
    """The last stage's final norm and head: norm input, head input, logits and their fp32 copy
    (which the cross-entropy keeps for its backward)."""
    s, b, t = layout.seq_len, layout.micro_batch, layout.tp
    e = 2 if layout.precision == "bf16" else 4
    residual = s * b * cfg.dim // (t if layout.sp else 1)
    logits = s * b * vocab_rows(cfg, t)
    return (
        (residual + s * b * cfg.dim) * e + 4 * s * b // (t if layout.sp else 1) + logits * (e + 4)
    )


@dataclass(frozen=True)
class StageMemory:
    """Bytes per GPU of one pipeline stage (the largest over its TP and DP ranks)."""

    stage: int
    state: ModelState
    activations_per_micro_batch: int  # the blocks' saved tensors (+ head on the last stage)
    in_flight: int  # micro-batches whose activations are held at once (1F1B)
    recompute_working_set: int  # one block's full activations while `full` recomputes it
    pipeline_buffers: int  # output tensors of the in-flight micro-batches (pp > 1)

    @property
    def activations(self) -> int:
        """Activations held at the peak: in-flight micro-batches, a block being recomputed, and
        the pipeline's output tensors."""
        return (
            self.activations_per_micro_batch * self.in_flight
            + self.recompute_working_set
            + self.pipeline_buffers
        )

    @property
    def temporary(self) -> int:
        """Transient buffers alongside the activations (the backward's reduction buckets, ZeRO-3's
        gathered parameters)."""
        return self.state.backward_buffers

    @property
    def total(self) -> int:
        """The peak: model state plus the larger of the backward phase (activations and its
        buffers) and the optimizer step (its fp32 copies, once the activations are freed)."""
        s = self.state
        transient = max(self.activations + s.backward_buffers, s.step_buffers)
        return s.weights + s.gradients + s.optimizer + transient


def stage_memory(cfg: ModelConfig, layout: Layout, stage: int) -> StageMemory:
    """Memory of pipeline stage `stage` under `layout`."""
    state = _cached_state(
        _key(cfg), layout.tp, layout.pp, stage, layout.dp, layout.effective_zero, layout.precision
    )
    blocks = len(stage_blocks(cfg.n_layers, layout.pp, stage))
    last = stage == layout.pp - 1
    per_block = block_activation_bytes(cfg, layout, recompute=layout.ac)
    per_micro = blocks * per_block + (head_activation_bytes(cfg, layout) if last else 0)
    in_flight = min(layout.pp - stage, layout.grad_accum)
    working = block_activation_bytes(cfg, layout, recompute="none") if layout.ac == "full" else 0
    e = 2 if layout.precision == "bf16" else 4
    residual = layout.seq_len * layout.micro_batch * cfg.dim // (layout.tp if layout.sp else 1)
    buffers = 0 if last else in_flight * residual * e
    return StageMemory(
        stage=stage,
        state=state,
        activations_per_micro_batch=per_micro,
        in_flight=in_flight,
        recompute_working_set=working,
        pipeline_buffers=buffers,
    )


# The anonymous memory of a rank just before its model is built (torch, DeepSpeed, megalite
# imported, gloo joined): 172 MiB, measured by tools/bench/startup.py (its "base" column) and
# by a tiny tp2 run of launch/pretrain.py (its "memory after step 1" line).
PROCESS_BYTES = 172 * 2**20


@dataclass(frozen=True)
class HostMemory:
    """Host bytes of one rank of pipeline stage `stage` at start-up (see the module doc)."""

    stage: int
    process: int  # the loaded process (PROCESS_BYTES)
    build: int  # the largest parameter shard, drawn in fp32 on the CPU
    resume: int  # the largest checkpoint file DeepSpeed reads into host memory

    @property
    def peak(self) -> int:
        return self.process + max(self.build, self.resume)


def host_memory(cfg: ModelConfig, layout: Layout, stage: StageMemory) -> HostMemory:
    """Host memory at start-up of a rank of `stage` (its `stage_memory` under `layout`)."""
    tensors = stage_tensors(cfg, tp=layout.tp, pp=layout.pp, stage=stage.stage)
    s = stage.state
    resume = s.weights + s.optimizer if layout.effective_zero == 0 else max(s.weights, s.optimizer)
    return HostMemory(
        stage=stage.stage,
        process=PROCESS_BYTES,
        build=4 * max(t.numel for t in tensors),
        resume=resume,
    )


def _key(cfg: ModelConfig) -> tuple:
    return tuple(getattr(cfg, f.name) for f in fields(cfg))


@lru_cache(maxsize=4096)
def _cached_state(
    key: tuple, tp: int, pp: int, stage: int, dp: int, zero: int, precision: str
) -> ModelState:
    cfg = ModelConfig(*key)
    tensors = stage_tensors(cfg, tp=tp, pp=pp, stage=stage)
    state = model_state(tensors, dp=dp, zero=zero, precision=precision, pipeline=pp > 1)
    if zero == 3:
        # The parameters gathered for the block being computed and the one prefetched.
        p = 2 if precision == "bf16" else 4
        block = sum(t.numel for t in block_tensors(cfg, tp, 0))
        gathered = min(MAX_LIVE_PARAMETERS, 2 * block) * p
        state = ModelState(
            weights=state.weights,
            gradients=state.gradients,
            optimizer=state.optimizer,
            backward_buffers=state.backward_buffers + gathered,
            step_buffers=state.step_buffers,
        )
    return state
