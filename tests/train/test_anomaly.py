"""AnomalyPolicy on its own: the verdict of each step, and what follows a bad one under
trainer.anomaly=halt, skip and rollback, with its state saved and restored."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from megalite.config import TrainerConfig
from megalite.train.anomaly import WARMUP, Anomaly, AnomalyPolicy, TrainingError

BATCH = 4  # global windows per step


def policy(**overrides) -> AnomalyPolicy:
    t = TrainerConfig(global_batch_size=BATCH, micro_batch_size=1, **overrides)
    return AnomalyPolicy(t)


def step(p: AnomalyPolicy, n: int, loss: float) -> float:
    """Step `n` (1-based) judged at `loss`, its batch the n-th of the stream."""
    p.begin_step(n, (n - 1) * BATCH)
    p.judge(loss)
    return p.verdict()


def bad_step(p: AnomalyPolicy, n: int, loss: float) -> Anomaly:
    with pytest.raises(Anomaly) as caught:
        step(p, n, loss)
    return caught.value


def test_judges_non_finite_and_spikes_after_warmup():
    p = policy(spike_factor=2.0)
    assert p.judge(math.nan) and p.judge(math.inf)  # before any good loss too
    for n in range(1, WARMUP + 1):
        assert step(p, n, 1.0) == 1.0
    bad = bad_step(p, WARMUP + 1, 2.5)
    assert "loss spike" in str(bad) and f"at step {WARMUP + 1}" in str(bad)
    assert bad.windows == range(WARMUP * BATCH, (WARMUP + 1) * BATCH)
    assert step(p, WARMUP + 2, 1.9) == 1.9  # below the factor: good, remembered


def test_verdict_needs_a_judgement():
    p = policy()
    p.begin_step(1, 0)
    with pytest.raises(AssertionError, match="not judged"):
        p.verdict()


def test_halt_names_the_last_good_checkpoint():
    p = policy(anomaly="halt")
    bad = bad_step(p, 3, math.nan)
    with pytest.raises(TrainingError, match=r"non-finite loss.*last good checkpoint: /c/step_2"):
        p.respond(bad, lambda: Path("/c/step_2"))
    with pytest.raises(TrainingError, match="no checkpoint was saved yet"):
        p.respond(bad, lambda: None)


def test_skip_goes_on_until_more_than_max_skips_in_a_row():
    p = policy(anomaly="skip", max_skips=2)
    asked = []

    def last_good() -> Path:
        asked.append(1)
        return Path("/c/step_1")

    for n in (1, 2):
        assert p.respond(bad_step(p, n, math.nan), last_good) is None
    step(p, 3, 1.0)  # a good step resets the count
    for n in (4, 5):
        assert p.respond(bad_step(p, n, math.nan), last_good) is None
    assert not asked, "skipping waits for no save"
    with pytest.raises(TrainingError, match=r"3 steps in a row skipped.*max_skips=2.*step_1"):
        p.respond(bad_step(p, 6, math.nan), last_good)


def test_rollback_condemns_the_batch_and_stops_at_max_rollbacks():
    p = policy(anomaly="rollback", max_rollbacks=1)
    with pytest.raises(TrainingError, match="no checkpoint to roll back to"):
        p.respond(bad_step(p, 3, math.nan), lambda: None)
    assert p.respond(bad_step(p, 3, math.nan), lambda: Path("/c/step_2")) == Path("/c/step_2")
    assert p.condemned_at(2 * BATCH) == BATCH and p.condemned_at(BATCH) == 0
    with pytest.raises(TrainingError, match="max_rollbacks=1 reached.*step_2"):
        p.respond(bad_step(p, 5, math.nan), lambda: Path("/c/step_2"))


def test_state_round_trip_keeps_a_rollbacks_newer_range():
    p = policy(anomaly="rollback", spike_factor=3.0)
    for n in range(1, 4):
        step(p, n, 2.0)
    p.skipped = [[0, 4]]
    saved = p.state_dict()
    q = policy(anomaly="rollback", spike_factor=3.0)
    q.skipped = [[8, 12]]  # condemned after the checkpoint was written: kept on loading it
    q.load_state_dict(saved)
    assert q.skipped == [[0, 4], [8, 12]]
    assert list(q.guard.recent) == [2.0, 2.0, 2.0]
    q.load_state_dict({})  # a checkpoint from before the policy's state: nothing condemned anew
    assert q.skipped == [[0, 4], [8, 12]] and not q.guard.recent
