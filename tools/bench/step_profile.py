#!/usr/bin/env python3
"""Where one training step's time goes, in one process on CPU: the model's math (forward, loss,
backward, optimizer) against everything around it. Prints a table; measures, never asserts.

    python tools/bench/step_profile.py [--steps 20] [--warmup 3] [--trace] [overrides ...]

It builds the trainer as `throughput_cpu.py` does (the DeepSpeed engine over a world of one) and
runs the fit loop's per-step body (`Trainer._loop`: watchdog, condemned-batch check, `train_step`,
memory check, the log line every `trainer.log_interval` steps). Each piece is timed by wrapping the
method from here (no product code is edited); a piece's time is its own, its children's excluded,
so the rows add up to the step. "other" is what no wrapper covers: the trainer's own lines. With
`--trace` the same steps also run under `torch.profiler` (each wrapper a `record_function` label)
and the profiler's top operators are printed after the table.

Single process only: dp=2 (ZeRO-1/2) and pp=2 need a spawned world (see `pipeline.py`).
"""

# ruff: noqa: E402  (sys.path is set before the megalite imports)
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # throughput_cpu: the same world of one

import torch
from throughput_cpu import run_alone, single_process_trainer  # noqa: E402
from torch.profiler import ProfilerActivity, profile, record_function

import megalite.train.trainer as trainer_module
from megalite.rank import host
from megalite.train.trainer import Trainer
from megalite.train.watchdog import HangWatchdog

# Row order of the table: (piece, what it covers).
PIECES = [
    ("forward", "the model's forward (engine.module)"),
    ("loss", "cross entropy, weighted (weighted_loss)"),
    ("backward", "autograd (torch.autograd.backward)"),
    ("optimizer step", "AdamW (the engine's optimizer.step)"),
    ("zero grad", "gradients cleared (engine/optimizer zero_grad)"),
    ("grad norm + clip", "Trainer._clip_gradients, get_global_grad_norm"),
    ("DS grad all-reduce", "engine.allreduce_gradients"),
    ("loss all-reduce", "Trainer._judged_loss (all-reduce with the stop flags + host read)"),
    ("loss weights", "Trainer._weigh"),
    ("anomaly judge", "begin_step, judge, verdict"),
    ("data", "next batch, stream position"),
    ("LR schedule", "scheduler.step, get_last_lr"),
    ("logging", "Trainer._log_train (every log_interval)"),
    ("memory check", "Trainer._check_memory"),
    ("watchdog / skip", "watchdog.arm, _skip_bad_batch"),
    ("DS forward", "engine.forward outside the module"),
    ("DS backward", "engine.backward outside autograd/all-reduce"),
    ("DS step", "engine.step outside optimizer/schedule/clip"),
]


class Clock:
    """Exclusive wall time per label: a wrapper's time less that of the wrappers it calls."""

    def __init__(self) -> None:
        self.own: dict[str, float] = defaultdict(float)
        self._children: list[float] = []
        self.on = False

    def wrap(self, label: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            if not self.on:
                return fn(*args, **kwargs)
            self._children.append(0.0)
            start = time.perf_counter()
            try:
                with record_function(f"step_profile::{label}"):
                    return fn(*args, **kwargs)
            finally:
                spent = time.perf_counter() - start
                children = self._children.pop()
                self.own[label] += spent - children
                if self._children:
                    self._children[-1] += spent

        return timed

    def patch(self, obj: Any, name: str, label: str) -> None:
        setattr(obj, name, self.wrap(label, getattr(obj, name)))


def timed_batches(clock: Clock, batches: Iterator[Any]) -> Iterator[Any]:
    pull = clock.wrap("data", lambda: next(batches))
    while True:
        try:
            yield pull()
        except StopIteration:
            return


def instrument(trainer: Trainer, clock: Clock) -> None:
    engine = trainer.engine
    clock.patch(engine.module, "forward", "forward")
    clock.patch(trainer_module, "weighted_loss", "loss")
    clock.patch(torch.autograd, "backward", "backward")
    clock.patch(engine.optimizer, "step", "optimizer step")
    clock.patch(engine.optimizer, "zero_grad", "zero grad")
    clock.patch(engine, "zero_grad", "zero grad")
    clock.patch(trainer, "_clip_gradients", "grad norm + clip")
    clock.patch(engine, "get_global_grad_norm", "grad norm + clip")
    if hasattr(engine, "clip_fp32_gradients"):
        clock.patch(engine, "clip_fp32_gradients", "grad norm + clip")
    clock.patch(engine, "allreduce_gradients", "DS grad all-reduce")
    clock.patch(trainer, "_judged_loss", "loss all-reduce")
    clock.patch(trainer, "_weigh", "loss weights")
    for name in ("begin_step", "judge", "verdict", "condemned_at"):
        clock.patch(trainer.anomalies, name, "anomaly judge")
    if engine.lr_scheduler is not None:
        clock.patch(engine.lr_scheduler, "step", "LR schedule")
    clock.patch(trainer.scheduler, "get_last_lr", "LR schedule")
    clock.patch(trainer, "_log_train", "logging")
    clock.patch(trainer, "_check_memory", "memory check")
    clock.patch(trainer, "_skip_bad_batch", "watchdog / skip")
    clock.patch(engine, "forward", "DS forward")
    clock.patch(engine, "backward", "DS backward")
    clock.patch(engine, "step", "DS step")
    loader_cls = type(trainer.train_data)
    position = loader_cls.position  # a property of the loader: wrapped on a subclass
    trainer.train_data.__class__ = type(
        loader_cls.__name__,
        (loader_cls,),
        {"position": property(clock.wrap("data", position.fget))},
    )
    trainer._batches = timed_batches(clock, iter(trainer.train_data))


def run_steps(trainer: Trainer, watchdog: HangWatchdog, steps: int) -> None:
    """The fit loop's per-step body (`Trainer._loop`), without eval, samples or saves."""
    log_interval = trainer.cfg.trainer.log_interval
    window: list[dict[str, Any]] = []
    window_start, reads = time.perf_counter(), host.reads
    arm = watchdog.arm
    for _ in range(steps):
        arm()
        trainer._skip_bad_batch()
        window.append(trainer.train_step())
        trainer._check_memory()
        if log_interval and trainer.step % log_interval == 0:
            trainer._log_train(window, time.perf_counter() - window_start, reads)
            window, window_start, reads = [], time.perf_counter(), host.reads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--trace", action="store_true", help="also print torch.profiler's ops")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    # The wrapped optimizer.step makes torch's LR scheduler warn of a wrong call order; it is not.
    warnings.filterwarnings("ignore", message="Seems like `optimizer.step()` has been overridden")
    run_alone(measure, args, prefix="megalite-profile-")


def measure(args: argparse.Namespace, cfg: Any, run_dir: Path) -> None:
    trainer = single_process_trainer(cfg, run_dir)
    clock = Clock()
    instrument(trainer, clock)
    trainer.hang_log.parent.mkdir(parents=True, exist_ok=True)
    watchdog = HangWatchdog(trainer.hang_log, timeout_s=cfg.trainer.hang_timeout)
    watchdog.arm = clock.wrap("watchdog / skip", watchdog.arm)  # type: ignore[method-assign]
    try:
        run_steps(trainer, watchdog, args.warmup)
        clock.on = True
        prof = profile(activities=[ProfilerActivity.CPU]) if args.trace else None
        start = time.perf_counter()
        if prof is not None:
            with prof:
                run_steps(trainer, watchdog, args.steps)
        else:
            run_steps(trainer, watchdog, args.steps)
        total = time.perf_counter() - start
    finally:
        watchdog.close()
    report(cfg, clock.own, total, args.steps)
    if prof is not None:
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


def report(cfg: Any, own: dict[str, float], total: float, steps: int) -> None:
    step_ms = 1e3 * total / steps
    rows = [(piece, 1e3 * own.pop(piece, 0.0) / steps, what) for piece, what in PIECES]
    rows += [(piece, 1e3 * s / steps, "") for piece, s in sorted(own.items())]
    other = step_ms - sum(ms for _, ms, _ in rows)
    rows.append(("other", other, "the trainer's own lines, the loop"))
    math_ms = sum(ms for piece, ms, _ in rows[:4])
    print(
        f"\nmodel={cfg.model.name} seq_len={cfg.trainer.seq_len} "
        f"batch={cfg.trainer.global_batch_size} accum={cfg.grad_accum_steps} "
        f"zero={cfg.parallel.effective_zero_stage} threads={torch.get_num_threads()} "
        f"steps={steps} load={os.getloadavg()[0]:.2f}"
    )
    print(f"{'piece':<22}{'ms/step':>10}{'share':>9}  covers")
    for piece, ms, what in rows:
        print(f"{piece:<22}{ms:>10.2f}{100 * ms / step_ms:>8.1f}%  {what}")
    print(f"{'step':<22}{step_ms:>10.2f}{100.0:>8.1f}%")
    print(
        f"{'math (fwd+loss+bwd+opt)':<22}{math_ms:>10.2f}{100 * math_ms / step_ms:>8.1f}%  "
        f"outside it: {step_ms - math_ms:.2f} ms/step"
    )


if __name__ == "__main__":
    main()
