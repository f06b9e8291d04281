"""Sharded construction keeps each rank's memory to its own share: 760m (3 GB of fp32 weights)
built by every rank of tp2 × pp2 and of dp2 ZeRO-3, each rank's peak anonymous memory through
the build (polled, as tools/bench/startup.py measures it) within 1.3× its share of the fp32
weights: its TP slice of its stage, or its ZeRO-3 partitions. Before, every rank drew the whole
model first (3 GB each)."""

from __future__ import annotations

import pytest

from tools.bench.startup import config_for, measure_world

MARGIN = 1.3


@pytest.mark.parametrize("layout", [["parallel.tp=2", "parallel.pp=2"],
                                    ["parallel.dp=2", "parallel.zero_stage=3"]],
                         ids=["tp2-pp2", "dp2-zero3"])  # fmt: skip
def test_build_peak_is_the_ranks_share(layout: list[str]) -> None:
    ranks = measure_world(config_for("760m", layout), engine=False, step=False)
    fair = 4 * 760e6 / len(ranks)  # the fp32 weights over the ranks that split them
    for rank, r in enumerate(ranks):
        assert r["share"] < 1.25 * fair, (rank, r)  # a stage's share, or the partition
        assert r["build_peak"] <= MARGIN * r["share"], (rank, r["build_peak"] / r["share"])
