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

from megalite.parallel import deepspeed_compat


@contextmanager
def discarded_update(engine: Any) -> Iterator[None]:
    """Within this block, the engine's optimizer step drops the accumulated gradients."""
    with deepspeed_compat.overflowing(engine.optimizer):
        yield


def judge_before_step(engine: Any, judge: Callable[[float], bool]) -> None:
    """Make a DeepSpeed pipeline engine ask `judge(loss)` before each optimizer step, the loss
    averaged over micro-batches and data parallelism as `train_batch` returns it (the last stage
    broadcasts it to every stage); the step's gradients are dropped when the judge says True. The
    optimizer step is the schedule's last instruction, so every micro-batch's loss is known."""

    def judged(optimizer_step: Callable[..., None]) -> Callable[..., None]:
        def judged_step(self: Any, lr_kwargs: Any = None) -> None:
            bad = judge(deepspeed_compat.pipeline_step_loss(self))
            with discarded_update(self) if bad else nullcontext():
                optimizer_step(self, lr_kwargs)

        return judged_step

    deepspeed_compat.wrap_optimizer_step(engine, judged)
