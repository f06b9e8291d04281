"""Start-up never hangs: no run-time build of a DeepSpeed op (so no build lock can block a start),
and a start phase past `trainer.startup_timeout` stops the job with one line naming the phase
and what it waits for. The launcher's line for a dead rank.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from megalite import launch as launch_module
from megalite.checkpoint import store
from megalite.cluster import launch as cluster_launch
from megalite.cluster.local import RankExited
from tests.faults.test_ranks import ROOT, job
from tests.helpers import read_metrics, short_job

STALE = "deepspeed_shm_comm/lock"  # what an interrupted build of DeepSpeed's shm op leaves


def planted_lock(folder: Path) -> Path:
    """A fresh torch extension folder holding a stale build lock."""
    lock = folder / STALE
    lock.parent.mkdir(parents=True)
    lock.touch()
    return lock


def run_with(cmd: list[str], **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        cmd, cwd=ROOT, capture_output=True, text=True, timeout=240, env={**os.environ, **env}
    )


def test_a_stale_build_lock_never_blocks_a_start(sample_data: Path, tmp_path: Path) -> None:
    """A stale lock in a fresh TORCH_EXTENSIONS_DIR (which used to block every start forever):
    the run starts, builds nothing there, and `trainer.stop_at_step=0` (a step-0 native
    checkpoint, no step trained) stops it at once."""
    extensions = tmp_path / "torch_extensions"
    planted_lock(extensions)
    run_dir = tmp_path / "run"
    cmd = job(sample_data, run_dir, "trainer.stop_at_step=0", "trainer.startup_timeout=120", dp=2)
    out = run_with(cmd, TORCH_EXTENSIONS_DIR=str(extensions))
    assert out.returncode == 0, out.stderr[-3000:]
    assert sorted(p.relative_to(extensions).as_posix() for p in extensions.rglob("*")) == [
        "deepspeed_shm_comm",
        STALE,
    ]
    assert store.latest(run_dir / "checkpoints").name == store.step_name(0)
    assert not [r for r in read_metrics(run_dir) if "loss" in r]  # no step trained
    assert "stopped at step 0 (trainer.stop_at_step" in out.stdout
    assert "final validation loss" not in out.stdout


def test_a_stuck_start_phase_stops_the_job_naming_it(sample_data: Path, tmp_path: Path) -> None:
    """Rank 1's DeepSpeed set-up never ends: past trainer.startup_timeout it names the phase and
    the lock it may wait for, its stacks are in its log, and the launcher stops the job with
    that line (exit 1)."""
    extensions = tmp_path / "torch_extensions"
    lock = planted_lock(extensions)
    run_dir = tmp_path / "run"
    out = run_with(
        job(sample_data, run_dir, "trainer.startup_timeout=3", dp=2),
        TORCH_EXTENSIONS_DIR=str(extensions),
        MEGALITE_FAULT="startup_hang@phase=extension_load,rank=1",
    )
    assert out.returncode == 1, out.stderr[-3000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith(
        "error: rank 1: start-up phase 'extension load' still running after "
        "trainer.startup_timeout=3s; waiting for DeepSpeed's set-up; build lock(s) "
    ), last
    assert str(lock) in last and "safe to delete when no build is running" in last
    rank_log = (run_dir / "logs" / "rank_00001.log").read_text()
    assert "start-up phase 'extension load' still running" in rank_log
    assert "in startup_hang" in rank_log  # the stack dump


@pytest.mark.parametrize("saved", [False, True])
def test_a_dead_rank_suggests_resuming_only_from_a_checkpoint(
    sample_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, saved: bool
) -> None:
    """The launcher's line when a rank dies points at trainer.resume=auto only when the run
    has a checkpoint to resume from."""
    died = "rank 1 (pid 42) was killed by SIGKILL; the other ranks were stopped"

    def dies(*_args: object, **_kwargs: object) -> None:
        if saved:  # the run committed a checkpoint before the rank died
            ckpt = tmp_path / "checkpoints" / store.step_name(2)
            ckpt.mkdir(parents=True)
            (ckpt / store.META).write_text('{"files": {}, "previous": null}')
        raise RankExited(died, reported=False)

    monkeypatch.setattr(cluster_launch, "spawn", dies)
    with pytest.raises(RankExited) as e:
        launch_module.launch(short_job(sample_data, tmp_path, steps=2), default_run_dir=tmp_path)
    hint = "; resume from the last checkpoint with trainer.resume=auto"
    assert str(e.value) == died + (hint if saved else "")
