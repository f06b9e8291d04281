"""Smoke test of `tools/bench/pipeline.py`: one two-stage world measures two micro-batch counts
(the engine rebuilt in between) and the instruction timer sees every pass of the schedule.

The bench itself raises when the timer misses a forward or backward pass (DeepSpeed dispatching
its instructions some other way would otherwise report every stage as 100% idle), so a run that
returns rows has timed m forward and m backward passes per step on each stage.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "tools" / "bench"
SMALL = [
    "model.n_layers=2",
    "model.dim=32",
    "model.n_heads=2",
    "model.n_kv_heads=1",
    "model.ffn_dim=64",
    "trainer.seq_len=16",
    "trainer.micro_batch_size=1",
]


def test_two_stage_world_times_every_pass(
    monkeypatch: pytest.MonkeyPatch, sample_data: Path, tmp_path: Path
) -> None:
    monkeypatch.syspath_prepend(str(BENCH))  # spawned ranks inherit sys.path
    bench = importlib.import_module("pipeline")
    cfg = bench.prepared_config([*SMALL, f"data.path={sample_data}"], pp=2, run_dir=tmp_path)
    rows = bench.measure(cfg, micro_batches=[1, 2], steps=1)

    assert [(r.pp, r.m) for r in rows] == [(2, 1), (2, 2)]
    for row in rows:
        assert row.step_s > 0
        assert row.bubble == pytest.approx(1 / (row.m + 1))
        assert [s.layers for s in row.stages] == ["embed+1 blocks", "1 blocks+norm+head"]
        for stage in row.stages:
            assert stage.threads == 1
            assert stage.seconds["fwd"] > 0 and stage.seconds["bwd"] > 0
            assert 0 <= stage.idle <= 1 and stage.idle_excl_opt <= stage.idle
    assert "1F1B bubble" in bench.summary_table(rows)
    assert len(bench.breakdown_table(rows).splitlines()) == 2 + 4
