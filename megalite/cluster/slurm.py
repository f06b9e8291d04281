"""SLURM through submitit: submit a run (`+cluster=slurm`), and what each task does on the nodes.

Submission (`submit`): the launcher has validated the config, prepared the data and written the
run folder; submitit writes an sbatch script (one task per GPU, or `tasks_per_node` on a CPU
cluster, `--requeue`, SIGUSR2 `signal_delay_s` before the time limit) and pickles a `SlurmTask`.

On the nodes (`SlurmTask.__call__`, once per task): torch.distributed is set up from submitit's
JobEnvironment — rank and local rank from the task ids, the master address from the job's first
node, a port derived from the job id — and the task trains as one rank. When SLURM warns of the
time limit or a preemption (SIGUSR2, or SIGTERM), every rank checkpoints at the next step
boundary (rank/signals.py) and rank 0 requeues the job; the requeued job (SLURM_RESTART_COUNT
> 0) resumes from the run's latest checkpoint, up to `cluster.max_requeues` times. A rank that
dies (kill -9, a lost node, a crash) breaks the others' next collective: a rank that sees its
collective fail that way (`peer_failed`) requeues the job the same way, so it resumes from the
last committed checkpoint.

Attached (`cluster.wait=true`, `follow`): rank 0's log is streamed until the job ends; a failed
job raises `JobFailed` with the traceback of the rank that failed first (the others usually fail
after it, on the broken collective).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from megalite.checkpoint import store
from megalite.config import Config, ConfigError, slurm_minutes
from megalite.rank.env import slurm_master_port

ROOT = Path(__file__).resolve().parents[2]
REQUEUED = 3  # exit status of a task whose job was requeued: no result, the next run gives it
# How gloo and NCCL word a collective that failed because another rank died or stopped answering.
PEER_FAILURES = (
    "Connection closed by peer",
    "Connection reset by peer",
    "Broken pipe",
    "Timed out",
    "timed out",
)


class JobFailed(RuntimeError):
    """A submitted job ended without a result; the message is the failing rank's error."""


@dataclass
class SlurmTask:
    """The callable submitit runs in every task of the job (pickled with the config)."""

    cfg: Config
    run_dir: str
    resume: tuple[str, ...]  # checkpoints to resume from, newest first (launch.resolve_resume)

    def __call__(self) -> dict[str, Any]:
        import submitit

        from megalite.train.worker import run_worker

        job = submitit.JobEnvironment()
        base_id, _, array_index = str(job.job_id).partition("_")
        os.environ.update(
            RANK=str(job.global_rank),
            WORLD_SIZE=str(job.num_tasks),
            LOCAL_RANK=str(job.local_rank),
            LOCAL_WORLD_SIZE=str(job.num_tasks // job.num_nodes),
            MASTER_ADDR=job.hostnames[0],
            MASTER_PORT=str(slurm_master_port(int(base_id) + int(array_index or 0))),
        )
        restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
        resume = self.resume
        if restarts:  # requeued: continue from this run's own newest whole checkpoint
            own = store.resume_candidates(Path(self.run_dir) / "checkpoints")
            resume = tuple(map(str, own)) or resume
        try:
            result = run_worker(self.cfg, self.run_dir, resume)
        except Exception as exc:
            if not peer_failed(exc):
                raise
            why = f"a collective failed ({_first_line(exc)}): another rank died or hung"
            requeue_or_fail(why, self.cfg, self.run_dir, by_rank_0=False)
        return after_run(result, self.cfg, self.run_dir)


def peer_failed(exc: BaseException) -> bool:
    """Whether `exc` is a collective that failed because another rank died or stopped answering
    (not an error of this rank's own, which a requeue would only repeat)."""
    import torch.distributed as dist

    if isinstance(exc, dist.DistError):  # NCCL errors and timeouts, store failures
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc) for m in PEER_FAILURES)


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]


def after_run(result: dict[str, Any], cfg: Config, run_dir: str) -> dict[str, Any]:
    """In a SLURM task: a run a signal stopped (checkpoint saved) is requeued by rank 0 and every
    task exits without a result, `REQUEUED`; past `cluster.max_requeues` it is an error."""
    if "stopped_by" not in result or "SLURM_JOB_ID" not in os.environ:
        return result
    why = f"{result['stopped_by']} at step {result['step']}"
    requeue_or_fail(why, cfg, run_dir, by_rank_0=True)


def requeue_or_fail(why: str, cfg: Config, run_dir: str, *, by_rank_0: bool) -> NoReturn:
    """Requeue the job (by rank 0 only, or by whichever rank calls: after a rank died, rank 0 may
    be the dead one) and exit `REQUEUED`; after `cluster.max_requeues` requeues, raise."""
    restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
    limit = cfg.cluster.max_requeues
    if restarts >= limit:
        raise RuntimeError(
            f"{why} after {restarts} requeue(s), the limit (cluster.max_requeues={limit}): "
            f"resubmit with trainer.resume=auto trainer.run_dir={run_dir}"
        )
    print(f"{why}: requeueing the job", file=sys.stderr, flush=True)
    if not by_rank_0 or os.environ.get("RANK", os.environ.get("SLURM_PROCID")) == "0":
        job_id = os.environ["SLURM_JOB_ID"]
        array_index = os.environ.get("SLURM_ARRAY_TASK_ID")
        requeue(
            f"{os.environ['SLURM_ARRAY_JOB_ID']}_{array_index}" if array_index else job_id,
            restarts=restarts,
        )
    raise SystemExit(REQUEUED)


def requeue(job_id: str, *, restarts: int) -> None:
    """Put the job back in the queue, unless it was already (by a preemption, or by another
    rank: a requeue of the job's next run would throw that run away): only while the job is the
    same run, `restarts` times restarted, still running."""
    show = ["scontrol", "-o", "show", "job", job_id]
    shown = subprocess.run(show, capture_output=True, text=True)
    state = re.search(r"JobState=(\w+)", shown.stdout)
    count = re.search(r"Restarts=(\d+)", shown.stdout)
    if state and count and (state[1] != "RUNNING" or int(count[1]) != restarts):
        print(f"job {job_id} is {state[1]} (restarts {count[1]}): already requeued",
              file=sys.stderr, flush=True)  # fmt: skip
        return
    out = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True)
    print(f"requeue of job {job_id}: {out.stderr.strip() or 'done'}", file=sys.stderr, flush=True)


def executor_parameters(cfg: Config) -> dict[str, Any]:
    """submitit's SlurmExecutor parameters for `cfg.cluster` (sbatch options)."""
    c = cfg.cluster
    params: dict[str, Any] = {
        "job_name": c.job_name,
        "nodes": c.nodes,
        "ntasks_per_node": c.ntasks_per_node(cfg.world_size),
        "cpus_per_task": c.cpus_per_task,
        "time": slurm_minutes(c.time),
        "signal_delay_s": c.signal_delay_s,
        # The nodes import megalite from this checkout (or wherever it is installed).
        "setup": [f"export PYTHONPATH={ROOT}${{PYTHONPATH:+:$PYTHONPATH}}", *c.setup],
        "additional_parameters": {"requeue": True, **c.sbatch_extra},
    }
    if c.gpus_per_node:
        params["gpus_per_node"] = c.gpus_per_node
    for key in ("partition", "account", "qos", "constraint", "mem"):
        if getattr(c, key) is not None:
            params[key] = getattr(c, key)
    if c.exclusive:
        params["exclusive"] = True
    return params


def submit(cfg: Config, *, run_dir: Path, resume: list[Path]) -> Any:
    """Submit the run; returns the submitit Job. SLURM's refusal is a ConfigError with its text."""
    if shutil.which("sbatch") is None:
        raise ConfigError(
            "cluster.launcher=slurm but this machine has no sbatch: submit from a SLURM login "
            "node, or drop +cluster=slurm to run here"
        )
    import submitit
    from submitit.core.utils import FailedJobError

    folder = Path(cfg.cluster.folder or run_dir / "slurm").expanduser().resolve()
    executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=0)
    executor.update_parameters(**executor_parameters(cfg))
    try:
        return executor.submit(SlurmTask(cfg, str(run_dir), tuple(map(str, resume))))
    except FailedJobError as e:  # sbatch refused: show SLURM's own message
        raise ConfigError(f"sbatch refused the job: {str(e).strip()}") from e


def tasks(job: Any) -> list[Any]:
    """submitit's per-task Jobs, task 0 first."""
    return [job.task(i) for i in range(job.num_tasks)]


def follow(job: Any, *, out=sys.stdout, poll_s: float = 2.0) -> list[Any]:
    """Stream task 0's log until the job ends; returns each task's result, or raises JobFailed."""
    log = job.task(0).paths.stdout
    position = 0
    while True:
        done = job.done()
        if log.is_file():
            with open(log, "rb") as f:
                f.seek(position)
                chunk = f.read()
            position += len(chunk)
            out.write(chunk.decode(errors="replace"))
            out.flush()
        if done:
            break
        time.sleep(poll_s)
    return results(job)


def results(job: Any) -> list[Any]:
    """Each task's result; if any failed, JobFailed with the error of the task that failed first
    (its result file is the oldest error)."""
    errors = []
    for rank, task in enumerate(tasks(job)):
        try:
            outcome, value = task._get_outcome_and_result()
        except Exception as e:  # no result at all: killed, or never started
            errors.append((float("inf"), rank, str(e)))
            continue
        if outcome == "error":
            errors.append((task.paths.result_pickle.stat().st_mtime, rank, value))
    if errors:
        _, rank, text = min(errors)
        raise JobFailed(f"job {job.job_id}: rank {rank} failed:\n{text.rstrip()}")
    return [task.result() for task in tasks(job)]


def run_job(cfg: Config, *, run_dir: Path, resume: list[Path]) -> dict[str, Any] | None:
    """Submit, say where everything is, and with `cluster.wait` follow the job to its end
    (returns rank 0's result)."""
    job = submit(cfg, run_dir=run_dir, resume=resume)
    c = cfg.cluster
    log = job.task(0).paths.stdout
    print(
        f"submitted SLURM job {job.job_id}: {c.nodes} node(s) x {c.ntasks_per_node(cfg.world_size)}"
        f" task(s)\n  run dir   {run_dir}\n  rank 0    {log}\n"
        f"  all ranks {log.parent}/{job.job_id}_*_log.{{out,err}}",
        flush=True,
    )
    if not c.wait:
        print(f"  follow    tail -f {log}    (or cluster.wait=true)", flush=True)
        return None
    return follow(job)[0]
