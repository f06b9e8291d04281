"""A bad batch, planted for real (MEGALITE_FAULT=nan_loss|spike_loss@window=W makes the loss of the
step holding global window W NaN or 100× larger), under each trainer.anomaly policy: halt stops
naming the step, the batch and the last good checkpoint; rollback reloads the last checkpoint,
skips that batch (and goes on skipping it after a resume) and finishes the run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megalite.checkpoint import store
from tests.helpers import ROOT, read_metrics, short_job_overrides

STEPS = 14
WINDOWS_PER_STEP = 8  # global batch 8 sequences


def pretrain(data: Path, run_dir: Path, fault: str, *extra: str) -> subprocess.CompletedProcess:
    args = short_job_overrides(data, run_dir, "parallel.dp=2", "trainer.save_interval=2", *extra,
                               steps=STEPS)  # fmt: skip
    env = {**os.environ, "MEGALITE_FAULT": fault}
    cmd = [sys.executable, str(ROOT / "launch/pretrain.py"), *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(
    ("fault", "step", "extra"),
    [
        ("nan_loss", 5, []),
        ("spike_loss", 12, ["trainer.spike_factor=3"]),  # spikes are judged after 10 good steps
    ],
)
def test_rollback_skips_the_bad_batch(
    sample_data: Path, tmp_path: Path, fault: str, step: int, extra: list[str]
) -> None:
    bad = range((step - 1) * WINDOWS_PER_STEP, step * WINDOWS_PER_STEP)
    out = pretrain(sample_data, tmp_path, f"{fault}@window={bad.start + 3}",
                   "trainer.anomaly=rollback", *extra)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    said = out.stdout + out.stderr
    assert f"at step {step} (windows [{bad.start}, {bad.stop})): rolling back to" in said
    assert f"skipping windows [{bad.start}, {bad.stop}) (rolled back)" in said
    losses = [r["loss"] for r in read_metrics(tmp_path) if "loss" in r]
    assert all(torch.isfinite(torch.tensor(losses)))
    final = store.latest(tmp_path / "checkpoints")
    state = torch.load(final / store.rank_file(1), weights_only=False)
    assert state["step"] == STEPS
    assert state["data"]["window"] == (STEPS + 1) * WINDOWS_PER_STEP  # one batch skipped
    assert state["anomaly"]["skipped"] == [[bad.start, bad.stop]]


def test_halt_names_the_step_batch_and_checkpoint(sample_data: Path, tmp_path: Path) -> None:
    out = pretrain(sample_data, tmp_path, "nan_loss@window=35")
    assert out.returncode == 1
    last = out.stderr.strip().splitlines()[-1]
    assert "non-finite loss (nan) at step 5 (windows [32, 40)); last good checkpoint:" in last
    assert last.endswith(store.step_name(4))
