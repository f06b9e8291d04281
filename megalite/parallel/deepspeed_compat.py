"""Every use of DeepSpeed's private attributes and internals, in one place.

megalite reaches into DeepSpeed where its public API stops short. Each place is a function here,
and each attribute it touches is a row of `PRIVATE`, with the reason. tests/parallel/
test_deepspeed_compat.py checks every row against the installed DeepSpeed and fails naming the
attribute when a release moves or renames one. Tested with the DeepSpeed that tools/dev.py pins
(pyproject.toml states the range).

- Dropping one step's update (`parallel/discard.py`): each optimizer's own overflow path is
  forced, so gradients are cleared, weights and moments are left alone, and the engine counts
  a skipped step. The pipeline engine's optimizer-step instruction is wrapped to judge the loss
  first.
- A save that must not raise on one rank alone (`checkpoint/training.py`): DeepSpeed's copy of
  its recovery scripts is replaced for the duration of the save.
- A world whose gradient reduction has nothing to reduce (one data-parallel rank, ZeRO 0, no
  pipeline): DeepSpeed's all-reduce after every backward is turned off.
- A layout-free resume (`checkpoint/universal.py`): ZeRO 3's module parameters are refreshed from
  the fp32 partitions, and ZeRO 1/2's links to the Adam state are rebuilt after the state is
  created.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

ZERO12 = "deepspeed.runtime.zero.stage_1_and_2.DeepSpeedZeroOptimizer"
ZERO3 = "deepspeed.runtime.zero.stage3.DeepSpeedZeroOptimizer_Stage3"
BF16 = "deepspeed.runtime.bf16_optimizer.BF16_Optimizer"
FP16_UNFUSED = "deepspeed.runtime.fp16.unfused_optimizer.FP16_UnfusedOptimizer"
ENGINE = "deepspeed.runtime.engine.DeepSpeedEngine"
PIPELINE = "deepspeed.runtime.pipe.engine.PipelineEngine"


@dataclass(frozen=True)
class Private:
    """One private attribute megalite uses: where, what kind, and why."""

    owner: str  # the class, by dotted path
    name: str
    kind: str  # "method", "class attribute" or "instance attribute" (set in the class's code)
    why: str


PRIVATE = (
    Private(ZERO3, "_overflow_check_and_loss_scale_update", "method",
            "replaced for one step: it reports an overflow, so the step is dropped"),
    Private(ZERO3, "_loss_scale_update_and_overflow_cleanup", "method",
            "the clean-up an overflow runs (gradients cleared), called by the replacement"),
    Private(ZERO3, "_reassign_or_swap_out_partitioned_parameters", "method",
            "copies the fp32 partitions into the module's partitions after a layout-free resume"),
    Private(BF16, "_global_grad_norm", "instance attribute",
            "set to inf on a dropped step, as the optimizer's own invalid-norm branch does"),
    Private(FP16_UNFUSED, "_skip_invalid_grad_norm", "method",
            "its invalid-norm branch: a dropped step's gradients cleared, nothing updated"),
    Private(ZERO12, "_hp_optimizer_states_linked", "instance attribute",
            "reset so the links to Adam's state are rebuilt once megalite creates that state"),
    Private(ZERO12, "_lazy_init_hp_params_optimizer_state", "method",
            "rebuilds those links (DeepSpeed does it lazily, at the first step)"),
    Private(PIPELINE, "_INSTRUCTION_MAP", "class attribute",
            "the optimizer-step instruction is wrapped to judge the loss before the step"),
    Private(PIPELINE, "_aggregate_total_loss", "method",
            "the step's loss, averaged and broadcast as train_batch returns it, for the judge"),
    Private(ENGINE, "_copy_recovery_script", "method",
            "replaced during a save, so a failure to copy is recorded instead of raised on "
            "rank 0 alone"),
    # Public names, but internals all the same: overridden on an instance, or read to find
    # where an optimizer keeps its fp32 state (a rename would fall through silently).
    Private(ZERO12, "check_grad_overflow", "instance attribute", "forced on for a dropped step"),
    Private(ZERO12, "has_overflow", "method", "made to say True for a dropped step"),
    Private(ZERO12, "single_partition_of_fp32_groups", "instance attribute",
            "the fp32 partitions a layout-free resume fills (checkpoint/universal.py)"),
    Private(ZERO3, "fp16_groups", "instance attribute", "the groups whose partitions refresh"),
    Private(ZERO3, "fp32_partitioned_groups_flat", "instance attribute",
            "the fp32 partitions a layout-free resume fills"),
    Private(BF16, "clear_hp_grads", "method", "a dropped step's fp32 gradients cleared"),
    Private(BF16, "clear_lp_grads", "method", "a dropped step's bf16 gradients cleared"),
    Private(FP16_UNFUSED, "fp16_groups", "instance attribute",
            "with fp32_groups: each parameter's fp32 master, which a layout-free resume fills"),
    Private(FP16_UNFUSED, "fp32_groups", "instance attribute", "see fp16_groups"),
    Private(ENGINE, "checkpoint_engine", "instance attribute",
            "replaced during a save by one that records a failed write instead of raising"),
    Private(ENGINE, "enable_backward_allreduce", "instance attribute",
            "turned off where the gradient all-reduce is over one rank (skip_lone_reduction)"),
)  # fmt: skip


# ---- the gradient all-reduce ---------------------------------------------------------------


def skip_lone_reduction(engine: Any) -> None:
    """Turn off the gradient all-reduce DeepSpeed's engine runs after each backward at the
    accumulation boundary. For an engine whose data-parallel group is one rank, without ZeRO and
    without a pipeline only: there it flattens every gradient into buckets, all-reduces them
    over the one rank, divides by 1 and copies them back, the gradients unchanged bit for bit
    (2.6-3.0 ms of a 110 ms tiny step, 470 ms of a 6.8 s 125m one: tools/bench/step_profile.py).
    ZeRO 1/2 need the call (it fills their partitions), and a pipeline reduces in its own
    instruction."""
    from deepspeed.runtime.pipe.engine import PipelineEngine

    if isinstance(engine, PipelineEngine) or engine.zero_optimization_stage() != 0:
        raise ValueError("only a ZeRO 0 engine without a pipeline reduces nothing it needs")
    if engine.dp_world_size != 1:
        raise ValueError(
            f"the gradients of {engine.dp_world_size} data-parallel ranks must be reduced"
        )
    engine.enable_backward_allreduce = False


# ---- dropping one step ----------------------------------------------------------------------


@contextmanager
def overflowing(opt: Any) -> Iterator[None]:
    """Within this block `opt`'s step takes its overflow path (`overflow_overrides`, set on the
    instance over the class's methods, and taken off again after)."""
    overrides = overflow_overrides(opt)
    saved = {name: opt.__dict__[name] for name in overrides if name in opt.__dict__}
    opt.__dict__.update(overrides)
    try:
        yield
    finally:
        for name in overrides:
            if name in saved:
                opt.__dict__[name] = saved[name]
            else:
                del opt.__dict__[name]


def overflow_overrides(opt: Any) -> dict[str, Any]:
    """Instance attributes that send `opt`'s next step down its overflow path."""
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    if isinstance(opt, DeepSpeedZeroOptimizer):
        return {"check_grad_overflow": True, "has_overflow": lambda *_args, **_kw: True}
    if isinstance(opt, DeepSpeedZeroOptimizer_Stage3):

        def overflowed(update_scale: bool = True) -> bool:
            opt.overflow = True
            return opt._loss_scale_update_and_overflow_cleanup() if update_scale else True

        return {"_overflow_check_and_loss_scale_update": overflowed}
    if isinstance(opt, BF16_Optimizer):

        def drop(closure: Any = None) -> None:
            opt.overflow = True
            opt._global_grad_norm = float("inf")
            opt.clear_hp_grads()
            opt.clear_lp_grads()

        return {"step": drop}
    if isinstance(opt, FP16_UnfusedOptimizer):
        return {"step": lambda closure=None: opt._skip_invalid_grad_norm()}
    if hasattr(opt, "overflow"):  # a DeepSpeed optimizer this module does not know
        raise NotImplementedError(f"cannot skip a step of {type(opt).__name__}")

    def nothing(closure: Any = None) -> None:
        return None

    return {"step": nothing, "overflow": True}  # the engine zeroes the module's grads


def wrap_optimizer_step(engine: Any, wrap: Callable[[Callable[..., None]], Callable[..., None]]):
    """Make a pipeline engine run `wrap(step)` as its optimizer-step instruction (`step(self,
    lr_kwargs)` is the engine's own), on top of the engine's current instruction map."""
    from deepspeed.runtime.pipe.schedule import OptimizerStep

    instructions = engine._INSTRUCTION_MAP  # the class's, or an instance's own copy
    engine._INSTRUCTION_MAP = {**instructions, OptimizerStep: wrap(instructions[OptimizerStep])}


def pipeline_step_loss(engine: Any) -> float:
    """The loss of the step in flight on a pipeline engine, as `train_batch` will return it."""
    return float(engine._aggregate_total_loss())


# ---- saving -------------------------------------------------------------------------------


def recovery_script_copier(engine: Any) -> Callable[[str], None]:
    """The engine's copy of its recovery scripts (zero_to_fp32.py) into a save folder."""
    return engine._copy_recovery_script


def replace_recovery_script_copier(engine: Any, copier: Callable[[str], None] | None) -> None:
    """Use `copier` for the engine's saves; None: the engine's own again."""
    if copier is None:
        del engine._copy_recovery_script
    else:
        engine._copy_recovery_script = copier


# ---- layout-free resume -----------------------------------------------------------------------


def refresh_zero3_partitions(optimizer: Any) -> None:
    """ZeRO 3: copy the fp32 partitions into the module's (low-precision) partitions."""
    for group in range(len(optimizer.fp16_groups)):
        optimizer._reassign_or_swap_out_partitioned_parameters(group)


def relink_zero12_optimizer_state(optimizer: Any) -> None:
    """ZeRO 1/2: rebuild each parameter's links to the Adam state of its fp32 partition."""
    optimizer._hp_optimizer_states_linked = False
    optimizer._lazy_init_hp_params_optimizer_state()
