#!/usr/bin/env python3
"""Pipeline parallelism on CPU: the step time and each stage's idle share for several pipeline
depths and micro-batch counts, beside the 1F1B bubble (p-1)/(m+p-1). Measures, never asserts.

    python tools/bench/pipeline.py [--pp 2 4] [--micro-batches 1 2 4 8] [--steps 5]
                                   [--world pp|run] [overrides (key=value, anywhere) ...]

Each (pp, m) trains the real stack: `build_model` → `build_engine` (a DeepSpeed PipelineEngine,
ZeRO 1) → `Trainer.train_step` (`engine.train_batch` over the bundled sample), with tp = dp = 1
and `trainer.global_batch_size = m * micro_batch_size`, so m is DeepSpeed's accumulation count.
Defaults (`DEFAULTS`; overrides go after them): `model=tiny` with 8 blocks (pp=4 gets 2 each),
seq_len 128, micro batch 4, ZeRO 1; --pp 2 4, --micro-batches 1 2 4 8, --steps 5: about a minute
on 2 cores. The blocks are balanced, but not the stages: the first also holds the embedding (a
cheap lookup, but an optimizer update over vocab x dim weights), the last the final norm, the head
and the loss over a 4096-token vocabulary, which cost about two blocks' forward and backward here
(measured: the last stage of pp=4 computes about twice as long as the middle ones), so the others
wait for it. The second table shows each stage's work, so the imbalance is visible, not folded into
"idle"; `parallel.pipeline_partition=parameters` moves blocks off the first and last stages.

Timing, per rank: DeepSpeed's `_exec_schedule` dispatches each instruction through the class
attribute `_INSTRUCTION_MAP` (plain functions bound with MethodType), never through the instance's
`_exec_forward_pass` and friends, so wrapping those methods would time nothing. Each engine gets an
instance-level copy of the map with timed functions instead (`InstructionTimer`), and the bench
checks that it saw m forward and m backward passes per step. A step is `Trainer.train_step` (which
also averages and broadcasts the loss and reads the gradient norm), started on every rank together
after a barrier; its wall time is the slowest rank's, median over `--steps` steps after one
warm-up step.

    idle = 1 - (forward + backward time) / step wall time            (per stage)

The second table splits each stage's step: forward, backward, the optimizer step's own work, sends,
receives (a blocked receive is where a stage waits for its neighbour: mostly bubble), collectives
("sync": the gradient-norm all-reduce over all stages, which holds every stage until the slowest
reaches its optimizer step, and the loss broadcast) and the rest. The 1F1B formula models equal
stages, free communication and no optimizer step, so the summary also shows idle with the
optimizer's own work taken out of the wall time ("excl. opt"); its sync wait stays idle.

CPU caveat: the pp ranks of a world are processes on this machine's cores, one torch thread each.
When more stages compute at once than there are cores (or other jobs load the machine: the header
prints the load average), the OS serialises work that 1F1B overlaps: compute intervals stretch and
the measured idle mixes the bubble with CPU contention.

Worlds: `--world pp` (default) spawns one world per pp and rebuilds model and engine for each m in
it (DeepSpeed fixes the accumulation count at `initialize`); `--world run` spawns a fresh world per
(pp, m). Both give the same rows; one world per pp is faster: it saves a spawn, the imports and
the process-group set-up per row (defaults on 2 busy cores: about 70 s against 180 s).
"""

# ruff: noqa: E402  (sys.path is set before the megalite imports)
from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import gc
import io
import json
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before any DeepSpeed import, here and in ranks

import torch
import torch.distributed as dist

from megalite.cluster.local import spawn
from megalite.config import Config, validate
from megalite.launch import compose_config, prepare_run
from megalite.parallel.build import build_model
from megalite.parallel.dims import ParallelDims
from megalite.parallel.engine import build_engine
from megalite.parallel.pipeline import bubble_fraction
from megalite.rank.env import from_environ, init_distributed
from megalite.train.logbook import Logbook
from megalite.train.worker import make_trainer, quiet_known_warnings

DEFAULTS = [
    "model=tiny",
    "model.n_layers=8",
    "trainer.seq_len=128",
    "trainer.micro_batch_size=4",
    "parallel.zero_stage=1",
    "trainer.save_interval=0",  # it times steps, never a checkpoint
    "trainer.save_final=false",
    "logging.wandb.mode=disabled",
]
# DeepSpeed's schedule instructions (by class name) → the column they are timed under.
KINDS = {
    "ForwardPass": "fwd",
    "BackwardPass": "bwd",
    "OptimizerStep": "opt",
    "SendActivation": "send",
    "SendGrad": "send",
    "RecvActivation": "recv",
    "RecvGrad": "recv",
    "LoadMicroBatch": "other",
    "ReduceGrads": "other",
    "ReduceTiedGrads": "other",
}
COLUMNS = ("fwd", "bwd", "opt", "send", "recv", "sync", "other")
# Timed under "sync" wherever they run, and taken out of the instruction that issued them.
COLLECTIVES = ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "barrier")
CPU = torch.device("cpu")


# ---- one rank ---------------------------------------------------------------------------------


class InstructionTimer:
    """Seconds and calls per instruction kind in one rank's pipeline engine (see the module
    docstring for why the instruction map is replaced rather than the engine's methods).

    Inside `timing()`, torch.distributed's blocking collectives are timed too, under "sync", and
    subtracted from the instruction they ran in: the optimizer step's gradient-norm all-reduce
    spans the whole pipeline, so it holds each stage until the slowest reaches its step; that wait
    is not optimizer work. Point-to-point sends and receives are not collectives: they stay in
    "send" / "recv".
    """

    def __init__(self) -> None:
        self.seconds: dict[str, float] = dict.fromkeys(COLUMNS, 0.0)
        self.calls: dict[str, int] = dict.fromkeys(COLUMNS, 0)
        self._in_instruction = False
        self._collective_s = 0.0  # inside the running instruction
        self._depth = 0  # a collective calling another is timed once

    def install(self, engine: Any) -> None:
        """Time every instruction of `engine` (this engine only: the class map is untouched), as
        the engine runs it (the trainer's judged optimizer step included)."""
        table = engine._INSTRUCTION_MAP
        engine._INSTRUCTION_MAP = {
            instr: self._timed(KINDS.get(instr.__name__, "other"), fn)
            for instr, fn in table.items()
        }

    @contextlib.contextmanager
    def timing(self) -> Iterator[None]:
        """Time the collectives too, for the duration of the block (one training step)."""
        originals = {name: getattr(dist, name) for name in COLLECTIVES}
        try:
            for name, fn in originals.items():
                setattr(dist, name, self._timed_collective(fn))
            yield
        finally:
            for name, fn in originals.items():
                setattr(dist, name, fn)

    def _timed(self, kind: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def timed(engine: Any, *args: Any, **kwargs: Any) -> Any:
            self._in_instruction, self._collective_s = True, 0.0
            start = time.perf_counter()
            try:
                return fn(engine, *args, **kwargs)
            finally:
                self.seconds[kind] += time.perf_counter() - start - self._collective_s
                self.calls[kind] += 1
                self._in_instruction = False

        return timed

    def _timed_collective(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            self._depth += 1
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self._depth -= 1
                if self._depth == 0:
                    elapsed = time.perf_counter() - start
                    self.seconds["sync"] += elapsed
                    self.calls["sync"] += 1
                    if self._in_instruction:
                        self._collective_s += elapsed

        return timed

    def take(self) -> tuple[dict[str, float], dict[str, int]]:
        """The totals since the last call, and reset."""
        out = self.seconds, self.calls
        self.seconds, self.calls = dict.fromkeys(COLUMNS, 0.0), dict.fromkeys(COLUMNS, 0)
        return out


def with_micro_batches(cfg: Config, m: int) -> Config:
    """`cfg` with m micro-batches per step (dp = 1: the global batch is m micro-batches)."""
    out = copy.deepcopy(cfg)
    out.trainer.global_batch_size = m * cfg.trainer.micro_batch_size
    return out


def _stage_layers(engine: Any, *, stage: int, pp: int) -> str:
    """What this stage holds, e.g. "embed+2 blocks" (the embedding always sits on the first stage,
    norm, head and loss on the last: megalite/parallel/pipeline.py)."""
    blocks = sum(type(f).__name__ == "TransformerBlock" for f in engine.module.forward_funcs)
    first = "embed+" if stage == 0 else ""
    last = "+norm+head" if stage == pp - 1 else ""
    return f"{first}{blocks} blocks{last}"


def measure_rank(cfg: Config, dims: ParallelDims, *, steps: int) -> dict[str, Any]:
    """Build this rank's stage and engine for `cfg`, run 1 + `steps` steps, return the timings
    of the last `steps` (per step: wall seconds, seconds per column, calls per column)."""
    m = cfg.grad_accum_steps
    module, loss_fn = build_model(cfg, dims, CPU)
    engine, scheduler = build_engine(module, cfg, dims)
    run_dir = Path(cfg.trainer.run_dir or tempfile.gettempdir())
    trainer = make_trainer(
        cfg, engine=engine, scheduler=scheduler, dims=dims, device=CPU, run_dir=run_dir,
        logbook=Logbook(run_dir, enabled=False), loss_fn=loss_fn,
    )  # fmt: skip
    timer = InstructionTimer()
    timer.install(engine)
    records = []
    for step in range(steps + 1):
        dist.barrier()  # every stage starts the step together
        with timer.timing():
            start = time.perf_counter()
            trainer.train_step()
            wall = time.perf_counter() - start
        seconds, calls = timer.take()
        if calls["fwd"] != m or calls["bwd"] != m:
            raise RuntimeError(
                f"the instruction timer saw {calls['fwd']} forward and {calls['bwd']} backward "
                f"passes in a step of {m} micro-batches: DeepSpeed's dispatch has changed"
            )
        if step > 0:  # step 0 warms up (buffers, tensor-shape exchange)
            records.append({"wall": wall, "seconds": seconds, "calls": calls})
    layers = _stage_layers(engine, stage=dims.pp_rank, pp=dims.pp)
    del trainer, engine, module
    gc.collect()
    return {"threads": torch.get_num_threads(), "layers": layers, "steps": records}


def _quiet() -> None:
    """Keep the table readable: DeepSpeed logs every engine it builds."""
    quiet_known_warnings()
    warnings.filterwarnings("ignore", category=UserWarning, module="deepspeed")
    for name in ("DeepSpeed", "deepspeed"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _rank_main(cfg: Config, micro_batches: list[int], steps: int, out_path: str) -> None:
    """One rank of a pp-stage world (started by `spawn`): measure every m; rank 0 writes all."""
    env = from_environ()
    assert env is not None, "started by megalite.cluster.local.spawn"
    _quiet()
    # DeepSpeed prints (not logs) its comm-op build and every stage's layer list; errors still
    # reach stderr.
    with contextlib.redirect_stdout(io.StringIO()):
        init_distributed(env, device=CPU)
        torch.set_num_threads(1)  # after init_distributed, which shares the cores out
        try:
            dims = ParallelDims(tp=1, pp=cfg.parallel.pp, dp=1, global_rank=env.global_rank)
            dims.build_groups()
            results = {str(m): _gathered(cfg, dims, m=m, steps=steps) for m in micro_batches}
        finally:
            dist.destroy_process_group()
    if env.global_rank == 0:
        Path(out_path).write_text(json.dumps(results))


def _gathered(cfg: Config, dims: ParallelDims, *, m: int, steps: int) -> list[Any] | None:
    """Every rank's `measure_rank` figures for m micro-batches, in pp order, on global rank 0."""
    mine = measure_rank(with_micro_batches(cfg, m), dims, steps=steps)
    every: list[Any] | None = [None] * dims.world_size if dims.global_rank == 0 else None
    dist.gather_object(mine, every, dst=0)
    return every  # global rank = pp rank (tp = dp = 1)


# ---- the parent -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stage:
    """One stage's medians over the measured steps, in seconds."""

    layers: str
    threads: int
    wall: float
    idle: float  # 1 - (fwd + bwd) / wall, median of the per-step values
    idle_excl_opt: float  # 1 - (fwd + bwd) / (wall - opt): the share the bubble formula models
    seconds: dict[str, float]  # per column; "other" also holds the time outside instructions


@dataclass(frozen=True)
class Row:
    pp: int
    m: int
    step_s: float  # median over steps of the slowest rank's wall time
    stages: list[Stage]

    @property
    def mean_idle(self) -> float:
        return statistics.fmean(s.idle for s in self.stages)

    @property
    def mean_idle_excl_opt(self) -> float:
        return statistics.fmean(s.idle_excl_opt for s in self.stages)

    @property
    def bubble(self) -> float:
        return bubble_fraction(pp=self.pp, micro_batches=self.m)


def _stage(rank: dict[str, Any]) -> Stage:
    steps = rank["steps"]
    med = {c: statistics.median(s["seconds"][c] for s in steps) for c in COLUMNS}
    outside = statistics.median(s["wall"] - sum(s["seconds"].values()) for s in steps)
    med["other"] += outside
    busy = [s["seconds"]["fwd"] + s["seconds"]["bwd"] for s in steps]
    idle = statistics.median(1 - b / s["wall"] for b, s in zip(busy, steps, strict=True))
    idle_excl_opt = statistics.median(
        1 - b / (s["wall"] - s["seconds"]["opt"]) for b, s in zip(busy, steps, strict=True)
    )  # the opt column is the optimizer's own work: its collectives are in "sync"
    wall = statistics.median(s["wall"] for s in steps)
    return Stage(rank["layers"], rank["threads"], wall, idle, idle_excl_opt, med)


def measure(cfg: Config, *, micro_batches: list[int], steps: int) -> list[Row]:
    """Spawn one world of `cfg.parallel.pp` ranks and measure each m in it (cfg prepared by
    `prepare_run`: data path filled in)."""
    with tempfile.TemporaryDirectory(prefix="megalite-pipe-bench-") as tmp:
        out_path = Path(tmp) / "timings.json"
        spawn(_rank_main, nprocs=cfg.parallel.pp, args=(cfg, micro_batches, steps, str(out_path)))
        results = json.loads(out_path.read_text())
    rows = []
    for m in micro_batches:
        ranks = results[str(m)]
        n_steps = len(ranks[0]["steps"])
        slowest = [max(r["steps"][i]["wall"] for r in ranks) for i in range(n_steps)]
        rows.append(Row(cfg.parallel.pp, m, statistics.median(slowest), [_stage(r) for r in ranks]))
    return rows


def prepared_config(overrides: list[str], *, pp: int, run_dir: Path) -> Config:
    """The run's config at pp stages, tp = dp = 1, validated, with the sample data prepared."""
    forced = [f"parallel.pp={pp}", "parallel.tp=1", "parallel.dp=1", f"trainer.run_dir={run_dir}"]
    cfg = compose_config([*DEFAULTS, *overrides, *forced])
    prepare_run(cfg, run_dir=run_dir, world_size=None)
    return cfg


# ---- report -----------------------------------------------------------------------------------


def summary_table(rows: list[Row]) -> str:
    width = max(7 * max(r.pp for r in rows), 20)
    head = (
        f"{'pp':>3}{'m':>4}{'step ms':>10}  {'idle % per stage':<{width}}"
        f"{'mean idle %':>12}{'excl. opt %':>12}{'1F1B bubble %':>15}"
    )
    out = [head, "-" * len(head)]
    for r in rows:
        idle = "".join(f"{100 * s.idle:>7.1f}" for s in r.stages)
        out.append(
            f"{r.pp:>3}{r.m:>4}{1e3 * r.step_s:>10.1f}  {idle:<{width}}"
            f"{100 * r.mean_idle:>12.1f}{100 * r.mean_idle_excl_opt:>12.1f}{100 * r.bubble:>15.1f}"
        )
    return "\n".join(out)


def breakdown_table(rows: list[Row]) -> str:
    cols = "".join(f"{c + ' ms':>10}" for c in COLUMNS)
    head = f"{'pp':>3}{'m':>4}{'stage':>6}  {'holds':<24}{cols}{'wall ms':>10}{'idle %':>8}"
    out = [head, "-" * len(head)]
    for r in rows:
        for i, s in enumerate(r.stages):
            cells = "".join(f"{1e3 * s.seconds[c]:>10.1f}" for c in COLUMNS)
            out.append(
                f"{r.pp:>3}{r.m:>4}{i:>6}  {s.layers:<24}{cells}"
                f"{1e3 * s.wall:>10.1f}{100 * s.idle:>8.1f}"
            )
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pp", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--micro-batches", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--steps", type=int, default=5, help="measured steps (after 1 warm-up)")
    parser.add_argument(
        "--world", choices=("pp", "run"), default="pp",
        help="one spawned world per pp (engine rebuilt per m), or one per (pp, m)",
    )  # fmt: skip
    parser.add_argument(
        "overrides", nargs="*", help="config overrides (key=value, anywhere on the line)"
    )
    # The list options would swallow an override that follows them: key=value words are
    # overrides wherever they stand.
    argv = sys.argv[1:]
    words = [a for a in argv if "=" in a and not a.startswith("-")]
    args = parser.parse_args([a for a in argv if a not in words])
    args.overrides += words
    if min(args.pp) < 2 or min(args.micro_batches) < 1 or args.steps < 1:
        parser.error("need every pp >= 2, every micro-batch count >= 1 and steps >= 1")
    _quiet()

    load_before, start = os.getloadavg()[0], time.perf_counter()
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="megalite-pipe-bench-run-") as tmp:
        for pp in args.pp:
            cfg = prepared_config(args.overrides, pp=pp, run_dir=Path(tmp))
            for m in args.micro_batches:
                validate(with_micro_batches(cfg, m))
            worlds = (
                [args.micro_batches] if args.world == "pp" else [[m] for m in args.micro_batches]
            )
            for micro_batches in worlds:
                rows += measure(cfg, micro_batches=micro_batches, steps=args.steps)
    elapsed = time.perf_counter() - start

    t, mc = cfg.trainer, cfg.model
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = sorted({s.threads for r in rows for s in r.stages})
    print(
        f"\nmodel={mc.name} n_layers={mc.n_layers} dim={mc.dim} vocab={mc.vocab_size} "
        f"seq_len={t.seq_len} micro_batch={t.micro_batch_size} {t.precision} "
        f"ZeRO {cfg.parallel.effective_zero_stage} | tp=1 dp=1 | steps={args.steps} (+1 warm-up), "
        "medians"
    )
    print(
        f"CPU cores available: {cores}; torch threads per rank: {', '.join(map(str, threads))}; "
        f"1-min load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after.\n"
        "With more busy processes than cores the OS serialises stage compute that the schedule "
        "overlaps:\nmeasured idle then mixes the bubble with CPU contention."
    )
    print(
        "idle = 1 - (forward + backward) / step wall time, per stage; excl. opt: the same with the "
        "optimizer step\ntaken out of the wall time (what the bubble formula models); "
        "1F1B bubble = (p-1)/(m+p-1)\n"
    )
    print(summary_table(rows))
    print(
        "\nwhere each stage's step went (ms; opt = the optimizer step's own work; recv includes "
        "waiting for a neighbour;\nsync = collectives: the gradient-norm all-reduce over all "
        "stages and the loss broadcast;\nother = micro-batch loads, DP grad reduction, "
        "everything between instructions)\n"
    )
    print(breakdown_table(rows))
    n_worlds = len(args.pp) * (1 if args.world == "pp" else len(args.micro_batches))
    print(f"\n{n_worlds} spawned world(s) (--world {args.world}), {elapsed:.0f} s in all")


if __name__ == "__main__":
    main()
