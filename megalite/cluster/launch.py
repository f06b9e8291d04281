"""Start the workers of a prepared run where the config and the environment say: submitted to
SLURM (`cluster.launcher=slurm`), in this process when an outside launcher (srun, torchrun)
started it, else in tp*pp*dp local children."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from megalite.checkpoint import store
from megalite.cluster.local import RankExited, spawn
from megalite.config import Config
from megalite.rank.env import DistEnv
from megalite.train.worker import run_worker


def run_workers(
    cfg: Config, *, run_dir: Path, resume: list[Path], env: DistEnv | None
) -> dict[str, Any] | None:
    """Run the job on its workers; returns rank 0's result when this process has it (a SLURM job
    followed with `cluster.wait`, or this process is a rank)."""
    if cfg.cluster.launcher == "slurm" and env is None:  # submit; the tasks run SlurmTask
        from megalite.cluster import slurm

        return slurm.run_job(cfg, run_dir=run_dir, resume=resume)
    resume_from = [str(c) for c in resume]
    if env is not None:  # under srun (slurm/pretrain.sbatch) a signal-stopped run is requeued
        from megalite.cluster.slurm import after_run

        return after_run(run_worker(cfg, str(run_dir), resume_from), cfg, str(run_dir))
    try:
        spawn(run_worker, nprocs=cfg.world_size, args=(cfg, str(run_dir), resume_from))
    except RankExited as e:
        if e.reported or store.latest(run_dir / "checkpoints") is None:
            raise
        hint = "; resume from the last checkpoint with trainer.resume=auto"
        raise RankExited(f"{e}{hint}", reported=False) from None
    return None
