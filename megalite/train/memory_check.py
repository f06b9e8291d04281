"""Every run checks the planner's memory model against itself.

At start each rank logs what `megalite.plan.memory` predicts for its stage under this config
(weights, gradients, optimizer state, activations, peak; host memory at start-up); after the
first step it logs the measured peak beside it and writes both to metrics.jsonl
(`memory_planned_gib`, `memory_measured_gib`, per rank). Measured: on a GPU
`torch.cuda.max_memory_allocated`; on the CPU the peak of the process's anonymous resident memory
above what it held before the model was built, polled by a thread (`PeakSampler`: the kernel
keeps no high-water mark of anonymous memory alone, and RSS would also count the library pages
mapped as code first runs).
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import torch

from megalite.config import Config
from megalite.plan.layout import Layout
from megalite.plan.memory import HostMemory, StageMemory, host_memory, stage_memory

log = logging.getLogger("megalite")
GIB = 2**30


def anon_rss_bytes() -> int:
    """This process's anonymous resident memory now."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/self/status")


class PeakSampler:
    """The peak of `anon_rss_bytes()` above its value at start, polled every `interval_s`."""

    def __init__(self, interval_s: float = 0.002) -> None:
        self.interval_s = interval_s
        self.base = anon_rss_bytes()
        self.peak = self.base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, name="memory-peak", daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak = max(self.peak, anon_rss_bytes())

    def above_base(self) -> int:
        """The peak so far, above the start."""
        self.peak = max(self.peak, anon_rss_bytes())
        return self.peak - self.base

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def layout_of(cfg: Config) -> Layout:
    """The planner's view of this run's layout."""
    p, t = cfg.parallel, cfg.trainer
    return Layout(
        tp=p.tp, pp=p.pp, dp=p.dp, zero=p.zero_stage, micro_batch=t.micro_batch_size,
        seq_len=t.seq_len, global_batch=t.global_batch_size, ac=p.activation_checkpointing,
        sp=p.sequence_parallel, precision=t.precision,
    )  # fmt: skip


class MemoryCheck:
    """Started before the model is built (its baseline); `after_step` once the first step ran."""

    def __init__(self, cfg: Config, *, stage: int, device: torch.device) -> None:
        layout = layout_of(cfg)
        self.plan: StageMemory = stage_memory(cfg.model, layout, stage)
        self.host: HostMemory = host_memory(cfg.model, layout, self.plan)
        self.device = device
        self.sampler = PeakSampler() if device.type == "cpu" else None
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        self.done = False

    def log_plan(self) -> None:
        s, plan = self.plan.state, self.plan
        log.info(
            "memory plan for this rank (megalite.plan.memory, stage %d): weights %.2f, gradients "
            "%.2f, optimizer %.2f, activations %.2f GiB; peak %.2f GiB; host at start-up %.2f GiB "
            "(process %.2f + the larger of one parameter drawn %.2f and a resume's largest file "
            "%.2f)",
            plan.stage,
            s.weights / GIB,
            s.gradients / GIB,
            s.optimizer / GIB,
            plan.activations / GIB,
            plan.total / GIB,
            self.host.peak / GIB,
            self.host.process / GIB,
            self.host.build / GIB,
            self.host.resume / GIB,
        )

    def measured(self) -> int:
        if self.sampler is not None:
            return self.sampler.above_base()
        return torch.cuda.max_memory_allocated(self.device)

    def after_step(self, step: int) -> dict[str, Any] | None:
        """The first call: the measured peak beside the plan (logged); a metrics record."""
        if self.done:
            return None
        self.done = True
        measured = self.measured()
        planned = self.plan.total
        how = (
            f"anonymous memory above the {self.sampler.base / GIB:.2f} GiB before the build, CPU"
            if self.sampler is not None
            else "CUDA max allocated"
        )
        log.info(
            "memory after step %d: measured peak %.2f GiB (%s), planned %.2f GiB: %.2fx the plan",
            step,
            measured / GIB,
            how,
            planned / GIB,
            measured / planned,
        )
        self.close()
        return {
            "step": step,
            "memory_planned_gib": planned / GIB,
            "memory_measured_gib": measured / GIB,
        }

    def close(self) -> None:
        if self.sampler is not None:
            self.sampler.close()
            self.sampler = None
