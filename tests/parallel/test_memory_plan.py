"""The planner's memory per rank (megalite.plan.memory, what every run logs at start) against the
measured peak through build, engine set-up and the first step (what every run logs after step
1, measured the same way: anonymous memory above the rank's baseline), for 125m on CPU at three
layouts.

Tolerance: measured within [0.5, 2] x planned. The plan counts the engine's state to the byte
(tests/plan/test_engine_bytes.py) and the activations the GPU kernels keep (flash-attn, fused
RMSNorm); on the CPU the torch fallbacks, DeepSpeed's transient buffers (the pipeline's, ZeRO-3's)
and the allocator add to it. Measured: 0.96 (tp2), 1.52-1.73 (tp2 x pp2), 1.59-1.74 (dp2 ZeRO-3).
For tiny the fixed cost of a process's first step (80-170 MiB) dwarfs the plan (13-37 MiB):
there only the line is checked (tests/train/test_demo.py).
"""

from __future__ import annotations

import pytest

from megalite.plan.memory import stage_memory
from megalite.train.memory_check import layout_of
from tools.bench.startup import config_for, measure_world


@pytest.mark.parametrize("layout", [["parallel.tp=2"], ["parallel.tp=2", "parallel.pp=2"],
                                    ["parallel.dp=2", "parallel.zero_stage=3"]],
                         ids=["tp2", "tp2-pp2", "dp2-zero3"])  # fmt: skip
def test_measured_peak_is_near_the_plan(layout: list[str]) -> None:
    cfg = config_for("125m", layout)
    for rank, r in enumerate(measure_world(cfg, engine=True, step=True)):
        planned = stage_memory(cfg.model, layout_of(cfg), r["stage"]).total
        assert 0.5 <= r["step_peak"] / planned <= 2, (rank, r["step_peak"] / planned)
