#!/usr/bin/env python3
"""Checkpoint conversion on CPU: `write_universal` (reshard) and `export_hf` against `cp -r` of the
same checkpoint, in seconds, GB/s and peak memory. Prints a table; measures, never asserts.

    python tools/bench/convert.py [--model 1b] [--tp 2 --pp 2 --dp 2] [--workdir DIR] [--keep]
    python tools/bench/convert.py --check RUN/checkpoints/step_N   (validate the generator)

The source is a random checkpoint of a Llama preset in a tp x pp x dp layout, written directly in
the format a real run writes, without training: an 8-process DeepSpeed job of the 1B model would
not fit in 24 GiB (every rank builds the full model before keeping its shard). Per (pp, tp) rank,
as `Trainer.save` → `engine.save_checkpoint` → `store.commit` write it:

- `zero_pp_rank_{dp}_mp_rank_{mp:02d}_optim_states.pt` (mp = pp_rank * tp + tp_rank): ZeRO-1's
  flat fp32 partitions of the two optimizer groups (matrices, then vectors, each in sorted module
  name order, padded to a multiple of 2 * dp, cut into dp equal parts), Adam's moments of the same
  shape, `param_slice_mappings`, paddings, the loss scaler, the AdamW param groups;
- `mp_rank_XX_model_states.pt` (DP rank 0): `param_shapes`, the LR scheduler, step counters,
  the DeepSpeed config; the module's state dict when pp = 1;
- `layer_{i:02d}-model_{tp:02d}-model_states.pt` when pp > 1: DeepSpeed's pipeline layers (0 the
  embedding, 1..n the blocks, n+1 the norm, n+2 the head; a tied head has no file and its weight
  is `tied_modules.embed.weight` on the first and last stages), split over stages as DeepSpeed's
  `partition_balanced` splits them;
- `rank_XXXXX.pt` per global rank (data-stream state, RNG) and `meta.json` through `store.commit`.

TP shards are cut by the library's own pieces: the shapes and `tp_shards` specs come from
`parallelize.cut_model` (what `apply_tp` runs) applied to a meta-device model, and the values
from `TPShard.cut` (the rule `load_universal` reads full tensors' slices by).
The generator writes one file at a time, filling it one tensor at a time, so its memory stays
near one DP file's three partitions plus one full tensor and its cut (measured: 5.1 GiB peak for 1b
at 2x2x2, whose DP files hold 2.25 GB each), never the whole model (14.8 GB of fp32 state).

Values: each full tensor (plain name, kind) is a window of a fixed pool of Gaussian numbers
(`POOL` of them, a prime count, so no row length or shard boundary lines up with its period) at
an offset set by the name: as cheap to regenerate as a copy, and a function of `--seed` alone, so
`--check` regenerates them and compares. (torch.randn makes 20-40 M numbers/s on this machine:
drawing the ~10 G numbers the 2x2x2 1b layout asks for would take minutes.)

`--check CKPT` generates a checkpoint of CKPT's model, layout, step and config and compares it
with CKPT file by file (the same files; in each, the same keys, shapes, dtypes, param shapes and
slice mappings), through `CheckpointReader` (same names, specs and shapes) and by value (the
reader returns exactly the generated full tensors; and the generator's TP cut of CKPT's own full
tensors reproduces CKPT's saved shards).

Measurement: each conversion runs in a fresh subprocess; its time (and CPU time) is taken inside
it around the library call (no interpreter start, no imports) and its peak RSS is the child's
`ru_maxrss` (from `os.wait4`, so per child), as are the bytes it read from disk (`ru_inblock`:
page-cache misses). The interpreter's baseline is the same subprocess that imports torch and
megalite's conversion modules and converts nothing. `cp -r` of the source folder is the ceiling,
run after the conversions. Rates are bytes written per second (the output folder's size; for cp,
the copy's size). The tools do not fsync, so when they return part of their output may still be
dirty in the page cache (up to the kernel's dirty limit, a fifth of memory by default): an fsync
of the output is timed after each step ("+fsync") and the durable rate (seconds + fsync) is the one
compared with cp's. Page cache cannot be dropped here: every number is warm-cache (whatever of the
source the previous steps left in memory; "disk read" shows how much was not); `sync` runs,
untimed, before each step so no step pays for the previous one's dirty pages. Each output is
deleted once measured, to bound disk use (peak: the source plus its cp copy, 46 GB for 1b 2x2x2).
The machine's load average is printed: other jobs on these 2 cores change every number.
"""

# ruff: noqa: E402  (sys.path is set before the megalite imports)
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch
from torch import nn

from megalite.checkpoint import store
from megalite.checkpoint.reader import KINDS, CheckpointReader
from megalite.checkpoint.training import rng_state
from megalite.config import Config, validate
from megalite.data.stream import STATE_VERSION
from megalite.model.llama import Llama
from megalite.parallel import parallelize
from megalite.parallel.engine import build_optimizer, deepspeed_config
from megalite.parallel.pipeline import PARTITION_METHODS
from megalite.parallel.placement import TPShard
from megalite.parallel.schedule import build_scheduler

POOL = 16_777_259  # a prime just above 2**24: the period of every generated tensor
SCALE = {"param": 0.02, "exp_avg": 1e-3, "exp_avg_sq": 1e-3}  # exp_avg_sq is squared: ~1e-6
STEP = 100  # the generated checkpoint's step
GOAL_RATE = 0.5  # conversion rate >= this fraction of the cp rate
GOAL_RSS = 3.0  # peak RSS - interpreter baseline <= this many largest tensors
OPS = ("universal", "hf-fp32", "hf-bf16")
LABELS = {
    "universal": "write_universal (reshard 1x1x1)",
    "hf-fp32": "export_hf fp32",
    "hf-bf16": "export_hf bf16",
    "cp": "cp -r (ceiling)",
}
GB, GIB = 1e9, 2**30


# ---- values ---------------------------------------------------------------------------------


class Values:
    """The generated checkpoint's full fp32 tensors, by (plain name, kind): a pure function of the
    seed, so validation can regenerate any of them."""

    def __init__(self, seed: int, shapes: dict[str, torch.Size]) -> None:
        self.seed = seed
        self.shapes = shapes
        self._pools: dict[str, torch.Tensor] = {}

    def _pool(self, kind: str) -> torch.Tensor:
        if kind not in self._pools:
            g = torch.Generator().manual_seed(self.seed * len(KINDS) + KINDS.index(kind))
            pool = torch.randn(POOL, generator=g) * SCALE[kind]
            self._pools[kind] = pool.square_() if kind == "exp_avg_sq" else pool
        return self._pools[kind]

    def full(self, name: str, kind: str) -> torch.Tensor:
        pool, shape = self._pool(kind), self.shapes[name]
        n = math.prod(shape)
        out = torch.empty(n)
        pos, done = zlib.crc32(name.encode()) % POOL, 0
        while done < n:
            k = min(n - done, POOL - pos)
            out[done : done + k] = pool[pos : pos + k]
            done, pos = done + k, 0
        return out.view(shape)


FullFn = Callable[[str, str], torch.Tensor]  # (plain name, kind) -> full fp32 tensor


# ---- the layout: which rank holds what, under which name --------------------------------------


@dataclass(frozen=True)
class LocalParam:
    """One parameter of one model-parallel rank's DeepSpeed module."""

    module_name: str  # DeepSpeed's name: `3.attn.wq.weight`, `tied_modules.embed.weight`, ...
    shape: tuple[int, ...]  # the local (TP shard) shape
    plain: str  # the plain parameter it is (the first of a fused gate/up pair)
    shard: TPShard | None  # how it is cut from the full tensor(s); None: replicated


@dataclass
class Group:
    """One ZeRO optimizer group of one model-parallel rank: flattened in `params` order, padded
    to a multiple of 2 * dp (DeepSpeed's `nccl_start_alignment_factor` times dp) and cut into
    `dp` partitions of `partition` elements."""

    params: list[LocalParam]
    offsets: list[int]
    total: int
    dp: int
    partition: int

    @classmethod
    def of(cls, params: list[LocalParam], dp: int) -> Group:
        offsets, total = [], 0
        for p in params:
            offsets.append(total)
            total += math.prod(p.shape)
        aligned = -(-total // (2 * dp)) * (2 * dp)
        return cls(params, offsets, total, dp, aligned // dp)

    def fragments(self, dp_rank: int) -> Iterator[tuple[LocalParam, int, int, int]]:
        """(param, start in the param, start in this partition, numel) for every parameter with
        elements in DP partition `dp_rank`, as DeepSpeed's `get_hp_fragment_mapping` cuts them."""
        lo, hi = dp_rank * self.partition, (dp_rank + 1) * self.partition
        for p, off in zip(self.params, self.offsets, strict=True):
            start, end = max(off, lo), min(off + math.prod(p.shape), hi)
            if start < end:
                yield p, start - off, start - lo, end - start

    def lean(self, dp_rank: int) -> int:
        """Elements of partition `dp_rank` that are not padding."""
        return max(0, min(self.partition, self.total - dp_rank * self.partition))


@dataclass
class MPRank:
    """Everything one (pp_rank, tp_rank) pair saves."""

    pp_rank: int
    tp_rank: int
    params: list[LocalParam]
    groups: list[Group]
    layer_files: dict[int, list[tuple[str, LocalParam]]]  # pp > 1: layer index -> (key, param)
    module_keys: list[tuple[str, LocalParam]]  # pp = 1: the module's state-dict entries
    module_metadata: Any = None  # pp = 1: the state dict's `_metadata` (module versions)


def tp_model(cfg: Config, tp: int, tp_rank: int) -> Llama:
    """The meta-device model as `apply_tp` leaves it on `tp_rank` (its shard-cutting helpers,
    without the process groups and hooks that only the forward pass needs)."""
    model = Llama(cfg.model, device="meta")
    if tp > 1:
        # A tied head becomes a 0x0 ShardedLinear before taking the embedding's weight; its
        # init warns that a zero-element tensor is not initialised.
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
        m = cfg.model
        plan = parallelize.TPPlan(
            tp=tp, tp_rank=tp_rank, vocab_size=m.vocab_size, n_heads=m.n_heads,
            n_kv_heads=m.n_kv_heads, head_dim=m.head_dim, ffn_dim=m.ffn_dim,
        )  # fmt: skip
        parallelize.cut_model(model, plan, group=None, kv_group=None, sequence_parallel=False)
    parallelize.tag_plain_names(model)
    return model


def local_param(module_name: str, p: nn.Parameter) -> LocalParam:
    shard: TPShard | None = getattr(p, "tp_shard", None)
    plain = shard.names[0] if shard is not None else p.plain_name
    return LocalParam(module_name, tuple(p.shape), plain, shard)


def state_entries(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """A module's state dict as (key, parameter); it must hold parameters only (the RoPE tables
    are non-persistent buffers), as in a real checkpoint."""
    entries = list(module.state_dict(keep_vars=True).items())
    for key, t in entries:
        if not isinstance(t, nn.Parameter):
            raise RuntimeError(f"state dict entry {key} is not a parameter: not modelled here")
    return entries


def stage_bounds(cfg: Config, model: Llama, pp: int) -> list[int]:
    """DeepSpeed's split of [embed, blocks..., norm, head] into pp stages (`PipelineModule.
    _partition_layers` for our `parallel.pipeline_partition`)."""
    from deepspeed.runtime.utils import partition_balanced

    layers = [model.embed, *model.layers, model.norm, model.head]
    method = PARTITION_METHODS[cfg.parallel.pipeline_partition]
    if method == "parameters":  # the head counts the embedding's shard even when tied
        weights = [sum(p.numel() for p in m.parameters()) for m in layers]
    else:  # "type:TransformerBlock"
        weights = [0] + [1] * cfg.model.n_layers + [0, 0]
    return partition_balanced(weights=weights, num_parts=pp)


def mp_rank_plan(cfg: Config, model: Llama, pp_rank: int, tp_rank: int) -> MPRank:
    p = cfg.parallel
    tied = cfg.model.tie_embeddings
    params: dict[str, LocalParam] = {}
    layer_files: dict[int, list[tuple[str, LocalParam]]] = {}
    module_keys: list[tuple[str, LocalParam]] = []
    metadata = None
    if p.pp == 1:
        metadata = getattr(model.state_dict(keep_vars=True), "_metadata", None)
        by_id = {id(t): local_param(n, t) for n, t in model.named_parameters()}
        params = {lp.module_name: lp for lp in by_id.values()}
        module_keys = [(key, by_id[id(t)]) for key, t in state_entries(model)]
    else:
        bounds = stage_bounds(cfg, model, p.pp)
        layers = [model.embed, *model.layers, model.norm, model.head]
        last = len(layers) - 1
        for idx in range(bounds[pp_rank], bounds[pp_rank + 1]):
            is_tied = tied and idx in (0, last)
            entries = state_entries(layers[idx])
            for key, t in entries:
                name = f"tied_modules.embed.{key}" if is_tied else f"{idx}.{key}"
                params[name] = local_param(name, t)
            if not (is_tied and idx == last):  # DeepSpeed saves no file for a tied forward_fn
                layer_files[idx] = [
                    (key, params[f"tied_modules.embed.{key}" if is_tied else f"{idx}.{key}"])
                    for key, _ in entries
                ]
    ordered = sorted(params.values(), key=lambda lp: lp.module_name)  # engine.param_groups
    groups = [
        Group.of([lp for lp in ordered if len(lp.shape) >= 2], p.dp),
        Group.of([lp for lp in ordered if len(lp.shape) < 2], p.dp),
    ]
    return MPRank(
        pp_rank, tp_rank, list(params.values()), groups, layer_files, module_keys, metadata
    )


class Shards:
    """Local (TP shard) tensors of one TP rank, cut from `full`; keeps the last one per kind, as
    a parameter that straddles two DP partitions is wanted by both in turn."""

    def __init__(self, full: FullFn, tp: int, tp_rank: int) -> None:
        self.full, self.tp, self.tp_rank = full, tp, tp_rank
        self._last: dict[str, tuple[str, torch.Tensor]] = {}

    def get(self, lp: LocalParam, kind: str) -> torch.Tensor:
        hit = self._last.get(kind)
        if hit is not None and hit[0] == lp.module_name:
            return hit[1]
        if lp.shard is None:
            t = self.full(lp.plain, kind)
        else:
            parts = {n: self.full(n, kind) for n in lp.shard.names}
            t = lp.shard.cut(parts, tp=self.tp, rank=self.tp_rank)
        # A compact copy: a view would drag the whole full tensor into torch.save.
        t = t.reshape(lp.shape).clone(memory_format=torch.contiguous_format)
        self._last[kind] = (lp.module_name, t)
        return t

    def clear(self) -> None:
        self._last.clear()


# ---- writing --------------------------------------------------------------------------------


@dataclass
class Common:
    """What every rank's files share: DeepSpeed's config and version, the LR scheduler's state
    and AdamW's param groups after `step` steps (from a real optimizer and `build_scheduler`)."""

    ds_config: dict[str, Any]
    ds_version: str
    lr_scheduler: dict[str, Any]
    param_groups: list[dict[str, Any]]

    @classmethod
    def of(cls, cfg: Config, step: int) -> Common:
        import deepspeed

        dummy = nn.Module()
        dummy.register_parameter("a", nn.Parameter(torch.zeros(1, 1)))  # the decay group
        dummy.register_parameter("b", nn.Parameter(torch.zeros(1)))  # the no-decay group
        opt = build_optimizer(dummy, cfg)
        sched = build_scheduler(opt, optim=cfg.optim, max_steps=cfg.trainer.max_steps)
        for _ in range(step):
            opt.step()  # no gradients: a no-op that keeps the scheduler's order check quiet
            sched.step()
        return cls(
            deepspeed_config(cfg), deepspeed.__version__, sched.state_dict(),
            opt.state_dict()["param_groups"],
        )  # fmt: skip


def zero_file(rank: MPRank, dp_rank: int, shards: Shards, common: Common, step: int) -> dict:
    """One DP rank's ZeRO-1 optimizer file of one model-parallel rank."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    flats = {kind: [torch.zeros(g.partition) for g in rank.groups] for kind in KINDS}
    for kind in KINDS:
        for g, group in enumerate(rank.groups):
            for lp, lp_start, hp_start, numel in group.fragments(dp_rank):
                local = shards.get(lp, kind).view(-1)
                flats[kind][g][hp_start : hp_start + numel] = local[lp_start : lp_start + numel]
        shards.clear()
    mappings = []
    for group in rank.groups:
        mappings.append(
            OrderedDict(
                (lp.module_name, fragment_address(numel=numel, start=hp_start))
                for lp, _, hp_start, numel in group.fragments(dp_rank)
            )
        )
    state = {
        g: {
            "step": torch.tensor(float(step)),
            "exp_avg": flats["exp_avg"][g],
            "exp_avg_sq": flats["exp_avg_sq"][g],
        }
        for g in range(len(rank.groups))
    }
    osd = {
        "loss_scaler": LossScaler(scale=1.0),
        "dynamic_loss_scale": False,
        "overflow": False,
        "clip_grad": float(common.ds_config["gradient_clipping"]),
        "base_optimizer_state": {"state": state, "param_groups": common.param_groups},
        # DeepSpeed saves the fp32 partitions without their padding (views of the padded ones).
        "single_partition_of_fp32_groups": [
            flat[: g.lean(dp_rank)] for flat, g in zip(flats["param"], rank.groups, strict=True)
        ],
        "zero_stage": ZeroStageEnum.optimizer_states,
        "group_paddings": [g.partition - g.lean(dp_rank) for g in rank.groups],
        "param_alignment_paddings": [[0] * len(g.params) for g in rank.groups],
        "partition_count": [g.dp for g in rank.groups],
        "ds_version": common.ds_version,
        "param_slice_mappings": mappings,
    }
    return {
        "optimizer_state_dict": osd,
        "ds_config": common.ds_config,
        "ds_version": common.ds_version,
    }


def model_states_file(
    cfg: Config, rank: MPRank, shards: Shards, common: Common, step: int
) -> dict[str, Any]:
    p = cfg.parallel
    module = None
    if p.pp == 1:  # the engine's module: views into ZeRO's flat (unpartitioned) group buffers
        views = {}
        for g in rank.groups:
            flat = torch.zeros(g.partition * g.dp)
            for lp, off in zip(g.params, g.offsets, strict=True):
                view = flat[off : off + math.prod(lp.shape)].view(lp.shape)
                views[lp.module_name] = view.copy_(shards.get(lp, "param"))
        module = OrderedDict((key, views[lp.module_name]) for key, lp in rank.module_keys)
        if rank.module_metadata is not None:
            module._metadata = rank.module_metadata  # type: ignore[attr-defined]
        shards.clear()
    return {
        "module": module,
        "buffer_names": [],
        "optimizer": None,
        "param_shapes": [
            OrderedDict((lp.module_name, torch.Size(lp.shape)) for lp in g.params)
            for g in rank.groups
        ],
        "frozen_param_shapes": None,
        "shared_params": {},
        "frozen_param_fragments": None,
        "lr_scheduler": common.lr_scheduler,
        "data_sampler": None,
        "random_ltd": None,
        "skipped_steps": 0,
        "global_steps": step,
        "global_samples": step * cfg.trainer.global_batch_size,
        "dp_world_size": p.dp,
        "mp_world_size": p.tp * p.pp,
        "checkpoint_parallel_dimensions": {"pp_degree": p.pp, "tp_degree": p.tp},
        "ds_config": common.ds_config,
        "ds_version": common.ds_version,
    }


def rank_file(cfg: Config, dp_rank: int, step: int, seed: int) -> dict[str, Any]:
    """A rank's own state as `Trainer.save` writes it: the data stream's position (DP-invariant:
    global windows) and the RNG states."""
    t = cfg.trainer
    data = {
        "version": STATE_VERSION, "split": "train", "seq_len": t.seq_len, "seed": t.seed,
        "shuffle": cfg.data.shuffle, "data": f"{zlib.crc32(str(seed).encode()):016x}",
        "window": step * t.global_batch_size, "epoch": 0,
        "micro_batch_size": t.micro_batch_size, "dp_size": cfg.parallel.dp, "dp_rank": dp_rank,
    }  # fmt: skip
    return {
        "step": step,
        "consumed_tokens": step * t.global_batch_size * t.seq_len,
        "initial_val_loss": math.log(cfg.model.vocab_size),
        "data": data,
        "rng": rng_state(),
    }


def generate(cfg: Config, root: Path, *, step: int, seed: int, full: FullFn | None = None) -> Path:
    """Write and commit a random checkpoint of `cfg` (model, layout) under `root`; returns the
    committed folder. `full` overrides the values (default: `Values(seed)`)."""
    p = cfg.parallel
    if p.zero_stage != 1 or cfg.trainer.precision != "fp32" or p.sequence_parallel:
        raise SystemExit("the generator writes fp32 ZeRO-1 checkpoints without sequence parallel")
    validate(cfg)
    if full is None:
        full = Values(seed, plain_shapes(cfg)).full
    common = Common.of(cfg, step)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / store.tmp_name(step)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    specs: dict[str, dict[str, Any]] = {}
    for tp_rank in range(p.tp):
        model = tp_model(cfg, p.tp, tp_rank)
        specs.update(parallelize.shard_specs(model))
        shards = Shards(full, p.tp, tp_rank)
        for pp_rank in range(p.pp):
            rank = mp_rank_plan(cfg, model, pp_rank, tp_rank)
            mp = pp_rank * p.tp + tp_rank
            for dp_rank in range(p.dp):
                state = zero_file(rank, dp_rank, shards, common, step)
                torch.save(state, tmp / f"zero_pp_rank_{dp_rank}_mp_rank_{mp:02d}_optim_states.pt")
                del state
            state = model_states_file(cfg, rank, shards, common, step)
            torch.save(state, tmp / f"mp_rank_{mp:02d}_model_states.pt")
            del state
            for idx, entries in rank.layer_files.items():
                layer = OrderedDict((key, shards.get(lp, "param")) for key, lp in entries)
                torch.save(layer, tmp / f"layer_{idx:02d}-model_{tp_rank:02d}-model_states.pt")
                del layer
                shards.clear()
    for global_rank in range(p.tp * p.pp * p.dp):
        dp_rank = (global_rank // p.tp) % p.dp
        torch.save(rank_file(cfg, dp_rank, step, seed), tmp / store.rank_file(global_rank))
    t = cfg.trainer
    meta = {
        "consumed_tokens": step * t.global_batch_size * t.seq_len,
        "model": dataclasses.asdict(cfg.model),
        "layout": {"tp": p.tp, "pp": p.pp, "dp": p.dp},
        "sequence_parallel": p.sequence_parallel,
        "tp_shards": dict(sorted(specs.items())),
        "zero_stage": p.zero_stage,
        "precision": t.precision,
        "data_path": None if cfg.data.path is None else str(cfg.data.path),
        "wandb_run_id": None,
        "config": dataclasses.asdict(cfg),
    }
    return store.commit(root, step, meta)


def plain_shapes(cfg: Config) -> dict[str, torch.Size]:
    return {n: t.shape for n, t in Llama(cfg.model, device="meta").named_parameters()}


def bench_config(model: str, tp: int, pp: int, dp: int) -> Config:
    from megalite.launch import compose_config

    return compose_config(
        [
            f"model={model}", f"parallel.tp={tp}", f"parallel.pp={pp}", f"parallel.dp={dp}",
            "parallel.zero_stage=1", "trainer.micro_batch_size=1",
            f"trainer.global_batch_size={8 * dp}", "logging.wandb.mode=disabled",
        ]
    )  # fmt: skip


# ---- validation against a real checkpoint ----------------------------------------------------


def skeleton(obj: Any) -> Any:
    """A value's structure: containers and keys kept, tensors as shape and dtype, slice mappings
    and shapes exact, other leaves as their type."""
    from deepspeed.utils.tensor_fragment import fragment_address

    if isinstance(obj, torch.Tensor):  # a Parameter and a plain tensor differ
        return (type(obj).__name__, tuple(obj.shape), str(obj.dtype))
    if isinstance(obj, torch.Size):
        return ("size", tuple(obj))
    if isinstance(obj, fragment_address):
        return ("fragment", obj.numel, obj.start)
    if isinstance(obj, dict):
        return (type(obj).__name__, {k: skeleton(v) for k, v in obj.items()})
    if isinstance(obj, list | tuple):
        return (type(obj).__name__, [skeleton(v) for v in obj])
    if obj is None or isinstance(obj, bool | str):
        return type(obj).__name__
    return type(obj).__name__


def first_difference(a: Any, b: Any, path: str = "") -> str | None:
    """Where two skeletons first differ (None if they are equal)."""
    if a == b:
        return None
    if isinstance(a, dict) and isinstance(b, dict):
        if list(a) != list(b):
            return f"{path}: keys {list(a)[:8]} != {list(b)[:8]}"
        for k in a:
            d = first_difference(a[k], b[k], f"{path}.{k}")
            if d:
                return d
    if isinstance(a, list | tuple) and isinstance(b, list | tuple) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            d = first_difference(x, y, f"{path}[{i}]")
            if d:
                return d
    return f"{path}: {str(a)[:160]} != {str(b)[:160]}"


def load(path: Path) -> Any:
    return torch.load(path, map_location="cpu", weights_only=False, mmap=True)


def check(real: Path, workdir: Path, seed: int) -> bool:
    """Generate a checkpoint like `real` and compare; prints one line per check."""
    from omegaconf import OmegaConf

    from megalite.launch import to_config

    problems: list[str] = []

    def report(ok: bool, what: str, detail: str = "") -> None:
        print(f"  {'ok  ' if ok else 'FAIL'} {what}{'' if ok else ': ' + detail}")
        if not ok:
            problems.append(what)

    meta = store.read_meta(real)
    cfg = to_config(OmegaConf.create(meta["config"]))
    values = Values(seed, plain_shapes(cfg))
    gen = generate(cfg, workdir / "checkpoints", step=meta["step"], seed=seed)
    gmeta = store.read_meta(gen)
    print(f"check: generated {gen} beside {real}")
    report(set(meta["files"]) == set(gmeta["files"]), "same file names",
           f"{sorted(set(meta['files']) ^ set(gmeta['files']))[:6]}")  # fmt: skip
    report(list(meta) == list(gmeta), "same meta.json keys", f"{list(meta)} != {list(gmeta)}")
    for key in ("model", "layout", "tp_shards", "zero_stage", "precision", "step",
                "consumed_tokens", "sequence_parallel"):  # fmt: skip
        report(meta[key] == gmeta[key], f"meta.json {key} equal", f"{meta[key]} != {gmeta[key]}")
    for name in sorted(set(meta["files"]) & set(gmeta["files"])):
        if not name.endswith(".pt"):
            continue
        d = first_difference(skeleton(load(real / name)), skeleton(load(gen / name)))
        report(d is None, f"{name}: same structure, shapes, param shapes, slice mappings", str(d))
    r_real, r_gen = CheckpointReader(real), CheckpointReader(gen)
    report(r_real.names() == r_gen.names(), "reader: same plain names")
    report(r_real.specs == r_gen.specs, "reader: same TP shard specs")
    report(r_real.step_count() == r_gen.step_count(), "reader: same optimizer step")
    for kind in KINDS:
        real_shapes = [(n, tuple(t.shape)) for n, t in r_real.tensors(kind)]
        gen_shapes, mismatched = [], []
        for n, t in r_gen.tensors(kind):
            gen_shapes.append((n, tuple(t.shape)))
            if not torch.equal(t, values.full(n, kind)):
                mismatched.append(n)
        report(real_shapes == gen_shapes, f"reader {kind}: same names and full shapes")
        report(not mismatched, f"reader {kind}: returns the generated tensors ({len(gen_shapes)})",
               f"differ: {mismatched[:5]}")  # fmt: skip
    ok, detail = tp_cut_matches(real, cfg)
    report(ok, f"generator's TP cut of the real full tensors = the real shards ({detail})", detail)
    # Rank files hold RNG states, whose pickled size varies with their values: not compared.
    files = [n for n in meta["files"] if not n.startswith("rank_")]
    size = lambda m, n: store.file_size(m["files"][n]) if n in m["files"] else None
    sizes = [n for n in files if size(meta, n) != size(gmeta, n)]
    print(f"  info {len(files) - len(sizes)}/{len(files)} files (rank files aside) of identical "
          f"size{f'; differing: {sizes[:4]}' if sizes else ''}")  # fmt: skip
    return not problems


def tp_cut_matches(real: Path, cfg: Config) -> tuple[bool, str]:
    """Cut the real checkpoint's own full weights as the generator cuts them and compare with
    the shards DeepSpeed saved (pipeline layer files, or the module state when pp = 1)."""
    full = dict(CheckpointReader(real).tensors("param"))
    p = cfg.parallel
    compared = 0
    for tp_rank in range(p.tp):
        model = tp_model(cfg, p.tp, tp_rank)
        shards = Shards(lambda n, _kind: full[n], p.tp, tp_rank)
        for pp_rank in range(p.pp):
            rank = mp_rank_plan(cfg, model, pp_rank, tp_rank)
            mp = pp_rank * p.tp + tp_rank
            saved: list[tuple[str, dict[str, torch.Tensor], list[tuple[str, LocalParam]]]] = []
            if p.pp == 1:
                states = torch.load(real / f"mp_rank_{mp:02d}_model_states.pt", weights_only=False)
                saved.append(("module", states["module"], rank.module_keys))
            for idx, entries in rank.layer_files.items():
                f = f"layer_{idx:02d}-model_{tp_rank:02d}-model_states.pt"
                saved.append((f, torch.load(real / f, weights_only=False), entries))
            for where, tensors, entries in saved:
                for key, lp in entries:
                    if not torch.equal(tensors[key], shards.get(lp, "param")):
                        return False, f"{where} {key} (tp_rank {tp_rank})"
                    compared += 1
    return compared > 0, f"{compared} shards compared"


# ---- measuring ------------------------------------------------------------------------------


def child(op: str, src: str, dst: str) -> None:
    """One measured step in this (fresh) process; prints a JSON line."""
    if op == "generate":
        spec = json.loads(src)
        cfg = bench_config(spec["model"], spec["tp"], spec["pp"], spec["dp"])
        start = time.perf_counter()
        folder = generate(cfg, Path(dst), step=STEP, seed=spec["seed"])
        print(json.dumps({"seconds": time.perf_counter() - start, "folder": str(folder)}))
        return
    from megalite.checkpoint.hf import export_hf
    from megalite.checkpoint.universal import write_universal

    start, cpu = time.perf_counter(), time.process_time()
    if op == "universal":
        write_universal(src, dst, layout={"tp": 1, "pp": 1, "dp": 1}, progress=False)
    elif op.startswith("hf-"):
        export_hf(src, dst, dtype=op[3:], progress=False)
    elif op != "baseline":
        raise SystemExit(f"unknown step {op}")
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    print(json.dumps({"seconds": seconds, "cpu": cpu}))


@dataclass
class Run:
    seconds: float  # the library call, timed inside the child (cp: its wall time)
    cpu: float  # CPU seconds (user + system) over the same span
    max_rss: int  # the child's peak RSS, bytes
    disk_read: int  # bytes it read from the block device (ru_inblock: page-cache misses)
    out: dict[str, Any]


def run(cmd: list[str]) -> Run:
    """Run `cmd` to completion; its own peak RSS and block reads come from `os.wait4`."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    stdout = proc.stdout.read() if proc.stdout else ""
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:4])} ... failed with exit code {proc.returncode}")
    lines = [ln for ln in stdout.splitlines() if ln.startswith("{")]
    out = json.loads(lines[-1]) if lines else {}
    return Run(
        out.get("seconds", wall), out.get("cpu", usage.ru_utime + usage.ru_stime),
        usage.ru_maxrss * 1024, usage.ru_inblock * 512, out,
    )  # fmt: skip


def fsync_tree(path: Path) -> float:
    """Flush `path`'s files to disk; returns the seconds it took (what the page cache still
    held of the output when the step returned)."""
    start = time.perf_counter()
    for p in sorted(path.rglob("*")):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    return time.perf_counter() - start


def run_child(op: str, src: str = "", dst: str = "") -> Run:
    return run([sys.executable, str(Path(__file__).resolve()), "--child", op, src, dst])


def folder_bytes(path: Path) -> tuple[int, int]:
    """(bytes, files) under `path`."""
    files = [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files), len(files)


def prepare_source(args: argparse.Namespace, workdir: Path) -> tuple[Path, Run | None]:
    """The generated checkpoint: reused when `workdir` holds one of the same model, layout and
    seed (from a `--keep` run), else generated in a child process."""
    stamp = {"model": args.model, "tp": args.tp, "pp": args.pp, "dp": args.dp, "seed": args.seed}
    stamp_file = workdir / "source.json"
    root = workdir / "source" / "checkpoints"
    found = store.latest(root)
    if found is not None and stamp_file.is_file() and json.loads(stamp_file.read_text()) == stamp:
        print(f"reusing {found} (generated earlier with the same settings)")
        return found, None
    shutil.rmtree(workdir / "source", ignore_errors=True)
    print(f"generating {args.model} tp={args.tp} pp={args.pp} dp={args.dp} under {root} ...")
    gen = run_child("generate", json.dumps(stamp), str(root))
    stamp_file.write_text(json.dumps(stamp))
    return Path(gen.out["folder"]), gen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="1b", help="a conf/model preset (default 1b)")
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--pp", type=int, default=2)
    parser.add_argument("--dp", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0, help="of the generated values")
    parser.add_argument("--workdir", type=Path, help="default: a new temporary folder")
    parser.add_argument(
        "--keep",
        action="store_true",
        help="keep the work dir (the generated checkpoint; outputs are always deleted once "
        "measured); a later run with the same --workdir and settings reuses it",
    )
    parser.add_argument(
        "--check",
        type=Path,
        metavar="CKPT",
        help="validate the generator against real checkpoint CKPT and exit",
    )
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return

    made = args.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="megalite-bench-convert-")) if made else args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        if args.check:
            ok = check(args.check, workdir / "check", args.seed)
            print("check passed" if ok else "check FAILED")
            if not ok:
                raise SystemExit(1)
            return
        bench(args, workdir)
    finally:
        if not args.keep:
            shutil.rmtree(workdir if made else workdir / "source", ignore_errors=True)
            shutil.rmtree(workdir / "check", ignore_errors=True)
            (workdir / "source.json").unlink(missing_ok=True)


def bench(args: argparse.Namespace, workdir: Path) -> None:
    t0 = time.perf_counter()
    load_before = os.getloadavg()
    cfg = bench_config(args.model, args.tp, args.pp, args.dp)
    shapes = plain_shapes(cfg)
    largest_name = max(shapes, key=lambda n: math.prod(shapes[n]))
    largest = math.prod(shapes[largest_name]) * 4  # the reader yields fp32 full tensors
    n_params = sum(math.prod(s) for s in shapes.values())
    src, gen = prepare_source(args, workdir)
    src_bytes, src_files = folder_bytes(src)
    if gen is not None:
        print(f"generated {src_files} files, {src_bytes / GB:.2f} GB in {gen.seconds:.0f} s "
              f"(generator peak RSS {gen.max_rss / GIB:.2f} GiB)")  # fmt: skip
    baseline = run_child("baseline").max_rss
    rows: dict[str, tuple[int, Run, float]] = {}
    for op in (*OPS, "cp"):
        out = workdir / f"out-{op}"
        shutil.rmtree(out, ignore_errors=True)
        os.sync()
        if op == "cp":
            r = run(["cp", "-r", str(src), str(out)])
        else:
            r = run_child(op, str(src), str(out))
        flush = fsync_tree(out)
        written, _ = folder_bytes(out)
        shutil.rmtree(out)
        rows[op] = (written, r, flush)
        print(f"  {op}: {written / GB:.2f} GB in {r.seconds:.1f} s + {flush:.1f} s fsync")

    cp_written, cp_run, cp_flush = rows["cp"]
    cp_rate = cp_written / (cp_run.seconds + cp_flush)
    print(f"\nmodel={cfg.model.name} ({n_params / 1e9:.3f} B params), layout tp={args.tp} "
          f"pp={args.pp} dp={args.dp}, ZeRO-1 fp32; source {src_files} files "
          f"{src_bytes / GB:.2f} GB; {os.cpu_count()} cpus, load average "
          f"{load_before[0]:.1f} before, {os.getloadavg()[0]:.1f} after")  # fmt: skip
    print(f"largest tensor: {largest_name} {tuple(shapes[largest_name])} fp32 = "
          f"{largest / GIB:.3f} GiB; interpreter baseline RSS (torch + megalite imported) "
          f"{baseline / GIB:.3f} GiB")  # fmt: skip
    print("warm cache (not dropped; 'disk read' = what came from disk, not cache). seconds: the "
          "library call (cp: the command); +fsync: flushing what the page cache still held of "
          "the output; GB/s = bytes written / seconds; durable GB/s and x cp use seconds + "
          "fsync\n")  # fmt: skip
    head = (f"{'operation':<32}{'GB written':>11}{'seconds':>8}{'+fsync':>7}{'GB/s':>6}"
            f"{'durable':>8}{'x cp':>6}{'CPU s':>7}{'peak RSS GiB':>13}{'RSS-base':>9}"
            f"{'largest GiB':>12}{'(RSS-base)/largest':>19}{'disk read GB':>13}")  # fmt: skip
    print(head)
    print("-" * len(head))
    verdicts = []
    for op, (written, r, flush) in rows.items():
        rate, durable = written / r.seconds, written / (r.seconds + flush)
        extra = r.max_rss - baseline
        is_cp = op == "cp"
        big = "-" if is_cp else f"{largest / GIB:.3f}"
        ratio = "-" if is_cp else f"{extra / largest:.2f}"
        print(f"{LABELS[op]:<32}{written / GB:>11.2f}{r.seconds:>8.1f}{flush:>7.1f}"
              f"{rate / GB:>6.3f}{durable / GB:>8.3f}{durable / cp_rate:>6.2f}{r.cpu:>7.1f}"
              f"{r.max_rss / GIB:>13.2f}{extra / GIB:>9.2f}{big:>12}{ratio:>19}"
              f"{r.disk_read / GB:>13.2f}")  # fmt: skip
        if not is_cp:
            fast = "PASS" if durable >= GOAL_RATE * cp_rate else "FAIL"
            lean = "PASS" if extra <= GOAL_RSS * largest else "FAIL"
            verdicts.append(
                f"{LABELS[op]}: {durable / cp_rate:.2f}x the cp rate ({fast}); peak RSS - "
                f"baseline = {extra / largest:.2f}x the largest tensor ({lean})"
            )
    print(f"\ngoals: rate >= {GOAL_RATE}x the cp rate (durable); peak RSS <= {GOAL_RSS:g}x the "
          "largest tensor + the interpreter baseline")  # fmt: skip
    for v in verdicts:
        print("  " + v)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
