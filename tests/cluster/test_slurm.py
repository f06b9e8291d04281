"""`+cluster=slurm` against a real single-node SLURM (slurm/testcluster/start.sh, started here if it
is not up): a 2-task CPU job trains like the local 2-process run; a job signalled mid-run
(`scancel --signal=USR2`, and a real preemption by a higher-priority partition) checkpoints, is
requeued and resumes to the uninterrupted run's losses; failures and bad requests are reported.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from megalite.checkpoint import store
from megalite.cluster import slurm
from megalite.launch import launch, prepare_run
from tests.helpers import ROOT, compose_config, read_metrics, short_job_overrides, train_losses

STEPS = 40  # long enough for a signal to land mid-run
# 2 CPU tasks (gloo), dp=2: the same world as the local reference run.
SLURM = [
    "+cluster=slurm",
    "cluster.gpus_per_node=0",
    "cluster.tasks_per_node=2",
    "cluster.cpus_per_task=1",
    "cluster.time=15",
    "cluster.signal_delay_s=30",
    "cluster.partition=debug",
    "cluster.account=megalite",
    "parallel.dp=2",
]


REQUIRE = "MEGALITE_REQUIRE_SLURM"  # set by .ci/run: a test cluster that cannot start fails
DAEMONS = ("munged", "mariadbd", "slurmdbd", "slurmctld", "slurmd")  # what start.sh runs


def why_no_cluster() -> str | None:
    """Why this machine cannot start the test cluster (start.sh needs root, and apt-get where
    one of its daemons is not installed), or None."""
    if os.geteuid() != 0:
        return "the test SLURM needs root (its daemons run as root); run as root or in CI"
    sbin = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    missing = [d for d in DAEMONS if shutil.which(d, path=sbin) is None]
    if missing and shutil.which("apt-get") is None:
        return (
            f"the test SLURM needs {' '.join(missing)} (Debian's slurm-wlm, munge and MariaDB), "
            "or apt-get for them"
        )
    return None


def skip_unless_cluster_can_start() -> None:
    """Skip the test, naming why, where the test cluster cannot start; fail instead under
    MEGALITE_REQUIRE_SLURM=1 (CI), where a skip would hide that the SLURM tests did not run."""
    why = why_no_cluster()
    if why is None:
        return
    if os.environ.get(REQUIRE) == "1":
        pytest.fail(f"{REQUIRE}=1 but {why}")
    pytest.skip(why)


@pytest.fixture(scope="module")
def cluster() -> Iterator[dict[str, str]]:
    """The test cluster's client environment; started here (and stopped after) unless it is up.
    Skipped, saying why, where it cannot start (unless MEGALITE_REQUIRE_SLURM=1, as in CI)."""
    skip_unless_cluster_can_start()
    scripts = ROOT / "slurm/testcluster"
    out = subprocess.run(["bash", str(scripts / "start.sh")], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    conf = re.search(r"SLURM_CONF=(\S+)", out.stdout)
    assert conf, out.stdout
    saved = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = conf.group(1)  # for submitit, in this process
    yield {**os.environ}
    if "already up" not in out.stderr:
        subprocess.run(["bash", str(scripts / "stop.sh")], capture_output=True, check=True)
    if saved is None:
        del os.environ["SLURM_CONF"]
    else:
        os.environ["SLURM_CONF"] = saved


@pytest.fixture(scope="module")
def reference(sample_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[int, float]:
    """The local 2-process run's losses."""
    run_dir = tmp_path_factory.mktemp("local")
    cfg = compose_config(short_job_overrides(sample_data, run_dir, "parallel.dp=2", steps=STEPS))
    launch(cfg, default_run_dir=run_dir)
    return train_losses(run_dir)


def pretrain(env: dict[str, str], *overrides: str, cwd: Path = ROOT, timeout: float = 300):
    """`python launch/pretrain.py <overrides>`, as a user types it."""
    cmd = [sys.executable, str(ROOT / "launch/pretrain.py"), *overrides]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def assert_same_losses(got: dict[int, float], want: dict[int, float]) -> None:
    assert sorted(got) == list(range(1, STEPS + 1))
    steps = sorted(got)
    torch.testing.assert_close(
        torch.tensor([got[s] for s in steps], dtype=torch.float64),
        torch.tensor([want[s] for s in steps], dtype=torch.float64),
        rtol=1e-6,
        atol=0,
    )


def test_slurm_job_matches_local_run(
    cluster: dict[str, str], reference: dict[int, float], sample_data: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    job = short_job_overrides(sample_data, run_dir, *SLURM, "cluster.wait=true", steps=STEPS)
    out = pretrain(cluster, *job)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert re.search(r"submitted SLURM job \d+: 1 node\(s\) x 2 task\(s\)", out.stdout)
    assert f"step {STEPS}/{STEPS}" in out.stdout  # rank 0's log, streamed
    assert_same_losses(train_losses(run_dir), reference)
    assert sorted(p.name for p in (run_dir / "slurm").glob("*_log.out"))[:2] == sorted(
        p.name for p in (run_dir / "slurm").glob("*_[01]_log.out")
    )


def _submit(sample_data: Path, run_dir: Path, *extra: str):
    cfg = compose_config(short_job_overrides(sample_data, run_dir, *SLURM, *extra, steps=STEPS))
    resume = prepare_run(cfg, run_dir=run_dir, world_size=None)
    return slurm.submit(cfg, run_dir=run_dir, resume=resume)


def _poll(ready, what: str, *, timeout: float, every: float = 1.0):
    """ready()'s first truthy value, tried every `every` s; fails after `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := ready():
            return value
        time.sleep(every)
    raise AssertionError(f"{what}: not within {timeout} s")


def _wait_for_step(run_dir: Path, step: int, timeout: float = 120) -> None:
    def reached() -> bool:
        metrics = run_dir / "metrics.jsonl"
        return metrics.is_file() and max(train_losses(run_dir), default=0) >= step

    _poll(reached, f"step {step}", timeout=timeout, every=0.2)


def _assert_resumed(run_dir: Path, job, reference: dict[int, float]) -> None:
    slurm.results(_finished(job))
    log = (run_dir / "logs" / "rank_00000.log").read_text()
    stop = re.search(r"SIGUSR2 at step (\d+): checkpointing", log)
    assert stop, log[-3000:]
    assert f"at step {stop.group(1)} (" in log.split("SIGUSR2 at step")[1]  # "resumed from … at"
    assert_same_losses(train_losses(run_dir), reference)  # the last record of a step wins
    steps = [r["step"] for r in read_metrics(run_dir) if "loss" in r]
    assert len(steps) == len(set(steps)), "a step was trained twice"


def _finished(job, timeout: float = 240):
    _poll(job.done, f"job {job.job_id} finished", timeout=timeout)
    return job


def _resumed_at(run_dir: Path) -> list[int]:
    log = run_dir / "logs" / "rank_00000.log"
    text = log.read_text() if log.is_file() else ""
    return [int(s) for s in re.findall(r"resumed from \S+ at step (\d+)", text)]


def _pids(run_dir: Path, rank: int) -> list[int]:
    """The pid each run of the job gave rank `rank` (worker.py logs it)."""
    log = run_dir / "logs" / f"rank_{rank:05d}.log"
    return [int(p) for p in re.findall(r"\| pid (\d+) \|", log.read_text())]


def test_signal_then_a_killed_rank_requeue_and_resume(
    cluster: dict[str, str], reference: dict[int, float], sample_data: Path, tmp_path: Path
) -> None:
    """SIGUSR2 (SLURM's time-limit warning): checkpoint, requeue, resume. Then, in the requeued
    run, rank 1 is killed (kill -9): rank 0's next collective fails, it requeues the job, and the
    third run resumes from the last committed checkpoint. The losses are the local run's."""
    run_dir = tmp_path / "run"
    job = _submit(sample_data, run_dir, "trainer.save_interval=5")
    _wait_for_step(run_dir, 3)
    subprocess.run(["scancel", "--signal=USR2", job.job_id], env=cluster, check=True)
    resumed = _poll(lambda: _resumed_at(run_dir), "the requeued run resumed", timeout=120)[0]
    _wait_for_step(run_dir, resumed + 7)  # past a checkpoint of the requeued run's own
    os.kill(_pids(run_dir, 1)[-1], signal.SIGKILL)
    slurm.results(_finished(job))
    log = (run_dir / "logs" / "rank_00000.log").read_text()
    assert re.search(rf"SIGUSR2 at step {resumed}: checkpointing", log), log[-3000:]
    assert len(_resumed_at(run_dir)) == 2, log[-3000:]
    assert len(_pids(run_dir, 1)) == 3
    said = "".join(p.read_text() for p in (run_dir / "slurm").glob("*_0_log.err"))
    assert "another rank died or hung: requeueing the job" in said, said[-3000:]
    assert_same_losses(train_losses(run_dir), reference)  # the last record of a step wins


def test_preemption_by_a_higher_priority_partition(
    cluster: dict[str, str], reference: dict[int, float], sample_data: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    job = _submit(sample_data, run_dir)
    _wait_for_step(run_dir, 3)
    cpus = subprocess.run(
        ["sinfo", "-h", "-o", "%c", "-p", "high"], env=cluster, capture_output=True, text=True
    ).stdout.split()[0]
    urgent = subprocess.run(
        ["sbatch", "--parsable", "-p", "high", "-A", "megalite", f"--ntasks={cpus}",
         f"--output={tmp_path}/urgent.out", "--wrap", "sleep 3"],
        env=cluster, capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert urgent.stdout.strip()
    _assert_resumed(run_dir, job, reference)


def test_failing_job_shows_the_rank_error(
    cluster: dict[str, str], sample_data: Path, tmp_path: Path
) -> None:
    job = short_job_overrides(
        sample_data, tmp_path / "run", *SLURM, "cluster.wait=true", "trainer.device=cuda", steps=2
    )
    out = pretrain(cluster, *job)
    assert out.returncode == 1, out.stdout[-2000:] + out.stderr[-2000:]
    assert "rank 0 failed" in out.stderr or "rank 1 failed" in out.stderr, out.stderr[-2000:]
    assert "no CUDA device is visible" in out.stderr


def test_bad_requests(cluster: dict[str, str], sample_data: Path, tmp_path: Path) -> None:
    def refused(*extra: str, env: dict[str, str] = cluster) -> str:
        job = short_job_overrides(sample_data, tmp_path / "run", *SLURM, *extra, steps=2)
        out = pretrain(env, *job)
        assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
        assert "submitted" not in out.stdout
        return out.stderr

    assert "invalid partition" in refused("cluster.partition=nosuch").lower()
    assert "invalid account" in refused("cluster.account=nosuch").lower()
    err = refused("cluster.tasks_per_node=3")  # 3 ranks for a dp=2 layout: before submitting
    assert "3 ranks but tp x pp x dp = 1 x 1 x 2 = 2: set parallel.dp=3" in err
    no_slurm = {**cluster, "PATH": os.path.dirname(sys.executable) + ":/nonexistent"}
    assert "has no sbatch" in refused(env=no_slurm)


def test_sweep_submits_one_job_per_setting(
    cluster: dict[str, str], sample_data: Path, tmp_path: Path
) -> None:
    job = short_job_overrides(sample_data, None, *SLURM, "cluster.wait=true", steps=2)
    out = pretrain(cluster, "-m", *job, "optim.lr=1e-3,3e-4", f"hydra.sweep.dir={tmp_path}")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert len(re.findall(r"submitted SLURM job \d+", out.stdout)) == 2
    for sub, lr in (("0", 1e-3), ("1", 3e-4)):  # each its own run folder, trained
        assert OmegaConf.load(tmp_path / sub / "config.yaml").optim.lr == lr
        assert sorted(train_losses(tmp_path / sub)) == [1, 2]


def test_sbatch_template(cluster: dict[str, str], sample_data: Path, tmp_path: Path) -> None:
    """slurm/pretrain.sbatch, submitted by hand: srun starts 2 ranks that find each other from
    SLURM's variables alone; dp comes from the task count."""
    cmd = [
        "sbatch", "--parsable", "-p", "debug", "-A", "megalite", "--nodes=1",
        "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1", "--time=10",
        f"--output={tmp_path}/%j.out", "slurm/pretrain.sbatch",
        *short_job_overrides(sample_data, None, steps=2),
    ]  # fmt: skip
    env = {**cluster, "RUN_DIR": str(tmp_path / "run")}
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    state = _final_state(out.stdout.strip(), cluster)  # (sbatch --wait polls up to 32 s apart)
    logs = "".join(p.read_text() for p in tmp_path.glob("*.out"))
    assert state == "COMPLETED", state + logs[-3000:]
    assert sorted(train_losses(tmp_path / "run")) == [1, 2]
    ckpt = store.latest(tmp_path / "run" / "checkpoints")
    assert store.read_meta(ckpt)["layout"] == {"tp": 1, "pp": 1, "dp": 2}


def _final_state(job_id: str, env: dict[str, str], timeout: float = 300) -> str:
    """Poll sacct until the job has ended; its state."""

    def ended() -> str | None:
        out = subprocess.run(
            ["sacct", "-j", job_id, "-X", "-n", "-o", "State"], env=env, capture_output=True,
            text=True,
        )  # fmt: skip
        state = (out.stdout.split() or ["PENDING"])[0]
        return None if state in ("PENDING", "RUNNING", "REQUEUED", "COMPLETING") else state

    return _poll(ended, f"job {job_id} ended", timeout=timeout)


def test_requeue_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    """A signal-stopped run in a SLURM task is requeued (no result: the task exits REQUEUED)
    until cluster.max_requeues, then it is an error naming how to go on."""
    cfg = compose_config(["+cluster=slurm", "cluster.max_requeues=2"])
    stopped = {"stopped_by": "SIGUSR2", "step": 7}
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    monkeypatch.setenv("RANK", "1")  # not rank 0: leaves the requeue to rank 0
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    with pytest.raises(SystemExit) as e:
        slurm.after_run(stopped, cfg, "/runs/x")
    assert e.value.code == slurm.REQUEUED
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    with pytest.raises(RuntimeError, match="SIGUSR2 at step 7 after 2 requeue.*max_requeues=2"):
        slurm.after_run(stopped, cfg, "/runs/x")
    assert slurm.after_run({"val_loss": 1.0}, cfg, "/runs/x") == {"val_loss": 1.0}
    dead = RuntimeError("[gloo/transport/tcp/pair.cc:553] Connection closed by peer [10.0.0.2]")
    assert slurm.peer_failed(dead)  # requeued: the dead rank was another's
    assert not slurm.peer_failed(RuntimeError("no CUDA device is visible"))  # this rank's own


def test_without_root_or_apt_the_slurm_tests_say_why(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a machine that cannot start the test cluster the tests above are skipped with the
    reason (shown by `pytest -rs`), and under MEGALITE_REQUIRE_SLURM=1 (CI) they fail with it."""
    monkeypatch.delenv(REQUIRE, raising=False)
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    root = "the test SLURM needs root (its daemons run as root); run as root or in CI"
    assert why_no_cluster() == root
    with pytest.raises(pytest.skip.Exception, match=re.escape(root)):
        skip_unless_cluster_can_start()
    monkeypatch.setenv(REQUIRE, "1")
    with pytest.raises(pytest.fail.Exception, match=re.escape(f"{REQUIRE}=1 but {root}")):
        skip_unless_cluster_can_start()
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(
        shutil, "which", lambda name, path=None: None if name in ("slurmd", "apt-get") else name
    )
    assert why_no_cluster() == (
        "the test SLURM needs slurmd (Debian's slurm-wlm, munge and MariaDB), or apt-get for them"
    )
    monkeypatch.setattr(shutil, "which", lambda name, path=None: None if name == "slurmd" else name)
    assert why_no_cluster() is None  # start.sh installs it
