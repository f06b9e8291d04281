"""What every training process runs: join the job, build model and engine, resume, train.

The order is the one readable sequence of the design: ParallelDims → this rank's part of the
model (megalite/parallel/build: the plain model on meta, parallelism applied, the local shard
drawn) → DeepSpeed engine → data stream → loop.
"""

from __future__ import annotations

import io
import logging
import os
import random
import signal
import sys
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, redirect_stdout
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from megalite.checkpoint import init_from, store
from megalite.config import Config
from megalite.data.mixture import configured_sources
from megalite.infer.load import data_folder_tokenizer
from megalite.model import ops
from megalite.model.llama import cross_entropy
from megalite.parallel.build import build_model
from megalite.parallel.dims import ParallelDims
from megalite.parallel.engine import build_engine
from megalite.parallel.parallelize import LossFn
from megalite.rank.env import (
    DistEnv,
    backend_of,
    extension_locks,
    from_environ,
    init_process_group,
    join_deepspeed,
    name_deepspeed_accelerator,
    pick_device,
    release_distributed,
)
from megalite.rank.launcher import local_child
from megalite.rank.signals import StopRequest
from megalite.train.anomaly import AnomalyPolicy
from megalite.train.checkpointer import Checkpointer
from megalite.train.logbook import Logbook, log_file
from megalite.train.memory_check import MemoryCheck
from megalite.train.streams import rank_stream, train_loader
from megalite.train.trainer import Trainer
from megalite.train.watch import QualityWatch
from megalite.train.watchdog import StartupWatchdog

log = logging.getLogger("megalite")


def setup_logging(run_dir: Path, *, global_rank: int, level: str = "INFO") -> None:
    """Rank 0 logs to the console; every rank logs to `logs/rank_XXXXX.log`."""
    path = log_file(run_dir, global_rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = logging.Formatter(f"%(asctime)s [rank {global_rank}] %(message)s", "%H:%M:%S")
    root = logging.getLogger("megalite")
    root.handlers.clear()
    root.setLevel(level)
    root.propagate = False
    file_handler = logging.FileHandler(path)
    file_handler.setFormatter(fmt)
    root.addHandler(file_handler)
    if global_rank == 0:
        console = logging.StreamHandler(sys.stdout)
        console.setFormatter(fmt)
        root.addHandler(console)
    # DeepSpeed's own logger and what it prints (`deepspeed_prints_to_log`): the rank's log only.
    for name, quiet_level in (("DeepSpeed", logging.WARNING), (DEEPSPEED_PRINTS, logging.INFO)):
        quiet = logging.getLogger(name)
        quiet.handlers = [file_handler]
        quiet.setLevel(quiet_level)
        quiet.propagate = False


DEEPSPEED_PRINTS = "megalite.deepspeed"


class _LinesToLog(io.TextIOBase):
    """A text stream whose every line becomes one record of `logger`."""

    def __init__(self, logger: logging.Logger) -> None:
        self.logger, self.pending = logger, ""

    def write(self, text: str) -> int:
        *lines, self.pending = (self.pending + text).split("\n")
        for line in lines:
            self.logger.info("%s", line)
        return len(text)

    def flush(self) -> None:
        if self.pending:
            self.logger.info("%s", self.pending)
            self.pending = ""


@contextmanager
def deepspeed_prints_to_log() -> Iterator[None]:
    """DeepSpeed `print`s as it sets up (its pipeline's seed settings, topology and stage
    listing): into this rank's log file, not the console."""
    stream = _LinesToLog(logging.getLogger(DEEPSPEED_PRINTS))
    try:
        with redirect_stdout(stream):
            yield
    finally:
        stream.flush()


def quiet_known_warnings() -> None:
    """torch 2.13 deprecates a collective DeepSpeed still calls; the warning means nothing to us."""
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.* is deprecated")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def run_worker(cfg: Config, run_dir: str, resume_from: Sequence[str] = ()) -> dict[str, Any]:
    """Train in this process as one rank of the job described by the environment.

    `resume_from`: checkpoints to resume from, newest first; the first that verifies is loaded
    (more than one only with `trainer.resume=auto`, see launch.resolve_resume). Empty: a fresh
    start.
    """
    env: DistEnv | None = from_environ()
    if env is None:
        raise RuntimeError("run_worker needs RANK/WORLD_SIZE (torchrun) or SLURM_PROCID (srun)")
    run_path = Path(run_dir)
    name_deepspeed_accelerator()
    setup_logging(run_path, global_rank=env.global_rank, level=cfg.logging.level)
    quiet_known_warnings()
    startup = StartupWatchdog(
        log_file(run_path, env.global_rank),
        timeout_s=cfg.trainer.startup_timeout,
        rank=env.global_rank,
    )
    device = pick_device(cfg.trainer.device, local_rank=env.local_rank)
    join = f"all {env.world_size} ranks to join at {env.master_addr}:{env.master_port}"
    with startup.phase("rendezvous", waits_for=join):
        init_process_group(env, device=device, timeout_s=cfg.trainer.collective_timeout)
    try:
        with startup.phase("extension load", waits_for=extension_locks), deepspeed_prints_to_log():
            join_deepspeed(backend_of(device))
        return _train(cfg, env, device, run_path, [Path(c) for c in resume_from], startup)
    finally:
        startup.close()
        release_distributed()


def _train(
    cfg: Config,
    env: DistEnv,
    device: torch.device,
    run_dir: Path,
    resume_from: list[Path],
    startup: StartupWatchdog,
) -> dict[str, Any]:
    p = cfg.parallel
    dims = ParallelDims(tp=p.tp, pp=p.pp, dp=p.dp, global_rank=env.global_rank, cp=p.cp)
    peers = "the other ranks (a collective of the set-up)"
    memory = MemoryCheck(cfg, stage=dims.pp_rank, device=device)  # its baseline: before the build
    memory.log_plan()
    with startup.phase("model build", waits_for=peers), deepspeed_prints_to_log():
        dims.build_groups()
        ops.configure(cfg.kernels.backend, attention=cfg.kernels.attention)
        _log_layout(cfg, dims, device)
        seed_everything(cfg.trainer.seed)
        weights = init_weights(cfg, run_dir, resume_from)
        module, loss_fn = build_model(cfg, dims, device, init=not resume_from and weights is None)
    with startup.phase("engine", waits_for=peers), deepspeed_prints_to_log():
        engine, scheduler = build_engine(module, cfg, dims)
    meta = store.read_meta(resume_from[0]) if resume_from else {}
    logbook = Logbook(
        run_dir,
        enabled=env.global_rank == 0,
        wandb_mode=cfg.logging.wandb.mode,
        wandb_project=cfg.logging.wandb.project,
        wandb_entity=cfg.logging.wandb.entity,
        wandb_name=cfg.logging.wandb.name,
        config=asdict(cfg),
        resume_id=meta.get("wandb_run_id"),
        tensorboard=cfg.logging.tensorboard,
    )
    # Checkpoint-and-stop signals: SIGUSR1/2 anywhere (SLURM's --signal, a user's kill); SIGTERM
    # too when an outside launcher (srun, torchrun) started the rank: it announces a preemption,
    # a time limit or a user's stop. megalite's own launcher ends ranks with SIGTERM when one
    # fails, so its children leave SIGTERM alone (it forwards a SIGTERM it gets as SIGUSR1).
    stop = StopRequest()
    stop.install([signal.SIGUSR1, signal.SIGUSR2] + ([] if local_child() else [signal.SIGTERM]))
    try:
        data = ", ".join(s.path for s in configured_sources(cfg.data))
        with startup.phase("data open", waits_for=f"the data at {data} (or a slower peer)"):
            trainer = make_trainer(
                cfg,
                engine=engine,
                scheduler=scheduler,
                dims=dims,
                device=device,
                run_dir=run_dir,
                logbook=logbook,
                loss_fn=loss_fn,
                stop=stop,
                memory_check=memory,
            )
        if resume_from:
            reading = f"reading {', '.join(map(str, resume_from))} (or a slower peer)"
            with startup.phase("checkpoint verify and load", waits_for=reading):
                trainer.resume_newest(resume_from)
        elif weights is not None:
            with startup.phase("checkpoint verify and load", waits_for=f"reading {weights}"):
                trainer.checkpoints.load_weights(weights)
            log.info(
                "initialised from %s (weights only: step 0, fresh optimizer and schedule)",
                cfg.trainer.init_from,
            )
        startup.close()
        return trainer.fit()
    finally:
        memory.close()
        logbook.close()


def init_weights(cfg: Config, run_dir: Path, resume_from: list[Path]) -> Path | None:
    """The layout-free checkpoint whose weights this new run starts from (trainer.init_from,
    converted by the launcher: see checkpoint/init_from.py), or None. A run that resumes its own
    checkpoints (trainer.resume=auto, a SLURM requeue) ignores init_from, saying so."""
    if not cfg.trainer.init_from:
        return None
    if resume_from:
        log.info(
            "trainer.init_from=%s ignored: the run resumes from its own checkpoint %s",
            cfg.trainer.init_from,
            resume_from[0],
        )
        return None
    return init_from.weights_checkpoint(init_from.locate(cfg.trainer.init_from), run_dir)


def make_trainer(
    cfg: Config,
    *,
    engine: Any,
    scheduler: Any,
    dims: ParallelDims,
    device: torch.device,
    run_dir: Path,
    logbook: Logbook,
    loss_fn: LossFn = cross_entropy,
    stop: StopRequest | None = None,
    memory_check: MemoryCheck | None = None,
) -> Trainer:
    """The loop with what it leans on: this rank's data, its checkpoints under
    `run_dir/checkpoints`, the anomaly policy. Collective (the checkpointer's set-up)."""
    sources = configured_sources(cfg.data)
    checkpointer = Checkpointer(
        cfg,
        engine=engine,
        dims=dims,
        root=run_dir / "checkpoints",
        data_path=sources[0].path,
        wandb_run_id=logbook.wandb_run_id,
    )
    return Trainer(
        cfg,
        engine=engine,
        scheduler=scheduler,
        dims=dims,
        device=device,
        train_data=train_loader(cfg, dims, sources, device),
        val_data=rank_stream(cfg, dims, sources, "val", shuffle=False),
        checkpointer=checkpointer,
        anomalies=AnomalyPolicy(cfg.trainer),
        logbook=logbook,
        hang_log=log_file(run_dir, dims.global_rank),
        loss_fn=loss_fn,
        stop=stop,
        memory_check=memory_check,
        watch=quality_watch(cfg, engine=engine, dims=dims, data=sources[0].path, logbook=logbook),
    )


def quality_watch(
    cfg: Config, *, engine: Any, dims: ParallelDims, data: str, logbook: Logbook
) -> QualityWatch | None:
    """The samples and task scores of the run (with the data's tokenizer), if it asks for any."""
    if not (cfg.trainer.sample_interval or cfg.trainer.eval_tasks):
        return None
    tokenizer = data_folder_tokenizer(data)
    return QualityWatch(cfg, engine=engine, dims=dims, tokenizer=tokenizer, logbook=logbook)


def _log_layout(cfg: Config, dims: ParallelDims, device: torch.device) -> None:
    p, zero = cfg.parallel, cfg.parallel.effective_zero_stage
    log.info(
        "world %d = tp %d%s%s x pp %d x dp %d | ZeRO %d%s | %s | device %s | pid %d | ops %s",
        dims.world_size,
        p.tp,
        " (sequence parallel)" if p.sequence_parallel else "",
        f" x cp {p.cp} ({p.cp_impl})" if p.cp > 1 else "",
        p.pp,
        p.dp,
        zero,
        f" (asked {p.zero_stage}: nothing to shard with dp=1)" if zero != p.zero_stage else "",
        cfg.trainer.precision,
        device,
        os.getpid(),
        ops.describe_backends(
            device=device,
            dtype=torch.bfloat16 if cfg.trainer.precision == "bf16" else torch.float32,
        ),
    )
