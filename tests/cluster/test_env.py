"""Where a process sits in the job, as torchrun or srun describe it."""

from __future__ import annotations

from megalite.rank.env import DistEnv, from_environ, slurm_master_port


def test_torchrun_variables() -> None:
    env = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
           "MASTER_ADDR": "node0", "MASTER_PORT": "29999"}  # fmt: skip
    assert from_environ(env) == DistEnv(3, 8, 1, 2, "node0", 29999)


def test_srun_variables() -> None:
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "5", "SLURM_JOB_ID": "4242",
           "SLURM_TASKS_PER_NODE": "8(x2)", "MASTER_ADDR": "gpu-001"}  # fmt: skip
    got = from_environ(env)
    assert got == DistEnv(5, 16, 5, 8, "gpu-001", slurm_master_port(4242))
    assert 15000 <= got.master_port < 35000


def test_started_by_hand() -> None:
    assert from_environ({"PATH": "/usr/bin"}) is None
