"""The demo as the README runs it (shortened): 2 processes, ZeRO-2, the bundled sample prepared on
first use; the loss falls and the run folder holds metrics.jsonl, config.yaml and an offline wandb
run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.helpers import ROOT, read_metrics

sys.path.insert(0, str(ROOT / "tools"))
from dev import DEMO  # noqa: E402


def test_demo_trains(tmp_path: Path) -> None:
    run_dir = tmp_path / "demo"
    args = [a for a in DEMO if not a.startswith(("trainer.max_steps", "trainer.run_dir"))]
    args += [
        "trainer.max_steps=60",
        "trainer.log_interval=10",
        "trainer.eval_interval=30",
        "trainer.eval_steps=4",
        f"trainer.run_dir={run_dir}",
        f"data.cache_dir={tmp_path / 'cache'}",
    ]
    env = {**os.environ, "WANDB_SILENT": "true"}
    out = subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "final validation loss" in out.stdout
    records = read_metrics(run_dir)
    losses = [r["loss"] for r in records if "loss" in r]
    vals = [r["val_loss"] for r in records if "val_loss" in r]
    assert len(losses) == 6 and losses[-1] < losses[0] - 1.0
    assert vals[-1] < vals[0] - 1.0
    first = next(r for r in records if "loss" in r)
    for key in ("step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu", "memory_gib"):
        assert key in first, key
    # The planner's memory for the run beside the measured peak, after the first step.
    memory = [r for r in records if "memory_planned_gib" in r]
    assert len(memory) == 1 and memory[0]["step"] == 1, memory
    assert 0 < memory[0]["memory_planned_gib"] < memory[0]["memory_measured_gib"] < 2
    assert "memory plan for this rank" in out.stdout and "memory after step 1" in out.stdout
    assert list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert (run_dir / "config.yaml").is_file()
    assert json.loads((run_dir / "checkpoints" / "step_00000060" / "meta.json").read_text())
    assert (tmp_path / "cache").is_dir()  # the sample was prepared into the cache on first use
