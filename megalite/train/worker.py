"""What every training process runs: join the job, build model and engine, resume, train.

The order is the one readable sequence of the design: ParallelDims → plain model → (parallelism
applied in megalite/parallel) → DeepSpeed engine → data stream → loop.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import sys
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from megalite.checkpoint import store
from megalite.cluster.env import (
    DistEnv,
    from_environ,
    init_distributed,
    pick_device,
    release_distributed,
)
from megalite.cluster.local import local_child
from megalite.cluster.signals import StopRequest
from megalite.config import Config
from megalite.model import ops
from megalite.model.llama import Llama
from megalite.parallel.checkpointing import apply_ac
from megalite.parallel.dims import ParallelDims
from megalite.parallel.engine import build_engine, effective_zero_stage
from megalite.parallel.parallelize import LossFn, apply_tp, head_entry, tag_plain_names
from megalite.parallel.pipeline import bubble_fraction, build_pipeline
from megalite.train.logbook import Logbook
from megalite.train.trainer import Trainer

log = logging.getLogger("megalite")


def setup_logging(run_dir: Path, *, global_rank: int, level: str = "INFO") -> None:
    """Rank 0 logs to the console; every rank logs to `logs/rank_XXXXX.log`."""
    logs = run_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    fmt = logging.Formatter(f"%(asctime)s [rank {global_rank}] %(message)s", "%H:%M:%S")
    root = logging.getLogger("megalite")
    root.handlers.clear()
    root.setLevel(level)
    root.propagate = False
    file_handler = logging.FileHandler(logs / f"rank_{global_rank:05d}.log")
    file_handler.setFormatter(fmt)
    root.addHandler(file_handler)
    if global_rank == 0:
        console = logging.StreamHandler(sys.stdout)
        console.setFormatter(fmt)
        root.addHandler(console)
    for noisy in ("DeepSpeed", "deepspeed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def quiet_known_warnings() -> None:
    """torch 2.13 deprecates a collective DeepSpeed still calls; the warning means nothing to us."""
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.* is deprecated")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def compile_blocks(model: Llama) -> None:
    """`trainer.compile`: torch.compile each transformer block in place, after TP and activation
    checkpointing are applied (their hooks and wrappers compile with it). Block by block keeps each
    graph small, lets pipeline stages cut between blocks, and compiles one block shape once."""
    for block in model.layers:
        block.compile()
    log.info("torch.compile: each of the %d transformer blocks", len(model.layers))


def build_model(cfg: Config, dims: ParallelDims) -> tuple[torch.nn.Module, LossFn]:
    """The plain model, then each parallelism applied to it in turn: TP, activation
    checkpointing, pipeline stages. Returns this rank's module and its loss function."""
    p = cfg.parallel
    seed_everything(cfg.trainer.seed)  # the same full initial weights on every rank
    model = Llama(cfg.model)
    loss_fn = apply_tp(model, dims, sequence_parallel=p.sequence_parallel)
    tag_plain_names(model)
    apply_ac(model, p.activation_checkpointing)
    if cfg.trainer.compile:
        compile_blocks(model)
    if p.pp == 1:
        return model, loss_fn
    m = cfg.grad_accum_steps
    log.info(
        "pipeline: %d stages, %d micro-batches per step, partition %s; expected bubble "
        "(p-1)/(m+p-1) = %.1f%%",
        p.pp,
        m,
        p.pipeline_partition,
        100 * bubble_fraction(pp=p.pp, micro_batches=m),
    )
    pipe = build_pipeline(
        model,
        dims,
        loss_fn=loss_fn,
        head_entry=head_entry(dims, sequence_parallel=p.sequence_parallel),
        partition=p.pipeline_partition,
    )
    return pipe, loss_fn


def run_worker(cfg: Config, run_dir: str, resume_from: str | None = None) -> dict[str, Any]:
    """Train in this process as one rank of the job described by the environment."""
    env: DistEnv | None = from_environ()
    if env is None:
        raise RuntimeError("run_worker needs RANK/WORLD_SIZE (torchrun) or SLURM_PROCID (srun)")
    run_path = Path(run_dir)
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda")
    setup_logging(run_path, global_rank=env.global_rank, level=cfg.logging.level)
    quiet_known_warnings()
    device = pick_device(cfg.trainer.device, local_rank=env.local_rank)
    init_distributed(env, device=device, timeout_s=cfg.trainer.collective_timeout)
    try:
        return _train(cfg, env, device, run_path, resume_from)
    finally:
        release_distributed()


def _train(
    cfg: Config, env: DistEnv, device: torch.device, run_dir: Path, resume_from: str | None
) -> dict[str, Any]:
    p = cfg.parallel
    dims = ParallelDims(tp=p.tp, pp=p.pp, dp=p.dp, global_rank=env.global_rank)
    dims.build_groups()
    ops.configure(cfg.kernels.backend, attention=cfg.kernels.attention)
    log.info(
        "world %d = tp %d%s x pp %d x dp %d | ZeRO %d%s | %s | device %s | pid %d | ops %s",
        dims.world_size,
        p.tp,
        " (sequence parallel)" if p.sequence_parallel else "",
        p.pp,
        p.dp,
        effective_zero_stage(cfg),
        f" (asked {p.zero_stage}: nothing to shard with dp=1)"
        if effective_zero_stage(cfg) != p.zero_stage
        else "",
        cfg.trainer.precision,
        device,
        os.getpid(),
        ops.describe_backends(
            device=device,
            dtype=torch.bfloat16 if cfg.trainer.precision == "bf16" else torch.float32,
        ),
    )
    module, loss_fn = build_model(cfg, dims)
    engine, scheduler = build_engine(module.to(device), cfg, dims)
    ckpt = Path(resume_from) if resume_from else None
    meta = store.read_meta(ckpt) if ckpt else {}
    logbook = Logbook(
        run_dir,
        enabled=env.global_rank == 0,
        wandb_mode=cfg.logging.wandb.mode,
        wandb_project=cfg.logging.wandb.project,
        wandb_entity=cfg.logging.wandb.entity,
        wandb_name=cfg.logging.wandb.name,
        config=asdict(cfg),
        resume_id=meta.get("wandb_run_id"),
    )
    # Checkpoint-and-stop signals: SIGUSR1/2 anywhere (SLURM's --signal, a user's kill); SIGTERM
    # too when an outside launcher (srun, torchrun) started the rank: it announces a preemption,
    # a time limit or a user's stop. megalite's own launcher ends ranks with SIGTERM when one
    # fails, so its children leave SIGTERM alone (it forwards a SIGTERM it gets as SIGUSR1).
    stop = StopRequest()
    stop.install([signal.SIGUSR1, signal.SIGUSR2] + ([] if local_child() else [signal.SIGTERM]))
    try:
        trainer = Trainer(
            cfg,
            engine=engine,
            scheduler=scheduler,
            dims=dims,
            device=device,
            run_dir=run_dir,
            logbook=logbook,
            loss_fn=loss_fn,
            stop=stop,
        )
        if ckpt is not None:
            trainer.resume(ckpt)
        return trainer.fit()
    finally:
        logbook.close()
