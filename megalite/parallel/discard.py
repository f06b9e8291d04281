"""Drop one optimizer step's gradients instead of applying them (`trainer.anomaly=skip`).

DeepSpeed already knows how to skip a step: an fp16 step whose gradients overflowed is dropped by
the optimizer (gradients cleared, no parameter or moment update), and the engine then counts it in
`skipped_steps` and leaves the LR scheduler where it was. `discarded_update(engine)` makes the next
boundary `engine.step()` (or the pipeline's optimizer-step instruction) take that same path, for
whichever optimizer the engine built:

- ZeRO 1/2 (`DeepSpeedZeroOptimizer`): its overflow check is forced to report an overflow;
- ZeRO 3 (`DeepSpeedZeroOptimizer_Stage3`): likewise, through its overflow clean-up;
- bf16 without ZeRO (`FP16_UnfusedOptimizer` in bf16, or `BF16_Optimizer`): its invalid-norm
  branch (the fp32 and bf16 gradients cleared);
- a plain torch optimizer (fp32 without ZeRO): its step does nothing and reports an overflow, the
  engine zeroes the module's gradients.

Every rank must discard the same step (the verdict comes from the loss, equal on all ranks): the
optimizers' collectives are the same on both paths or absent on both.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any


def _overrides(opt: Any) -> dict[str, Any]:
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


@contextmanager
def discarded_update(engine: Any) -> Iterator[None]:
    """Within this block, the engine's optimizer step drops the accumulated gradients."""
    opt = engine.optimizer
    overrides = _overrides(opt)
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


def judge_before_step(engine: Any, judge: Callable[[float], bool]) -> None:
    """Make a DeepSpeed pipeline engine ask `judge(loss)` before each optimizer step, the loss
    averaged over micro-batches and data parallelism as `train_batch` returns it (the last stage
    broadcasts it to every stage); the step's gradients are dropped when the judge says True. The
    optimizer step is the schedule's last instruction, so every micro-batch's loss is known."""
    from deepspeed.runtime.pipe.schedule import OptimizerStep

    instructions = engine._INSTRUCTION_MAP  # the class's, or an instance's own copy
    optimizer_step = instructions[OptimizerStep]

    def judged_step(self: Any, lr_kwargs: Any = None) -> None:
        bad = judge(float(self._aggregate_total_loss()))
        with discarded_update(self) if bad else nullcontext():
            optimizer_step(self, lr_kwargs)

    engine._INSTRUCTION_MAP = {**instructions, OptimizerStep: judged_step}
