"""A training layout (tp, pp, dp, ZeRO stage, micro batch, recomputation, sequence parallelism),
its estimate (memory per GPU, step time), and the search for the layouts that fit.

A layout is checked by the very functions the launcher runs (`megalite.config.validate_parallel`
and `validate_trainer`), so the planner never proposes what the trainer would refuse, and a
rejection reads as the trainer's own message.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from megalite.config import (
    ConfigError,
    ModelConfig,
    ParallelConfig,
    TrainerConfig,
    effective_zero_stage,
    validate_parallel,
    validate_trainer,
)
from megalite.plan.errors import PlanError
from megalite.plan.gpus import GIB, GPU
from megalite.plan.memory import StageMemory, stage_memory
from megalite.plan.throughput import Network, StepTime, step_time

AC_MODES = ("none", "selective", "full")
PRECISIONS = ("bf16", "fp32")


@dataclass(frozen=True)
class Layout:
    tp: int = 1
    pp: int = 1
    dp: int = 1
    zero: int = 1  # as asked; `effective_zero` is what runs
    micro_batch: int = 1
    seq_len: int = 4096
    global_batch: int = 1024  # sequences per optimizer step
    ac: str = "none"  # activation checkpointing: none | selective | full
    sp: bool = False  # sequence parallelism
    precision: str = "bf16"

    @property
    def gpus(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def grad_accum(self) -> int:
        """Micro-batches per step on each data-parallel rank (the pipeline's m)."""
        return self.global_batch // (self.micro_batch * self.dp)

    @property
    def effective_zero(self) -> int:
        """The stage that runs (config.effective_zero_stage: ZeRO 0 at dp = pp = 1)."""
        return effective_zero_stage(self.zero, dp=self.dp, pp=self.pp)

    def label(self) -> str:
        sp = " sp" if self.sp else ""
        return (
            f"tp={self.tp}{sp} pp={self.pp} dp={self.dp} zero={self.zero} "
            f"micro_batch={self.micro_batch} ac={self.ac}"
        )


def check_layout(cfg: ModelConfig, layout: Layout) -> None:
    """PlanError with the trainer's one-line message if megalite would refuse `layout`."""
    parallel = ParallelConfig(
        tp=layout.tp,
        pp=layout.pp,
        dp=layout.dp,
        zero_stage=layout.zero,
        sequence_parallel=layout.sp,
        activation_checkpointing=layout.ac,
    )
    trainer = TrainerConfig(
        seq_len=layout.seq_len,
        micro_batch_size=layout.micro_batch,
        global_batch_size=layout.global_batch,
        precision=layout.precision,
    )
    try:
        validate_parallel(parallel, cfg)
        validate_trainer(trainer, parallel, cfg)
    except ConfigError as e:
        raise PlanError(str(e)) from None


@dataclass(frozen=True)
class Estimate:
    layout: Layout
    gpu: GPU
    stages: tuple[StageMemory, ...]  # the first and the last pipeline stage (the largest two)
    time: StepTime
    usable_bytes: float

    @property
    def memory(self) -> StageMemory:
        """The stage that needs the most memory per GPU."""
        return max(self.stages, key=lambda s: s.total)

    @property
    def fits(self) -> bool:
        return self.memory.total <= self.usable_bytes


def estimate(
    cfg: ModelConfig,
    layout: Layout,
    gpu: GPU,
    *,
    mfu: float,
    usable_fraction: float,
    network: Network,
    check: bool = True,
) -> Estimate:
    """Memory per GPU and step time of `layout`; `check` first validates it as the trainer would.

    Middle pipeline stages need neither more memory nor more time than the first (fewer or equal
    blocks, fewer micro-batches in flight, no embedding), so the first and last stages bound all.
    """
    if check:
        check_layout(cfg, layout)
    stages = tuple(stage_memory(cfg, layout, s) for s in sorted({0, layout.pp - 1}))
    return Estimate(
        layout=layout,
        gpu=gpu,
        stages=stages,
        time=step_time(cfg, layout, gpu, mfu=mfu, network=network),
        usable_bytes=usable_fraction * gpu.memory_bytes,
    )


@dataclass(frozen=True)
class Rejection:
    tp: int
    pp: int | None  # None: every pp with this tp
    reason: str


@dataclass(frozen=True)
class SearchResult:
    layouts: list[Estimate]  # every layout that fits, fastest first
    rejected: list[Rejection]  # the (tp, pp) families where nothing fits, and why
    evaluated: int
    leanest: Estimate | None  # the layout needing the least memory of all evaluated


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def search(
    cfg: ModelConfig,
    *,
    gpus: int,
    gpu: GPU,
    base: Layout,
    mfu: float,
    usable_fraction: float,
    network: Network,
    fixed: frozenset[str] = frozenset(),
) -> SearchResult:
    """Every layout of `gpus` GPUs that megalite accepts and that fits in memory, ranked by
    estimated tokens per second (then by memory). `base` gives seq_len, global_batch and
    precision, and the values of the fields named in `fixed` (e.g. {"tp", "ac"}), which are
    not searched."""

    def options(name: str, values: list) -> list:
        return [getattr(base, name)] if name in fixed else values

    found: list[Estimate] = []
    rejected: list[Rejection] = []
    evaluated = 0
    leanest_of_all: Estimate | None = None
    for tp in options("tp", _divisors(gpus)):
        if gpus % tp:
            rejected.append(Rejection(tp, None, f"does not divide {gpus} GPUs"))
            continue
        if tp > network.gpus_per_node:
            reason = (
                f"exceeds the {network.gpus_per_node} GPUs of a node "
                "(tensor-parallel collectives would cross the network)"
            )
            rejected.append(Rejection(tp, None, reason))
            continue
        for pp in options("pp", _divisors(gpus // tp)):
            if (gpus // tp) % pp:
                rejected.append(Rejection(tp, pp, f"tp x pp = {tp * pp} does not divide {gpus}"))
                continue
            dp = gpus // (tp * pp)
            # The searched fields start neutral; the fixed ones keep `base`'s values.
            family = replace(
                base,
                tp=tp,
                pp=pp,
                dp=dp,
                zero=base.zero if "zero" in fixed else 0,
                micro_batch=base.micro_batch if "micro_batch" in fixed else 1,
                sp=base.sp if "sp" in fixed else False,
                ac=base.ac if "ac" in fixed else "none",
            )
            try:
                check_layout(cfg, family)
            except PlanError as e:
                rejected.append(Rejection(tp, pp, str(e)))
                continue
            fits, leanest, count = _search_family(
                cfg, family, gpu, base, options, mfu, usable_fraction, network
            )
            evaluated += count
            found += fits
            if leanest and (
                not leanest_of_all or leanest.memory.total < leanest_of_all.memory.total
            ):
                leanest_of_all = leanest
            if not fits:
                rejected.append(Rejection(tp, pp, _memory_reason(leanest, count)))
    found.sort(key=lambda e: (-e.time.tokens_per_s, e.memory.total, e.layout.zero))
    found = _drop_twins(found)
    return SearchResult(
        layouts=found, rejected=rejected, evaluated=evaluated, leanest=leanest_of_all
    )


def _search_family(
    cfg: ModelConfig,
    family: Layout,
    gpu: GPU,
    base: Layout,
    options: Callable[[str, list], list],
    mfu: float,
    usable_fraction: float,
    network: Network,
) -> tuple[list[Estimate], Estimate | None, int]:
    """The fitting layouts of one (tp, pp) family, its leanest estimate, and how many were tried."""
    tp, pp, dp = family.tp, family.pp, family.dp
    zeros = [0] if dp == 1 and pp == 1 else [0, 1] if pp > 1 else [0, 1, 2, 3]
    sps = [False, True] if tp > 1 and base.seq_len % tp == 0 else [False]
    per_rank = base.global_batch // dp
    micros = _divisors(per_rank)
    fits: list[Estimate] = []
    leanest: Estimate | None = None
    count = 0
    for zero in options("zero", zeros):
        if pp > 1 and zero > 1:
            continue
        for sp in options("sp", sps):
            if sp and (tp == 1 or base.seq_len % tp):
                continue
            for ac in options("ac", list(AC_MODES)):
                for micro in options("micro_batch", micros):
                    if per_rank % micro:
                        continue
                    layout = replace(family, zero=zero, sp=sp, ac=ac, micro_batch=micro)
                    est = estimate(
                        cfg,
                        layout,
                        gpu,
                        mfu=mfu,
                        usable_fraction=usable_fraction,
                        network=network,
                        check=False,
                    )
                    count += 1
                    if leanest is None or est.memory.total < leanest.memory.total:
                        leanest = est
                    if not est.fits:
                        break  # a larger micro batch needs more memory still
                    fits.append(est)
    return fits, leanest, count


def _drop_twins(ranked: list[Estimate]) -> list[Estimate]:
    """Keep one of the layouts that differ only in the ZeRO stage and predict the same memory
    and time (e.g. bf16 ZeRO 0 under a pipeline, which DeepSpeed shards like ZeRO 1)."""
    seen, out = set(), []
    for e in ranked:
        key = (replace(e.layout, zero=0), e.memory.total, round(e.time.step_s, 9))
        if key not in seen:
            seen.add(key)
            out.append(e)
    return out


def _memory_reason(leanest: Estimate | None, count: int) -> str:
    if leanest is None or count == 0:
        return "no micro batch, ZeRO stage or recomputation option applies"
    return (
        f"too little memory: the leanest layout ({leanest.layout.label()}) needs "
        f"{leanest.memory.total / GIB:.1f} GiB per GPU, {leanest.usable_bytes / GIB:.1f} GiB usable"
    )
