#!/usr/bin/env python3
"""Checkpoint save and load: synchronous, asynchronous (`trainer.async_save`) and the raw write
rate of the same bytes, measured in one run of a 2-rank job. Prints a table; measures, never
asserts.

    python tools/bench/checkpoint.py [--dir DIR] [overrides (key=value) ...]

Defaults (`DEFAULTS`, overrides go after them): `model=1b`, `parallel.dp=2` (ZeRO 1), fp32, on the
GPUs if there are, else on CPU; the checkpoint is the full training state (weights, Adam moments,
LR schedule, data position and RNG states) after one training step on the bundled sample. Each
rank builds the real stack (`build_model` → `build_engine` → `Trainer`) and, with all ranks
starting together after a barrier (each figure is the slowest rank's):

- raw write: each rank writes its share of the checkpoint's bytes (total / ranks) from memory in
  64 MiB blocks into one new file and fsyncs it: the storage's rate for these bytes;
- sync save: `Trainer.save` with trainer.async_save=false; the loop is blocked throughout;
- async save: `Trainer.save` with trainer.async_save=true; "blocked" is until it returns (the
  state gathered and copied to host memory), "total" until the background write is committed.
  The first save allocates the host buffers, later ones reuse them (HostStaging): their row is
  the median of REPEATS. Last, one training step is timed alone and one while a save is being
  written in the background;
- load: `training.load` of the synchronous checkpoint, its files dropped from the page cache
  first (posix_fadvise DONTNEED), as a restarted job reads them.

Memory: the async save holds a host copy of each rank's state beside the state itself; on CPU
both are in RAM, so a 1B model (12 bytes a parameter of weights and Adam moments, ~15 GB, twice
over) needs more than a 24 GiB machine: use e.g. `model=350m` there.
"""

# ruff: noqa: E402  (sys.path is set before the megalite imports)
from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch
import torch.distributed as dist

if not torch.cuda.is_available():  # before any DeepSpeed import, here and in the ranks
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

from megalite.checkpoint import store, training
from megalite.cluster.local import spawn
from megalite.config import Config
from megalite.launch import compose_config, prepare_run
from megalite.parallel.build import build_model
from megalite.parallel.dims import ParallelDims
from megalite.parallel.engine import build_engine
from megalite.rank.env import from_environ, init_distributed, pick_device
from megalite.train.logbook import Logbook
from megalite.train.worker import make_trainer, quiet_known_warnings
from tools.bench.data import evict

DEFAULTS = [
    "model=1b",
    "parallel.dp=2",
    "parallel.zero_stage=1",
    "trainer.seq_len=128",
    "trainer.micro_batch_size=1",
    "trainer.global_batch_size=2",
    "trainer.eval_interval=0",
    "trainer.save_interval=0",
    "trainer.async_save=true",  # the bench saves both ways: this builds the background group
    "logging.wandb.mode=disabled",
]
BLOCK = 64 << 20
REPEATS = 3  # later asynchronous saves: the median of these


def _timed(fn: Any, *args: Any, **kwargs: Any) -> float:
    """Seconds `fn(*args, **kwargs)` takes on the slowest rank, every rank starting together."""
    dist.barrier()
    start = time.perf_counter()
    fn(*args, **kwargs)
    mine = torch.tensor(time.perf_counter() - start, dtype=torch.float64)
    dist.all_reduce(mine, op=dist.ReduceOp.MAX)
    return mine.item()


def _raw_write(path: Path, nbytes: int) -> None:
    block = os.urandom(min(BLOCK, nbytes))
    with open(path, "wb") as f:
        left = nbytes
        while left > 0:
            left -= f.write(block[: min(left, len(block))])
        f.flush()
        os.fsync(f.fileno())


def _bytes_of(ckpt: Path) -> tuple[int, int]:
    files = store.read_meta(ckpt)["files"]
    return sum(store.file_size(e) for e in files.values()), len(files)


def measure_rank(cfg: Config, dims: ParallelDims, device: torch.device) -> dict[str, Any]:
    module, loss_fn = build_model(cfg, dims, device)
    engine, scheduler = build_engine(module, cfg, dims)
    run_dir = Path(cfg.trainer.run_dir)
    trainer = make_trainer(
        cfg, engine=engine, scheduler=scheduler, dims=dims, device=device, run_dir=run_dir,
        logbook=Logbook(run_dir, enabled=False), loss_fn=loss_fn,
    )  # fmt: skip
    trainer.train_step()  # the optimizer state exists
    checkpoints = trainer.checkpoints
    group, checkpoints.save_group = checkpoints.save_group, None  # None: the synchronous save
    assert group is not None, "trainer.async_save=true builds the background saves' group"
    sync_s = _timed(trainer.save)
    ckpt = checkpoints.last
    assert ckpt is not None
    nbytes, nfiles = _bytes_of(ckpt)

    checkpoints.save_group = group
    first_s = _timed(trainer.save)  # the host buffers are allocated
    first_wait_s = _timed(checkpoints.finish)
    later = []  # the buffers reused, as at every later save of a run
    for _ in range(REPEATS):
        later.append((_timed(trainer.save), _timed(checkpoints.finish)))
    blocked_s = statistics.median(b for b, _ in later)
    wait_s = statistics.median(w for _, w in later)
    step_s = _timed(trainer.train_step)  # no save in flight
    trainer.save()
    busy_step_s = _timed(trainer.train_step)  # the background write goes on meanwhile
    checkpoints.finish()

    raw = run_dir / f"raw_{dims.global_rank}.bin"
    raw_s = _timed(_raw_write, raw, nbytes // dims.world_size)
    raw.unlink()

    if dims.global_rank == 0:
        evict([p for p in ckpt.rglob("*") if p.is_file()])
    load_s = _timed(training.load, engine, ckpt, global_rank=dims.global_rank)
    return {
        "bytes": nbytes,
        "files": nfiles,
        "params": sum(p.numel() for p in module.parameters()) * dims.tp * dims.pp,
        "raw_s": raw_s,
        "sync_s": sync_s,
        "async_first_blocked_s": first_s,
        "async_first_total_s": first_s + first_wait_s,
        "async_blocked_s": blocked_s,
        "async_total_s": blocked_s + wait_s,
        "step_s": step_s,
        "busy_step_s": busy_step_s,
        "load_s": load_s,
        "device": str(device),
    }


def _rank_main(cfg: Config, out_path: str) -> None:
    env = from_environ()
    assert env is not None, "started by megalite.cluster.local.spawn"
    quiet_known_warnings()
    warnings.filterwarnings("ignore", category=UserWarning, module="deepspeed")
    for name in ("DeepSpeed", "deepspeed"):
        logging.getLogger(name).setLevel(logging.WARNING)
    device = pick_device(cfg.trainer.device, local_rank=env.local_rank)
    with contextlib.redirect_stdout(io.StringIO()):  # DeepSpeed prints its op builds
        init_distributed(env, device=device)
        try:
            p = cfg.parallel
            dims = ParallelDims(tp=p.tp, pp=p.pp, dp=p.dp, global_rank=env.global_rank)
            dims.build_groups()
            result = measure_rank(cfg, dims, device)
        finally:
            dist.destroy_process_group()
    if env.global_rank == 0:
        Path(out_path).write_text(json.dumps(result))


def table(r: dict[str, Any], cfg: Config) -> str:
    gb = r["bytes"] / 1e9
    p = cfg.parallel
    head = (
        f"model {cfg.model.name} ({r['params'] / 1e9:.2f}B parameters), tp {p.tp} x pp {p.pp} x "
        f"dp {p.dp}, ZeRO {p.zero_stage}, {cfg.trainer.precision}, {r['device']}: checkpoint "
        f"{gb:.2f} GB in {r['files']} files"
    )
    rows = [
        ("raw write + fsync", r["raw_s"], r["raw_s"], None),
        ("sync save", r["sync_s"], r["sync_s"], r["sync_s"]),
        (
            "async save, first",
            r["async_first_total_s"],
            r["async_first_total_s"],
            r["async_first_blocked_s"],
        ),
        ("async save, later", r["async_total_s"], r["async_total_s"], r["async_blocked_s"]),
        ("load (cold cache)", r["load_s"], r["load_s"], None),
    ]
    out = [head, "", f"{'':<20}{'seconds':>10}{'GB/s':>8}{'loop blocked s':>16}", "-" * 54]
    for name, seconds, rate_s, blocked in rows:
        cell = f"{blocked:>16.2f}" if blocked is not None else f"{'':>16}"
        out.append(f"{name:<20}{seconds:>10.2f}{gb / rate_s:>8.2f}{cell}")
    share = 100 * r["async_blocked_s"] / r["sync_s"]
    out += ["", f"async blocked (later saves) / sync blocked: {share:.1f}% (goal: at most 10%)"]
    out.append(
        f"training step: {r['step_s']:.2f} s alone, {r['busy_step_s']:.2f} s while a background "
        "save is written"
    )
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, help="where the checkpoints go (default: a temp dir)")
    parser.add_argument("overrides", nargs="*", help="config overrides (key=value)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="megalite-ckpt-bench-", dir=args.dir) as tmp:
        cfg = compose_config([*DEFAULTS, *args.overrides, f"trainer.run_dir={tmp}"])
        world = cfg.parallel.tp * cfg.parallel.pp * cfg.parallel.dp
        prepare_run(cfg, run_dir=Path(tmp), world_size=world)
        out = Path(tmp) / "result.json"
        spawn(_rank_main, nprocs=world, args=(cfg, str(out)))
        print(table(json.loads(out.read_text()), cfg))


if __name__ == "__main__":
    main()
