"""Typed configuration: dataclass schemas registered in Hydra's ConfigStore, and their validation.

Every config group under `conf/` is backed by one dataclass here, so a misspelt key or a value of
the wrong type fails when Hydra composes the config, not mid-run. `validate()` checks what a schema
cannot (divisibility, ranges, paths) and raises `ConfigError` whose message is one line naming the
fix; the launcher calls it before any process starts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from omegaconf import MISSING, OmegaConf

CP_IMPLS = ("ring", "ulysses")  # parallel.cp_impl (parallel/context.py)


class ConfigError(ValueError):
    """A configuration that cannot run; the message is one line that names the fix."""


@dataclass
class ModelConfig:
    """Shape of a Llama-style decoder. Presets live in `conf/model/<name>.yaml`."""

    name: str = MISSING
    dim: int = MISSING
    n_layers: int = MISSING
    n_heads: int = MISSING
    n_kv_heads: int = MISSING
    ffn_dim: int = MISSING  # hidden size of the SwiGLU MLP
    vocab_size: int = MISSING
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_embeddings: bool = False
    init_std: float = 0.02
    max_seq_len: int = 4096

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


@dataclass
class SourceConfig:
    """One source of `data=mixture`: a prepared folder or shard pattern, its sampling weight and
    the name its metrics are logged under (default: the folder's name)."""

    path: str = MISSING
    weight: float = 1.0
    name: str = ""


@dataclass
class DataConfig:
    """Where tokens come from: a prepared folder or shard pattern (`path`; see
    megalite/data/shards.py), a weighted mixture of them (`sources`), or for `name=shakespeare`
    with neither, the bundled sample, prepared on first use into `cache_dir`."""

    name: str = "shakespeare"
    path: str | None = None
    sources: list[SourceConfig] = field(default_factory=list)
    cache_dir: str = "~/.cache/megalite/data"
    vocab_size: int = 4096  # for preparing the bundled sample only
    shuffle: bool = True
    workers: int = 0  # loader processes reading ahead of the trainer (0: read in the trainer)
    prefetch: int = 2  # micro-batches each worker reads ahead
    read_attempts: int = 4  # a shard read that fails is retried, then reported by name
    retry_delay_s: float = 1.0  # first wait between attempts; doubled after each
    # Tokens attend only within their own document of a packed window (documents end at the
    # data's end-of-document token), with positions counted from each document's start.
    document_mask: bool = False


@dataclass
class ParallelConfig:
    tp: int = 1
    pp: int = 1
    dp: int = 1
    # Context parallelism: each sequence split over cp ranks (parallel/context.py), attention by
    # ring (balanced split) or ulysses (all-to-all over heads, contiguous split). Ranks: tp
    # innermost, then cp, dp, pp (parallel/dims.py); gradients and ZeRO over dp x cp.
    cp: int = 1
    cp_impl: str = "ring"  # ring | ulysses
    zero_stage: int = 1
    sequence_parallel: bool = False
    pipeline_partition: str = "uniform"  # uniform (layer count) | parameters (parameter count)
    activation_checkpointing: str = "none"  # none | full | selective (attention core only)

    @property
    def effective_zero_stage(self) -> int:
        return effective_zero_stage(self.zero_stage, dp=self.dp * self.cp, pp=self.pp)


def effective_zero_stage(zero_stage: int, *, dp: int, pp: int) -> int:
    """The ZeRO stage that runs. ZeRO partitions over the data-parallel group (dp x cp ranks
    with context parallelism: pass their product as `dp`); with dp=1 there is
    nothing to partition and stages 1-3 would only add copies (about 9% of a CPU step, measured
    by tools/bench/throughput_cpu.py), so dp=1 runs stage 0 (except under a pipeline, where
    DeepSpeed reports the gradient norm only through its ZeRO optimizer)."""
    return zero_stage if dp > 1 or pp > 1 else 0


@dataclass
class OptimConfig:
    lr: float = 3e-4
    min_lr: float = 3e-5
    warmup_steps: int = 100
    decay: str = "cosine"  # cosine | linear | constant (after warmup)
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping


@dataclass
class TrainerConfig:
    max_steps: int = 1000
    seq_len: int = 256
    micro_batch_size: int = 8
    global_batch_size: int = 8
    log_interval: int = 10
    eval_interval: int = 100
    eval_steps: int = 10  # micro-batches per rank per evaluation
    save_interval: int = 500  # a checkpoint every N steps; 0: none along the way
    # The checkpoint at the end (max_steps, or stop_at_step). A run with save_interval=0 and
    # save_final=false writes no checkpoint at all, a stop request's (SIGUSR1/2, SIGTERM) too.
    save_final: bool = True
    resume: str | None = None  # None | auto | path to a checkpoint folder
    # Start a new run (step 0, fresh optimizer, schedule and data position) from the weights
    # of a checkpoint of any kind or a Hugging Face Llama folder (see checkpoint/init_from.py).
    init_from: str | None = None
    # Stop (after a checkpoint) once this step is reached, the schedule still following
    # max_steps: to split a run over several jobs (Megatron's --exit-interval).
    stop_at_step: int | None = None
    run_dir: str | None = None  # None: Hydra's output folder
    precision: str = "fp32"  # fp32 | bf16
    seed: int = 1234
    device: str = "auto"  # auto | cpu | cuda
    compile: bool = False  # torch.compile each transformer block
    peak_flops: float | None = None  # per device; None: known GPU table, or cpu_peak_flops on CPU
    cpu_peak_flops: float = 1.0e11
    keep_checkpoints: int = 0  # keep the newest N committed checkpoints (0: keep all)
    # Copy the state to host memory at a save and write it in a background thread while training
    # goes on (the next save, a rollback and the exit wait for it).
    async_save: bool = False
    # A collective that waits longer than this (a dead or stuck peer) fails the rank, so no rank
    # hangs; seconds.
    collective_timeout: float = 600.0
    # With no step completed for this long, every rank dumps its Python stacks (faulthandler)
    # into its log; seconds, 0 disables.
    hang_timeout: float = 1800.0
    # Each phase of a rank's start (rendezvous, DeepSpeed's set-up, model build, engine,
    # checkpoint verify and load, data open) must end within this many seconds; past it every rank
    # names the phase and what it waits for, and the job stops. 0 disables.
    startup_timeout: float = 1200.0
    # A non-finite loss, or one above spike_factor × the running mean (0: no spike check), is
    # judged before the optimizer step, whose update is then dropped: halt (stop, naming the last
    # checkpoint), skip (go on with the next batch; halt after more than max_skips in a row) or
    # rollback (reload the last checkpoint and skip the offending batch; at most max_rollbacks
    # times in a run).
    anomaly: str = "halt"  # halt | skip | rollback
    spike_factor: float = 0.0
    max_skips: int = 5
    max_rollbacks: int = 3
    # Every sample_interval steps (0: never) and at the end, the greedy continuation of each of
    # sample_prompts, sample_tokens long, goes to the log, RUN/samples.jsonl and wandb.
    sample_prompts: list[str] = field(default_factory=list)
    sample_interval: int = 0
    sample_tokens: int = 32
    # lm-eval tasks scored at every evaluation (step 0, eval_interval, the end) by DP group 0,
    # eval_limit examples each (None: all), next to val_loss; tasks may be YAML files in the
    # folders of eval_include_path. pp=1, ZeRO 0-2, no sequence parallelism (any tp: the TP
    # ranks of DP group 0 score together).
    eval_tasks: list[str] = field(default_factory=list)
    eval_limit: int | None = None
    eval_include_path: list[str] = field(default_factory=list)


@dataclass
class WandbConfig:
    mode: str = "offline"  # offline | online | disabled
    project: str = "megalite"
    entity: str | None = None
    name: str | None = None


@dataclass
class KernelsConfig:
    """Which implementation the hot ops use (megalite/model/ops.py): `auto` = the Triton kernels
    of `kernels/` on CUDA, torch elsewhere; `triton` forces them (on CPU only under
    TRITON_INTERPRET=1, for tests); `torch` = the exact references. flash-attn / apex are used when
    installed, whatever this says."""

    backend: str = "auto"  # auto | triton | torch
    attention: str = "auto"  # auto (flash-attn when importable, on CUDA in half precision) | sdpa


@dataclass
class LoggingConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)
    level: str = "INFO"
    tensorboard: bool = False  # rank 0 also writes event files to <run_dir>/tensorboard/


@dataclass
class ClusterConfig:
    """Where the ranks run. `local` (the default): spawned on this machine, or this process is
    one of torchrun's/srun's. `slurm` (`+cluster=slurm`, conf/cluster/slurm.yaml): submitted
    with submitit, one task per GPU (or `tasks_per_node` on a CPU cluster, with gloo)."""

    launcher: str = "local"  # local | slurm
    nodes: int = 1
    gpus_per_node: int = 8  # 0: a CPU cluster
    tasks_per_node: int | None = None  # None: gpus_per_node, or tp*pp*dp/nodes without GPUs
    cpus_per_task: int = 8
    mem: str | None = None  # sbatch --mem per node: "0" (all of it), "480G"; None: SLURM's default
    time: str = "1-00:00:00"  # SLURM's formats: MM, HH:MM:SS, D-HH, D-HH:MM:SS
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    exclusive: bool = False
    sbatch_extra: dict[str, str] = field(default_factory=dict)  # other sbatch options
    setup: list[str] = field(default_factory=list)  # shell lines before srun (module load, …)
    folder: str | None = None  # submitit's files and task logs; None: RUN_DIR/slurm
    job_name: str = "megalite"
    wait: bool = False  # stay attached: stream rank 0's log, exit with the job's outcome
    max_requeues: int = 3  # after a preemption or the time limit, resume this many times
    signal_delay_s: int = 120  # SIGUSR2 this long before the time limit: checkpoint, requeue

    def ntasks_per_node(self, world_size: int) -> int:
        if self.tasks_per_node is not None:
            return self.tasks_per_node
        return self.gpus_per_node or max(1, world_size // self.nodes)


@dataclass
class Config:
    model: ModelConfig = MISSING
    data: DataConfig = MISSING
    parallel: ParallelConfig = MISSING
    optim: OptimConfig = MISSING
    trainer: TrainerConfig = MISSING
    logging: LoggingConfig = MISSING
    kernels: KernelsConfig = MISSING
    cluster: ClusterConfig = field(default_factory=ClusterConfig)

    @property
    def world_size(self) -> int:
        return self.parallel.tp * self.parallel.cp * self.parallel.pp * self.parallel.dp

    @property
    def grad_accum_steps(self) -> int:
        t = self.trainer
        return t.global_batch_size // (t.micro_batch_size * self.parallel.dp)


def register_configs() -> None:
    """Register the schemas so `conf/*.yaml` are checked against them (`pretrain_schema`)."""
    from hydra.core.config_store import ConfigStore

    # conf/pretrain.yaml's hydra.run.dir: trainer.run_dir when given, else Hydra's dated folder
    # (oc.select would pass the key's null through).
    if not OmegaConf.has_resolver("or_default"):
        OmegaConf.register_new_resolver("or_default", lambda value, default: value or default)
    cs = ConfigStore.instance()
    cs.store(name="pretrain_schema", node=Config)
    for group, node in (
        ("model", ModelConfig),
        ("data", DataConfig),
        ("parallel", ParallelConfig),
        ("optim", OptimConfig),
        ("trainer", TrainerConfig),
        ("logging", LoggingConfig),
        ("kernels", KernelsConfig),
        ("cluster", ClusterConfig),
    ):
        cs.store(group=group, name=f"{group}_schema", node=node)


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def validate_model(m: ModelConfig) -> None:
    for key in ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "vocab_size"):
        _require(getattr(m, key) > 0, f"model.{key}={getattr(m, key)} must be positive")
    _require(
        m.dim % m.n_heads == 0,
        f"model.dim={m.dim} is not divisible by model.n_heads={m.n_heads}: change one of them",
    )
    _require(
        m.n_heads % m.n_kv_heads == 0,
        f"model.n_heads={m.n_heads} is not divisible by model.n_kv_heads={m.n_kv_heads}",
    )
    _require(m.head_dim % 2 == 0, f"head dim {m.head_dim} must be even for rotary embeddings")


def validate_parallel(p: ParallelConfig, m: ModelConfig) -> None:
    for key in ("tp", "pp", "dp", "cp"):
        _require(getattr(p, key) >= 1, f"parallel.{key}={getattr(p, key)} must be >= 1")
    _require(
        p.zero_stage in (0, 1, 2, 3),
        f"parallel.zero_stage={p.zero_stage} is not a ZeRO stage: use 0, 1, 2 or 3",
    )
    _require(
        m.n_heads % p.tp == 0,
        f"model.n_heads={m.n_heads} is not divisible by parallel.tp={p.tp}: "
        f"use a tp that divides {m.n_heads}",
    )
    _require(
        m.n_kv_heads % p.tp == 0 or p.tp % m.n_kv_heads == 0,
        f"model.n_kv_heads={m.n_kv_heads} and parallel.tp={p.tp} must divide one another: "
        f"use a tp that divides {m.n_kv_heads} or is a multiple of it",
    )
    _require(
        p.pp <= m.n_layers,
        f"parallel.pp={p.pp} exceeds model.n_layers={m.n_layers}: use pp <= {m.n_layers}",
    )
    _require(
        not (p.pp > 1 and p.zero_stage > 1),
        f"parallel.zero_stage={p.zero_stage} cannot run with pipeline parallelism (pp={p.pp}): "
        "use parallel.zero_stage=0 or 1",
    )
    _require(
        m.ffn_dim % p.tp == 0,
        f"model.ffn_dim={m.ffn_dim} is not divisible by parallel.tp={p.tp}: "
        f"use a tp that divides {m.ffn_dim}",
    )
    _require(
        not (p.sequence_parallel and p.tp == 1),
        "parallel.sequence_parallel=true shards the sequence over tensor-parallel ranks and "
        "needs parallel.tp > 1: set parallel.sequence_parallel=false or parallel.tp > 1",
    )
    _require(
        p.pipeline_partition in ("uniform", "parameters"),
        f"parallel.pipeline_partition={p.pipeline_partition!r}: use uniform or parameters",
    )
    _require(
        p.activation_checkpointing in ("none", "full", "selective"),
        f"parallel.activation_checkpointing={p.activation_checkpointing!r}: "
        "use none, full or selective",
    )


def validate_trainer(t: TrainerConfig, p: ParallelConfig, m: ModelConfig) -> None:
    for key in ("max_steps", "seq_len", "micro_batch_size", "global_batch_size", "eval_steps"):
        _require(getattr(t, key) > 0, f"trainer.{key}={getattr(t, key)} must be positive")
    for key in (
        "log_interval",
        "eval_interval",
        "save_interval",
        "keep_checkpoints",
        "hang_timeout",
        "startup_timeout",
        "sample_interval",
    ):
        _require(getattr(t, key) >= 0, f"trainer.{key} must be >= 0 (0 disables it)")
    if t.sample_interval:
        _validate_samples(t, m)
    _require(
        t.eval_limit is None or t.eval_limit > 0,
        f"trainer.eval_limit={t.eval_limit} must be positive (null: every example)",
    )
    _require(
        t.collective_timeout > 0, f"trainer.collective_timeout={t.collective_timeout} must be > 0"
    )
    _require(
        t.anomaly in ("halt", "skip", "rollback"),
        f"trainer.anomaly={t.anomaly!r}: use halt, skip or rollback",
    )
    _require(
        not (t.anomaly == "rollback" and t.save_interval == 0),
        "trainer.anomaly=rollback reloads the last checkpoint, and trainer.save_interval=0 saves "
        "none along the way: set trainer.save_interval > 0 or another trainer.anomaly",
    )
    _require(
        t.save_final or t.stop_at_step is None,
        f"trainer.stop_at_step={t.stop_at_step} stops with a checkpoint to resume from, and "
        "trainer.save_final=false writes none: drop one of them",
    )
    _require(
        t.spike_factor == 0 or t.spike_factor > 1,
        f"trainer.spike_factor={t.spike_factor} must be > 1 (0 disables the spike check)",
    )
    _require(t.max_rollbacks >= 0, f"trainer.max_rollbacks={t.max_rollbacks} must be >= 0")
    _require(t.max_skips >= 0, f"trainer.max_skips={t.max_skips} must be >= 0")
    _require(
        not (t.init_from and t.resume not in (None, "auto")),
        f"trainer.init_from={t.init_from} starts a new run from weights, "
        f"trainer.resume={t.resume} continues one: drop one of them",
    )
    per_step = t.micro_batch_size * p.dp
    _require(
        t.global_batch_size % per_step == 0,
        f"trainer.global_batch_size={t.global_batch_size} is not divisible by "
        f"micro_batch_size x dp = {t.micro_batch_size} x {p.dp} = {per_step}: "
        f"use a multiple of {per_step}",
    )
    _require(
        t.precision in ("fp32", "bf16"),
        f"trainer.precision={t.precision!r}: use fp32 or bf16",
    )
    _require(t.device in ("auto", "cpu", "cuda"), f"trainer.device={t.device!r}: use auto|cpu|cuda")
    _require(
        not p.sequence_parallel or t.seq_len % p.tp == 0,
        f"trainer.seq_len={t.seq_len} is not divisible by parallel.tp={p.tp}, which sequence "
        f"parallelism needs: use a multiple of {p.tp}",
    )
    _require(
        t.seq_len <= m.max_seq_len,
        f"trainer.seq_len={t.seq_len} exceeds model.max_seq_len={m.max_seq_len}",
    )


def _validate_samples(t: TrainerConfig, m: ModelConfig) -> None:
    _require(
        bool(t.sample_prompts),
        f"trainer.sample_interval={t.sample_interval} continues trainer.sample_prompts, which is "
        'empty: set e.g. trainer.sample_prompts=["ROMEO:"] or trainer.sample_interval=0',
    )
    _require(
        0 < t.sample_tokens < m.max_seq_len,
        f"trainer.sample_tokens={t.sample_tokens} must be in [1, model.max_seq_len="
        f"{m.max_seq_len})",
    )


def validate_optim(o: OptimConfig) -> None:
    _require(o.lr > 0 and math.isfinite(o.lr), f"optim.lr={o.lr} must be a positive number")
    _require(0 <= o.min_lr <= o.lr, f"optim.min_lr={o.min_lr} must lie in [0, optim.lr={o.lr}]")
    _require(o.warmup_steps >= 0, "optim.warmup_steps must be >= 0")
    _require(o.decay in ("cosine", "linear", "constant"), "optim.decay: use cosine|linear|constant")
    _require(o.grad_clip >= 0, "optim.grad_clip must be >= 0 (0 disables clipping)")


def validate_data(d: DataConfig) -> None:
    _require(
        d.path is None or not d.sources,
        "data.path and data.sources are both set: give one folder (data.path) or a mixture "
        "(data.sources)",
    )
    _require(d.workers >= 0, f"data.workers={d.workers} must be >= 0")
    _require(d.prefetch >= 1, f"data.prefetch={d.prefetch} must be >= 1")
    _require(d.read_attempts >= 1, f"data.read_attempts={d.read_attempts} must be >= 1")
    _require(d.retry_delay_s >= 0, f"data.retry_delay_s={d.retry_delay_s} must be >= 0")
    _require(
        d.name != "mixture" or bool(d.sources),
        "data=mixture needs data.sources=[{path: DIR, weight: W}, ...]",
    )


def validate_kernels(k: KernelsConfig) -> None:
    _require(
        k.backend in ("auto", "triton", "torch"),
        f"kernels.backend={k.backend!r}: use auto, triton or torch",
    )
    _require(k.attention in ("auto", "sdpa"), f"kernels.attention={k.attention!r}: use auto|sdpa")


def validate_logging(lg: LoggingConfig) -> None:
    from importlib.util import find_spec

    _require(
        lg.wandb.mode in ("offline", "online", "disabled"),
        f"logging.wandb.mode={lg.wandb.mode!r}: use offline, online or disabled",
    )
    _require(
        not lg.tensorboard or find_spec("tensorboard") is not None,
        "logging.tensorboard=true needs the tensorboard package: pip install tensorboard "
        "(tools/dev.py setup pins it)",
    )


def slurm_minutes(time: str) -> int:
    """SLURM's time formats (MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS) in whole minutes."""
    days, _, clock = time.rpartition("-") if "-" in time else ("0", "", time)
    parts = [int(x) for x in clock.split(":")]
    if "-" in time:  # D-HH[:MM[:SS]]
        hours, minutes, seconds = (parts + [0, 0])[:3]
    elif len(parts) == 3:
        hours, minutes, seconds = parts
    else:  # MM[:SS]
        hours, (minutes, seconds) = 0, (parts + [0])[:2]
    return int(days) * 24 * 60 + hours * 60 + minutes + (1 if seconds else 0)


def validate_cluster(c: ClusterConfig, p: ParallelConfig) -> None:
    _require(c.launcher in ("local", "slurm"), f"cluster.launcher={c.launcher!r}: use local|slurm")
    if c.launcher != "slurm":
        return
    _require(c.nodes >= 1, f"cluster.nodes={c.nodes} must be >= 1")
    _require(c.gpus_per_node >= 0, f"cluster.gpus_per_node={c.gpus_per_node} must be >= 0")
    _require(c.max_requeues >= 0, f"cluster.max_requeues={c.max_requeues} must be >= 0")
    try:
        minutes = slurm_minutes(c.time)
    except ValueError:
        minutes = 0
    _require(minutes > 0, f"cluster.time={c.time!r}: use D-HH:MM:SS, HH:MM:SS or minutes")
    tasks = c.ntasks_per_node(p.tp * p.cp * p.pp * p.dp)
    if c.gpus_per_node:
        _require(
            tasks == c.gpus_per_node,
            f"cluster.tasks_per_node={tasks} but cluster.gpus_per_node={c.gpus_per_node}: "
            "megalite runs one task per GPU; drop cluster.tasks_per_node",
        )
    ranks, mp = c.nodes * tasks, p.tp * p.cp * p.pp
    fix = f"set parallel.dp={ranks // mp}" if ranks % mp == 0 else "change cluster.nodes"
    _require(
        ranks == p.tp * p.cp * p.pp * p.dp,
        f"cluster.nodes x {'gpus' if c.gpus_per_node else 'tasks'}_per_node = {c.nodes} x {tasks} "
        f"= {ranks} ranks but tp x pp x dp = {p.tp} x {p.pp} x {p.dp} = {p.tp * p.pp * p.dp}"
        f"{f' (x cp {p.cp})' if p.cp > 1 else ''}: "
        f"{fix}",
    )


def validate(cfg: Config, *, world_size: int | None = None) -> None:
    """Check everything that can be checked before a process starts.

    `world_size` is the number of processes that an outside launcher (torchrun, srun) started;
    None when megalite spawns them itself (then it starts exactly tp*pp*dp).
    """
    validate_model(cfg.model)
    validate_parallel(cfg.parallel, cfg.model)
    validate_cluster(cfg.cluster, cfg.parallel)
    validate_trainer(cfg.trainer, cfg.parallel, cfg.model)
    validate_optim(cfg.optim)
    validate_logging(cfg.logging)
    validate_kernels(cfg.kernels)
    if world_size is not None:
        p = cfg.parallel
        _require(
            world_size == cfg.world_size,
            f"world size {world_size} != tp x pp x dp = {p.tp} x {p.pp} x {p.dp} = "
            f"{cfg.world_size}{f' (x cp {p.cp})' if p.cp > 1 else ''}: set "
            f"parallel.dp={max(1, world_size // (p.tp * p.cp * p.pp))} "
            "or start that many processes",
        )
    validate_data(cfg.data)
    validate_context(cfg)


def validate_context(cfg: Config) -> None:
    """What context parallelism (parallel.cp > 1) needs, and what this slice does not yet run."""
    p, t, m = cfg.parallel, cfg.trainer, cfg.model
    _require(
        p.cp_impl in CP_IMPLS, f"parallel.cp_impl={p.cp_impl!r}: use one of {', '.join(CP_IMPLS)}"
    )
    if p.cp == 1:
        return
    ring = p.cp_impl == "ring"
    parts = 2 * p.cp if ring else p.cp
    _require(
        t.seq_len % parts == 0,
        f"trainer.seq_len={t.seq_len} is not divisible by {'2 x ' if ring else ''}parallel.cp = "
        f"{parts}, which the {p.cp_impl} split needs: use a multiple of {parts}",
    )
    _require(
        not p.sequence_parallel or (t.seq_len // p.cp) % p.tp == 0,
        f"trainer.seq_len / parallel.cp = {t.seq_len // p.cp} tokens per cp rank are not "
        f"divisible by parallel.tp={p.tp}, which sequence parallelism needs: use a multiple of "
        f"{p.cp * p.tp}",
    )
    _require(
        ring or (m.n_heads // p.tp) % p.cp == 0,
        f"parallel.cp_impl=ulysses splits the {m.n_heads // p.tp} heads per tensor-parallel rank "
        f"over parallel.cp={p.cp}, which does not divide them: use parallel.cp_impl=ring",
    )
    _require(
        p.pp == 1,
        f"parallel.cp={p.cp} with a pipeline (parallel.pp={p.pp}) is not supported yet: "
        "use parallel.pp=1",
    )
    _require(
        not cfg.data.document_mask,
        "data.document_mask=true cannot run with parallel.cp > 1 (context attention is causal "
        "over the whole window): set data.document_mask=false or parallel.cp=1",
    )
    _require(
        not (t.sample_interval or t.eval_tasks),
        "trainer.sample_interval / trainer.eval_tasks do not run with parallel.cp > 1 yet: "
        "set trainer.sample_interval=0 trainer.eval_tasks=[] or parallel.cp=1",
    )
    _require(
        t.init_from is None,
        "trainer.init_from with parallel.cp > 1 is not supported yet: start at parallel.cp=1",
    )


def doubtful(cfg: Config) -> list[str]:
    """Settings that run but are probably not what was meant: one line each, to warn about
    before launch."""
    o, t = cfg.optim, cfg.trainer
    out = []
    if o.warmup_steps > t.max_steps:
        out.append(
            f"optim.warmup_steps={o.warmup_steps} is longer than trainer.max_steps={t.max_steps}: "
            f"the LR never reaches optim.lr={o.lr:g}; set optim.warmup_steps below {t.max_steps}"
        )
    return out
