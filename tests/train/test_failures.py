"""Bad input during a run stops the job with a clear message, never hangs, never damages the last
good checkpoint: a non-finite loss, a corrupt shard, a checkpoint of another model shape."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from megalite.checkpoint import store
from megalite.checkpoint.store import CheckpointError
from megalite.launch import launch, prepare_run
from tests.helpers import ROOT, compose_config

BASE = [
    "model=tiny",
    "parallel.dp=2",
    "parallel.zero_stage=1",
    "trainer.seq_len=32",
    "trainer.micro_batch_size=2",
    "trainer.global_batch_size=4",
    "trainer.log_interval=1",
    "trainer.eval_interval=0",
    "trainer.eval_steps=1",
    "logging.wandb.mode=disabled",
]


def pretrain(*overrides: str) -> subprocess.CompletedProcess:
    """The entry point as a user runs it."""
    return subprocess.run(
        [sys.executable, "launch/pretrain.py", *BASE, *overrides],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_nan_loss_stops_and_names_last_checkpoint(sample_data: Path, tmp_path: Path) -> None:
    """trainer.anomaly=halt (the default) on a real divergence: an absurd learning rate, step 1
    is fine and checkpointed, then the weights blow up. The last line names the step, its batch
    (global windows: 4 a step) and the last good checkpoint. (ZeRO 0: with ZeRO 1-3 DeepSpeed
    itself skips updates whose gradients are not finite.)"""
    out = pretrain(
        "parallel.zero_stage=0",
        f"data.path={sample_data}",
        f"trainer.run_dir={tmp_path}",
        "trainer.max_steps=6",
        "trainer.save_interval=1",
        "optim.lr=1e30",
        "optim.min_lr=0",
        "optim.warmup_steps=0",
        "optim.grad_clip=0",
    )
    assert out.returncode == 1, out.stdout + out.stderr
    last = out.stderr.strip().splitlines()[-1]
    said = re.search(r"non-finite loss \((-?inf|nan)\) at step (\d+) \(windows \[(\d+), (\d+)\)\); "
                     r"last good checkpoint: (\S+)$", last)  # fmt: skip
    assert said, last
    step, start, stop = (int(said[i]) for i in (2, 3, 4))
    assert (start, stop) == (4 * (step - 1), 4 * step)
    good = store.latest(tmp_path / "checkpoints")
    assert said[5] == str(good) and good.name == store.step_name(step - 1)
    store.read_meta(good)  # committed and whole


def test_corrupt_shard_names_the_shard(sample_data: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(sample_data, data)
    shard = sorted((data / "train").glob("*.tar"))[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 3])  # truncated
    out = pretrain(
        f"data.path={data}", f"trainer.run_dir={tmp_path / 'run'}", "trainer.max_steps=50",
        "data.read_attempts=2", "data.retry_delay_s=0",
    )  # fmt: skip
    assert out.returncode == 1, out.stdout + out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert shard.name in last and "is corrupt" in last and "restore the file" in last, last
    assert "attempts" not in last  # a local file is not retried


def test_resume_refuses_other_model_shape(sample_data: Path, tmp_path: Path) -> None:
    cfg = compose_config(
        [*BASE, f"data.path={sample_data}", f"trainer.run_dir={tmp_path}", "trainer.max_steps=1"]
    )
    launch(cfg, default_run_dir=tmp_path)
    ckpt = store.latest(tmp_path / "checkpoints")
    other = compose_config(
        [*BASE, f"data.path={sample_data}", "model.n_layers=2", f"trainer.resume={ckpt}"]
    )
    with pytest.raises(CheckpointError, match=r"another model shape: n_layers=4 \(config 2\)"):
        prepare_run(other, run_dir=tmp_path / "other", world_size=None)
    relayout = compose_config(
        [*BASE, f"data.path={sample_data}", "parallel.dp=1", f"trainer.resume={ckpt}"]
    )
    with pytest.raises(CheckpointError, match="tools/convert.py reshard"):
        prepare_run(relayout, run_dir=tmp_path / "other", world_size=None)
