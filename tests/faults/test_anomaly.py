"""A bad batch, planted for real (MEGALITE_FAULT=nan_loss|spike_loss@window=W makes the loss of the
step holding global window W NaN or 100× larger), under the trainer.anomaly policies: skip drops
that step's update (the model, optimizer and LR schedule after it are exactly those before it) and
goes on; rollback reloads the last checkpoint, skips that batch (and goes on skipping it after a
resume) and finishes the run. halt (the default) on a real divergence: tests/train/test_failures.py.
"""

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


def tensors(ckpt: Path) -> dict[str, object]:
    """Every tensor and LR-scheduler state in `ckpt`'s DeepSpeed files (model, optimizer), by
    file and key path; megalite's own per-rank files (step, data position) are left out."""
    found: dict[str, object] = {}

    def walk(value: object, key: str) -> None:
        if isinstance(value, torch.Tensor):
            found[key] = value
        elif isinstance(value, dict):
            for k, v in value.items():
                if k == "lr_scheduler":
                    found[f"{key}/{k}"] = v
                else:
                    walk(v, f"{key}/{k}")
        elif isinstance(value, list | tuple):
            for i, v in enumerate(value):
                walk(v, f"{key}/{i}")

    for path in sorted(ckpt.glob("*.pt")):
        if not path.name.startswith("rank_"):
            walk(torch.load(path, weights_only=False, map_location="cpu"), path.name)
    return found


def same(a: dict[str, object], b: dict[str, object]) -> bool:
    return a.keys() == b.keys() and all(
        torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a
    )


@pytest.mark.parametrize("layout", ["parallel.dp=2", "parallel.pp=2"])  # ZeRO-1; 1F1B pipeline
def test_skip_drops_exactly_the_bad_update(sample_data: Path, tmp_path: Path, layout: str) -> None:
    args = short_job_overrides(sample_data, tmp_path, layout, "trainer.save_interval=1",
                               "trainer.anomaly=skip", steps=5)  # fmt: skip
    env = {**os.environ, "MEGALITE_FAULT": "nan_loss@window=27"}  # step 4: windows [24, 32)
    cmd = [sys.executable, str(ROOT / "launch/pretrain.py"), *args]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    said = out.stdout + out.stderr
    assert "non-finite loss (nan) at step 4 (windows [24, 32)): update skipped" in said
    assert "| skipped 1" in said  # the step's log line
    ckpts = {n: tensors(tmp_path / "checkpoints" / store.step_name(n)) for n in (3, 4, 5)}
    assert same(ckpts[3], ckpts[4])  # weights, Adam moments and step count, LR schedule
    assert not same(ckpts[4], ckpts[5])  # the next batch trains
    state = torch.load(store.latest(tmp_path / "checkpoints") / store.rank_file(0),
                       weights_only=False)  # fmt: skip
    assert (state["step"], state["data"]["window"]) == (5, 5 * WINDOWS_PER_STEP)
