"""Faults of the ranks themselves, injected for real into `python launch/pretrain.py`: stop
signals to the launcher (checkpoint, clean exit, exact resume), a rank killed with SIGKILL (every
process gone at once, the rank named, resume ends as an uninterrupted run), a rank that stops
answering (stacks dumped, the others fail within trainer.collective_timeout: nothing hangs).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from megalite.checkpoint import store
from tests.faults.test_checkpoint_faults import flip_bytes
from tests.helpers import ROOT, short_job_overrides, train_losses

STEPS = 20
DP = 2


def job(data: Path, run_dir: Path, *extra: str, dp: int = DP) -> list[str]:
    args = short_job_overrides(data, run_dir, f"parallel.dp={dp}", "trainer.micro_batch_size=2",
                               *extra, steps=STEPS)  # fmt: skip
    return [sys.executable, str(ROOT / "launch/pretrain.py"), *args]


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)


def start(cmd: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Until metrics.jsonl shows a training step ≥ `step`."""
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        if metrics.is_file():
            steps = [json.loads(ln).get("step", 0) for ln in metrics.read_text().splitlines()
                     if '"loss"' in ln]  # fmt: skip
            if steps and max(steps) >= step:
                return
        time.sleep(0.05)
    raise AssertionError(f"no step {step} within {timeout} s")


def ranks_of(proc: subprocess.Popen) -> list[psutil.Process]:
    """The rank processes of the launcher: the children of the server it forks them from
    (megalite.cluster.local.start_processes), in the order they started."""
    kids = psutil.Process(proc.pid).children()
    servers = [k for k in kids if "multiprocessing.forkserver" in " ".join(k.cmdline())]
    ranks = [rank for server in servers for rank in server.children()]
    return sorted(ranks, key=lambda r: (r.create_time(), r.pid))


@pytest.fixture(scope="module")
def reference_run(sample_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted run, checkpointed every 2 steps."""
    run_dir = tmp_path_factory.mktemp("straight")
    out = run(job(sample_data, run_dir, "trainer.save_interval=2"))
    assert out.returncode == 0, out.stderr[-3000:]
    return run_dir


@pytest.fixture(scope="module")
def reference(reference_run: Path) -> dict[int, float]:
    return train_losses(reference_run)


def stop_with(sig: int, cmd: list[str], run_dir: Path, after: int) -> int:
    """Start the job, send `sig` to the launcher once step `after` is logged; the step the ranks
    checkpointed at and stopped (cleanly, exit 0)."""
    proc = start(cmd)
    wait_for_step(run_dir, after, proc)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    said = (out + err).split("SIGUSR1 at step ")  # a SIGTERM reaches the ranks as SIGUSR1
    assert len(said) == 2, out[-2000:] + err[-2000:]
    step = int(said[1].split(":")[0])
    assert store.latest(run_dir / "checkpoints").name == store.step_name(step)
    return step


def test_signals_and_a_killed_rank_lose_nothing(
    sample_data: Path, reference: dict[int, float], tmp_path: Path
) -> None:
    """One run of 2 ranks stopped three times: SIGTERM and SIGUSR1 to the launcher (checkpoint at
    the next step, clean exit), then SIGKILL of one rank (every process gone at once, the rank
    named); each time `trainer.resume=auto` goes on, and the losses are the uninterrupted run's."""
    cmd = job(sample_data, tmp_path, "trainer.save_interval=2")
    resume = [*cmd, "trainer.resume=auto"]
    first = stop_with(signal.SIGTERM, cmd, tmp_path, after=3)
    second = stop_with(signal.SIGUSR1, resume, tmp_path, after=first + 3)
    assert 3 <= first < second < STEPS - 6

    proc = start(resume)
    wait_for_step(tmp_path, second + 3, proc)
    ranks = ranks_of(proc)
    assert len(ranks) == DP
    victim = ranks[1]
    victim.kill()
    killed_at = time.monotonic()
    _, err = proc.communicate(timeout=60)
    assert time.monotonic() - killed_at < 20  # every rank gone well within the default timeout
    assert proc.returncode == 1
    assert not any(r.is_running() and r.status() != psutil.STATUS_ZOMBIE for r in ranks)
    last = err.strip().splitlines()[-1]
    assert f"(pid {victim.pid}) was killed by SIGKILL" in last and "trainer.resume=auto" in last

    finished = run(resume)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert train_losses(tmp_path) == reference  # resumed steps re-logged with the same losses


def test_stuck_rank_dumps_stacks_and_the_job_ends(sample_data: Path, tmp_path: Path) -> None:
    """SIGSTOP one rank: its peers' collectives time out (trainer.collective_timeout), each dumps
    its stacks first (trainer.hang_timeout), and the launcher ends everything."""
    timeouts = ["trainer.collective_timeout=5", "trainer.hang_timeout=2"]
    proc = start(job(sample_data, tmp_path, *timeouts, dp=2))
    wait_for_step(tmp_path, 3, proc)
    ranks = ranks_of(proc)
    os.kill(ranks[1].pid, signal.SIGSTOP)
    try:
        _, err = proc.communicate(timeout=90)
    finally:
        for r in ranks:
            if r.is_running():
                r.kill()
    assert proc.returncode == 1
    assert "Timed out" in err.strip().splitlines()[-1]
    dump = (tmp_path / "logs" / "rank_00000.log").read_text()
    assert "Timeout (0:00:02)!" in dump and "all_reduce" in dump


def damage(ckpt: Path, *, keep_size: bool) -> str:
    """Flip a byte of one of `ckpt`'s files (found at load, by its CRC-32), or cut it short (found
    by its size before any process starts); returns the file's name."""
    victim = sorted(p for p in ckpt.iterdir() if p.name.startswith("zero_pp_rank_1"))[0]
    if keep_size:
        flip_bytes(victim)
    else:
        victim.write_bytes(victim.read_bytes()[:-100])
    return victim.name


def test_resume_auto_skips_damaged_checkpoints(
    sample_data: Path, reference_run: Path, reference: dict[int, float], tmp_path: Path
) -> None:
    """The two newest checkpoints damaged (step 20: a flipped byte; step 18: a short file):
    `trainer.resume=auto` names each and resumes from step 16 to the uninterrupted losses; the
    damaged one named explicitly still fails, in one line."""
    run_dir = tmp_path / "run"
    shutil.copytree(reference_run, run_dir)
    ckpts = run_dir / "checkpoints"
    flipped = damage(ckpts / store.step_name(20), keep_size=True)
    cut = damage(ckpts / store.step_name(18), keep_size=False)
    out = run([*job(sample_data, run_dir), "trainer.resume=auto"])
    assert out.returncode == 0, out.stderr[-3000:]
    said = out.stdout + out.stderr
    for step, name in ((18, cut), (20, flipped)):
        assert f"skipping damaged checkpoint {ckpts / store.step_name(step)}: file {name} " in said
    assert f"resumed from {ckpts / store.step_name(16)} at step 16" in said
    assert train_losses(run_dir) == reference

    explicit = run([*job(sample_data, run_dir), f"trainer.resume={ckpts / store.step_name(18)}"])
    assert explicit.returncode == 2
    assert (
        explicit.stderr.strip()
        .splitlines()[-1]
        .startswith(f"error: {ckpts / store.step_name(18)}: file {cut} ")
    )
