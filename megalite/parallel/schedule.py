"""Learning-rate schedule: linear warmup from 0, then cosine (or linear) decay to `min_lr`.

Expressed as a multiplier of `optim.lr` so it plugs into `torch.optim.lr_scheduler.LambdaLR`,
whose state DeepSpeed saves and restores with its checkpoints.
"""

from __future__ import annotations

import math

import torch

from megalite.config import OptimConfig


def lr_at(step: int, *, optim: OptimConfig, max_steps: int) -> float:
    """The learning rate for the update made at 0-based `step`."""
    if optim.warmup_steps > 0 and step < optim.warmup_steps:
        return optim.lr * (step + 1) / optim.warmup_steps
    if optim.decay == "constant":
        return optim.lr
    decay_steps = max(1, max_steps - optim.warmup_steps)
    progress = min(1.0, (step - optim.warmup_steps) / decay_steps)
    if optim.decay == "linear":
        factor = 1.0 - progress
    else:
        factor = 0.5 * (1.0 + math.cos(math.pi * progress))
    return optim.min_lr + (optim.lr - optim.min_lr) * factor


def build_scheduler(
    optimizer: torch.optim.Optimizer, *, optim: OptimConfig, max_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_at(step, optim=optim, max_steps=max_steps) / optim.lr
    )
