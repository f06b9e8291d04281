"""A training step reads the device from the host once (rank/host.py): the judged loss, with
every rank's stop flags in the same all-reduce; a log line adds one (the grad norm). Counted in
metrics.jsonl's `host_syncs`, over a tp2 run (the loss counted once per DP replica) that logs
every 4 steps; a stop request still stops every rank at the same step."""

from __future__ import annotations

import signal
from pathlib import Path

import torch

from megalite.launch import launch
from megalite.rank.signals import StopRequest
from tests.helpers import read_metrics, short_job

STEPS = 8


def test_one_host_sync_per_step_and_one_per_log_line(sample_data: Path, tmp_path: Path) -> None:
    cfg = short_job(
        sample_data, tmp_path / "run", "parallel.tp=2", "trainer.log_interval=4", steps=STEPS
    )
    launch(cfg, default_run_dir=tmp_path / "unused")
    lines = [r for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert [r["step"] for r in lines] == [4, 8]
    assert [r["host_syncs"] for r in lines] == [4 + 1, 4 + 1]


def test_stop_flags_agree_as_the_max_of_the_signals() -> None:
    stop = StopRequest()
    stop.signums = sorted([signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM])
    ranks = []
    for received in (0, signal.SIGUSR1, signal.SIGTERM, 0):
        stop.signum = received
        ranks.append(stop.flags(torch.device("cpu")))
    reduced = torch.stack(ranks).sum(0).tolist()  # what the SUM all-reduce gives
    assert stop.agree(reduced) == max(signal.SIGUSR1, signal.SIGTERM)
    assert stop.agree([0.0] * len(stop.signums)) == 0
