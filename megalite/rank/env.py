"""Where this process sits in the job, read from the environment, and torch.distributed set-up.

Three ways a megalite process is started, all ending in the same `DistEnv`:
- by megalite's own local launcher (`cluster/local.py`), which sets the torchrun variables;
- by `torchrun` (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT);
- by `srun` (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, ...): the master address is the first node
  of the job and the port is derived from the job id, so no hostfile is needed.
"""

from __future__ import annotations

import datetime
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d


@dataclass(frozen=True)
class DistEnv:
    global_rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int


def slurm_master_port(job_id: int) -> int:
    """A port in [15000, 35000) that every task of one job agrees on."""
    return 15000 + job_id % 20000


def _first_slurm_host(nodelist: str) -> str:
    out = subprocess.run(
        ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True
    )
    return out.stdout.split()[0]


def from_environ(environ: dict[str, str] | None = None) -> DistEnv | None:
    """The DistEnv an outside launcher gave this process, or None when started by hand."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(
            global_rank=int(env["RANK"]),
            world_size=int(env["WORLD_SIZE"]),
            local_rank=int(env.get("LOCAL_RANK", 0)),
            local_world_size=int(env.get("LOCAL_WORLD_SIZE", env["WORLD_SIZE"])),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", 29500)),
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and "SLURM_JOB_ID" in env:
        addr = env.get("MASTER_ADDR") or _first_slurm_host(env["SLURM_JOB_NODELIST"])
        port = int(env.get("MASTER_PORT") or slurm_master_port(int(env["SLURM_JOB_ID"])))
        return DistEnv(
            global_rank=int(env["SLURM_PROCID"]),
            world_size=int(env["SLURM_NTASKS"]),
            local_rank=int(env.get("SLURM_LOCALID", 0)),
            local_world_size=int(
                (env.get("SLURM_NTASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE", "1"))
                .split("(")[0]
                .split(",")[0]
            ),
            master_addr=addr,
            master_port=port,
        )
    return None


def pick_device(requested: str, *, local_rank: int) -> torch.device:
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("trainer.device=cuda but no CUDA device is visible")
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def name_deepspeed_accelerator() -> None:
    """Name DeepSpeed's accelerator (cuda where a GPU is visible, else cpu) unless the
    environment does, before DeepSpeed is first imported: its own detection logs "Setting
    accelerator to CPU" to stdout, into a tool's output."""
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")


def backend_of(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def init_distributed(env: DistEnv, *, device: torch.device, timeout_s: float = 600.0) -> None:
    """Join the process group (`init_process_group`), then DeepSpeed's comm layer over it."""
    init_process_group(env, device=device, timeout_s=timeout_s)
    join_deepspeed(backend_of(device))


def init_process_group(env: DistEnv, *, device: torch.device, timeout_s: float = 600.0) -> None:
    """Join the process group: NCCL on GPUs, gloo on CPU.

    Also exports the torchrun variables, which DeepSpeed reads (LOCAL_RANK above all) however the
    process was started.
    """
    os.environ.update(
        RANK=str(env.global_rank),
        WORLD_SIZE=str(env.world_size),
        LOCAL_RANK=str(env.local_rank),
        LOCAL_WORLD_SIZE=str(env.local_world_size),
        MASTER_ADDR=env.master_addr,
        MASTER_PORT=str(env.master_port),
    )
    if device.type == "cpu":
        # Share the cores between the local ranks instead of oversubscribing them.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // env.local_world_size))
    # Groups made later with dist.new_group(...) and no timeout (DeepSpeed's among them) take
    # torch's module default (30 min), not the world's: make that default ours too, so no
    # collective of any group waits longer than `timeout_s` on a dead peer.
    timeout = datetime.timedelta(seconds=timeout_s)
    distributed_c10d.default_pg_timeout = timeout
    if hasattr(distributed_c10d, "default_pg_nccl_timeout"):
        distributed_c10d.default_pg_nccl_timeout = timeout
    dist.init_process_group(
        backend=backend_of(device),
        init_method=f"tcp://{env.master_addr}:{env.master_port}",
        rank=env.global_rank,
        world_size=env.world_size,
        timeout=timeout,
    )


def join_deepspeed(backend: str) -> None:
    """DeepSpeed's own comm layer wraps the group just made (its pipeline module needs it before
    the engine exists), without building its shared-memory op (`without_shm_comm_op`)."""
    import deepspeed

    without_shm_comm_op()
    deepspeed.init_distributed(dist_backend=backend, dist_init_required=False)


def without_shm_comm_op() -> None:
    """Tell DeepSpeed its CPU shared-memory comm op cannot be built, so its comm layer never
    JIT-compiles it.

    The op serves only `inference_all_reduce`, which megalite never calls, and compiling it on a
    run's path costs ~40 s per environment, is redone whenever another `ninja` is found, and
    leaves a lock that blocks every later start forever if interrupted. DeepSpeed consults its
    cached table of compatible ops (one dict, kept in `deepspeed.ops`, so the edit holds) before
    building it."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def extension_locks() -> str:
    """What DeepSpeed's set-up may wait for: the lock files of torch's extension builds (an
    interrupted build leaves its lock, and every later build of that op waits on it forever)."""
    from torch.utils.cpp_extension import get_default_build_root

    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())
    locks = sorted(root.glob("*/lock")) + sorted(root.glob("*/*/lock"))
    if not locks:
        return f"DeepSpeed's set-up (no build lock under {root})"
    return (
        f"DeepSpeed's set-up; build lock(s) {', '.join(map(str, locks))}: left by an interrupted "
        "build, each is safe to delete when no build is running"
    )


def release_distributed() -> None:
    """Leave the process group and free every group's threads while the interpreter is alive.

    destroy_process_group forgets the groups, but DeepSpeed's module globals keep the objects,
    whose gloo threads then die in the interpreter's teardown — which aborts the process now and
    then ("terminate called without an active exception", measured ~1 run in 25 here).
    """
    import gc

    if dist.is_initialized():
        dist.destroy_process_group()
    try:
        from deepspeed import comm as ds_comm
        from deepspeed.utils import groups as ds_groups
    except ImportError:
        return
    for name, value in list(vars(ds_groups).items()):
        if name.startswith("_") and name.endswith("GROUP") and value is not None:
            setattr(ds_groups, name, {} if isinstance(value, dict) else None)
    ds_groups.mpu = None
    ds_comm.comm.cdb = None
    gc.collect()
