"""Build this rank's part of the model, and nothing more: the one place the model meets ranks.

The plain `Llama` is made on the meta device (no memory); tensor parallelism cuts it there
(`parallelize.apply_tp`), context parallelism splits its sequence (`parallelize.apply_cp`),
activation checkpointing wraps its blocks, and a pipeline picks this stage's layers by DeepSpeed's
own rule. Only then are the parameters this rank holds created on its device and drawn, piece by
piece (`model.init`: each row or column from its own generator, so every layout starts from
exactly the single-process weights). Under ZeRO-3 each block is partitioned over the data-parallel
(dp x cp) group by DeepSpeed (`deepspeed.zero.Init(module=…)`) as soon as it is drawn, so a rank
never holds more than its partitions plus one block. With `init=False` (a resume: the checkpoint
overwrites every value) nothing is drawn.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import time

import torch
from torch import nn

from megalite.config import Config
from megalite.data.mixture import configured_sources
from megalite.data.shards import Retry, locate
from megalite.model.init import Rule, draw_into, init_rules
from megalite.model.llama import Llama, RotaryEmbedding
from megalite.parallel.checkpointing import apply_ac
from megalite.parallel.dims import DeepSpeedMPU, ParallelDims
from megalite.parallel.engine import deepspeed_config
from megalite.parallel.parallelize import (
    LossFn,
    apply_cp,
    apply_tp,
    head_entry,
    tag_plain_names,
)
from megalite.parallel.pipeline import (
    bubble_fraction,
    build_pipeline,
    layer_module,
    stage_bounds,
    stage_layers,
)
from megalite.parallel.placement import Piece, shard_of

log = logging.getLogger("megalite")


def build_model(
    cfg: Config, dims: ParallelDims, device: torch.device, *, init: bool = True
) -> tuple[nn.Module, LossFn]:
    """This rank's module (the model, or its pipeline stage) on `device`, and its loss function.
    Collective (TP and kv-replica groups, ZeRO-3 partitioning, the pipeline's tied weights)."""
    p = cfg.parallel
    started = time.perf_counter()
    model = Llama(cfg.model, device="meta")
    if cfg.data.document_mask:
        model.document_eod = data_eod_id(cfg)
        log.info("document mask: each document of a window on its own (ends at id %d)",
                 model.document_eod)  # fmt: skip
    loss_fn = apply_tp(model, dims, sequence_parallel=p.sequence_parallel)
    loss_fn = apply_cp(model, dims, impl=p.cp_impl, loss_fn=loss_fn)
    tag_plain_names(model)
    apply_ac(model, p.activation_checkpointing)
    if cfg.trainer.compile:
        compile_blocks(model)
    fill = Materialiser(cfg, dims, device, init=init)
    if p.pp == 1:
        partition = zero3_partitioner(cfg, dims) if cfg.parallel.effective_zero_stage == 3 else None
        for part in (model.embed, *model.layers, model.norm, model.head):
            fill(part)
            if partition is not None:
                partition(part)
        module: nn.Module = model
    else:
        module = _pipeline_stage(model, cfg, dims, fill, loss_fn)
    log.info(
        "model built: %s parameters on this rank (%s) in %.1f s%s",
        f"{fill.numel:,}",
        device,
        time.perf_counter() - started,
        "" if init else " (not drawn: the checkpoint fills them)",
    )
    return module, loss_fn


def data_eod_id(cfg: Config) -> int:
    """The end-of-document id of the run's data (its sources share one tokenizer)."""
    d = cfg.data
    retry = Retry(attempts=d.read_attempts, delay_s=d.retry_delay_s)
    return locate(configured_sources(d)[0].path, retry=retry).manifest.eod_token_id


def _pipeline_stage(
    model: Llama, cfg: Config, dims: ParallelDims, fill: Materialiser, loss_fn: LossFn
) -> nn.Module:
    p = cfg.parallel
    m = cfg.grad_accum_steps
    log.info(
        "pipeline: %d stages, %d micro-batches per step, partition %s; expected bubble "
        "(p-1)/(m+p-1) = %.1f%%",
        p.pp,
        m,
        p.pipeline_partition,
        100 * bubble_fraction(pp=p.pp, micro_batches=m),
    )
    layers, bounds = materialise_stage(model, cfg, dims, fill)
    return build_pipeline(
        layers, dims, loss_fn=loss_fn, partition=p.pipeline_partition, bounds=bounds
    )


def materialise_stage(
    model: Llama, cfg: Config, dims: ParallelDims, fill: Materialiser
) -> tuple[list, tuple[int, int]]:
    """The meta model's pipeline layer list with this rank's stage materialised; its bounds."""
    p = cfg.parallel
    layers = stage_layers(model, head_entry=head_entry(dims, sequence_parallel=p.sequence_parallel))
    bounds = stage_bounds(layers, pp=p.pp, stage=dims.pp_rank, partition=p.pipeline_partition)
    for entry in layers[bounds[0] : bounds[1]]:
        module = layer_module(entry)
        if module is not None:
            fill(module)
    return layers, bounds


def compile_blocks(model: Llama) -> None:
    """`trainer.compile`: torch.compile each transformer block in place, after TP and activation
    checkpointing are applied (their hooks and wrappers compile with it). Block by block keeps each
    graph small, lets pipeline stages cut between blocks, and compiles one block shape once."""
    for block in model.layers:
        block.compile()
    log.info("torch.compile: each of the %d transformer blocks", len(model.layers))


class Materialiser:
    """Replaces the meta parameters and buffers of a module with real ones on `device`: each
    parameter's shard allocated there and drawn from its plain tensors' rules (or left empty with
    `init=False`); nothing of it is ever whole on another device.
    A parameter shared by two modules (tied embeddings) is made once."""

    def __init__(self, cfg: Config, dims: ParallelDims, device: torch.device, *, init: bool):
        self.rules = init_rules(cfg.model, cfg.trainer.seed)
        self.tp, self.tp_rank = dims.tp, dims.tp_rank
        self.device, self.init = device, init
        self.made: dict[int, nn.Parameter] = {}
        self.numel = 0

    def __call__(self, module: nn.Module) -> None:
        for sub in module.modules():
            if isinstance(sub, RotaryEmbedding) and sub.cos.is_meta:
                sub.init_tables(self.device)
            for key, param in list(sub.named_parameters(recurse=False)):
                if param.is_meta:
                    setattr(sub, key, self._real(param))

    def _real(self, meta: nn.Parameter) -> nn.Parameter:
        made = self.made.get(id(meta))
        if made is None:
            made = nn.Parameter(self._values(meta), requires_grad=meta.requires_grad)
            made.__dict__.update(meta.__dict__)  # tp_shard, plain_name, DeepSpeed's flags
            self.made[id(meta)] = made
            self.numel += made.numel()
        return made

    def _values(self, meta: nn.Parameter) -> torch.Tensor:
        if not self.init:
            return torch.empty(meta.shape, dtype=meta.dtype, device=self.device)
        shard = shard_of(meta)
        out = torch.empty(meta.shape, dtype=meta.dtype, device=self.device)
        shard.assemble(
            out,
            lambda piece, region: draw_piece(self.rules[piece.name], piece, region),
            {name: self.rules[name].shape[shard.axis] for name in shard.names},
            tp=self.tp,
            rank=self.tp_rank,
        )
        return out


def draw_piece(rule: Rule, piece: Piece, region: torch.Tensor) -> None:
    """Draw the real units of `piece` of a plain tensor into `region` by `rule`."""
    whole = piece.real_size == rule.shape[piece.axis]
    if rule.std is not None and piece.axis != rule.axis and not whole:
        raise ValueError(
            f"{piece.name} is cut along dim {piece.axis} but drawn along dim {rule.axis}"
        )
    draw_into(region, rule, piece.start if piece.axis == rule.axis else 0)


def zero3_partitioner(cfg: Config, dims: ParallelDims):
    """Partition a materialised module's parameters over the data-parallel group, as the
    engine's ZeRO-3 would (DeepSpeed's `zero.Init(module=…)`): the full block is freed at once."""
    import deepspeed

    dtype = torch.bfloat16 if cfg.trainer.precision == "bf16" else torch.float32
    ds_config = deepspeed_config(cfg)
    mpu = DeepSpeedMPU(dims)

    def partition(module: nn.Module) -> None:
        # In the engine's dtype first: Init(module=…) partitions the tensors as they are, and the
        # engine's own cast (module.bfloat16()) no longer reaches a partitioned parameter.
        module.to(dtype)
        deepspeed.zero.Init(
            module=module,
            data_parallel_group=dims.group("dp_cp"),
            config_dict_or_path=ds_config,
            dtype=dtype,
            mpu=mpu,
        )
        release_freed_memory()

    return partition


def release_freed_memory() -> None:
    """Hand the C heap's free memory back to the OS (glibc's malloc_trim, every arena). Without
    it the blocks freed after partitioning could stay with the process: at 760m dp2 ZeRO-3 one
    rank in some runs held 0.9 GiB (0.6x its share) more at its build peak. A no-op where glibc
    is not the allocator."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim():
    """glibc's malloc_trim, loaded once; None without glibc."""
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None
