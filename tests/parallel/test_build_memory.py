"""Sharded construction keeps each rank's memory to its own share: 760m (3 GB of fp32 weights)
built, and its engine set up, by every rank of tp2 × pp2 and of dp2 ZeRO-3; each rank's peak
anonymous memory (polled, as tools/bench/startup.py measures it) above its baseline:

- through the build, within 1.3× its share of the fp32 weights (its TP slice of its stage, or
  its ZeRO-3 partitions). Before, every rank drew the whole model first (3 GB each).
  Measured: 1.11× (tp2 × pp2), 1.13× (dp2 ZeRO-3: one block drawn whole before it is
  partitioned; without build.release_freed_memory a rank reached 1.6-1.8× in some runs).
- through the engine set-up, within what the planner counts for the rank's own parameters
  (megalite.plan.memory: weights, gradients, optimizer state and the step's fp32 copies): DeepSpeed
  allocates the fp32 master and the Adam moments of its partition there, and nothing of any
  other rank's. Measured: 0.53× (tp2 × pp2), 0.75× (dp2 ZeRO-3) of that.
"""

from __future__ import annotations

import pytest

from megalite.plan.memory import stage_memory
from megalite.train.memory_check import layout_of
from tools.bench.startup import config_for, measure_world

MARGIN = 1.3


@pytest.mark.parametrize("layout", [["parallel.tp=2", "parallel.pp=2"],
                                    ["parallel.dp=2", "parallel.zero_stage=3"]],
                         ids=["tp2-pp2", "dp2-zero3"])  # fmt: skip
def test_build_and_engine_peak_is_the_ranks_share(layout: list[str]) -> None:
    cfg = config_for("760m", layout)
    ranks = measure_world(cfg, engine=True, step=False)
    fair = 4 * 760e6 / len(ranks)  # the fp32 weights over the ranks that split them
    for rank, r in enumerate(ranks):
        assert r["share"] < 1.25 * fair, (rank, r)  # a stage's share, or the partition
        assert r["build_peak"] <= MARGIN * r["share"], (rank, r["build_peak"] / r["share"])
        s = stage_memory(cfg.model, layout_of(cfg), r["stage"]).state
        own = s.weights + s.gradients + s.optimizer + s.step_buffers
        assert r["engine_peak"] <= own, (rank, r["engine_peak"] / own)
