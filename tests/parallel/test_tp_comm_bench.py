"""Smoke test of `tools/bench/tp_comm.py`: the collectives a tensor-parallel step issues equal the
analytic (Megatron) ones, with and without sequence parallelism.

One world of two ranks on a small multi-query model (one kv head, replicated over both ranks, so
the kv weight-gradient syncs are exercised), tied embeddings and a vocabulary not divisible by
tp: the cases where an extra or a missing collective would hide most easily.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from megalite.config import ModelConfig

BENCH = Path(__file__).resolve().parents[2] / "tools" / "bench"

CFG = ModelConfig(
    name="tp-comm-test", dim=32, n_layers=2, n_heads=4, n_kv_heads=1, ffn_dim=48, vocab_size=101,
    tie_embeddings=True, max_seq_len=16,
)  # fmt: skip


def test_counted_collectives_match_megatron(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(BENCH))  # spawned ranks inherit sys.path
    tp_comm = importlib.import_module("tp_comm")
    reports = tp_comm.measure(CFG, tp=2, batch=2, seq_len=8, sp_settings=[False, True])
    assert [r.sp for r in reports] == [False, True]
    for report in reports:
        assert report.ok, report.table()
        assert {line.row for line in report.lines} >= {tp_comm.LAYERS, tp_comm.KV}
    plain, seq = (r.ring_bytes(tp_comm.ACTIVATION_ROWS) for r in reports)
    assert plain == seq  # an all-reduce sends what a reduce-scatter plus an all-gather send
