from __future__ import annotations

from pathlib import Path

import pytest

from megalite.launch import launch
from tests.helpers import short_job

THREE_D = ["parallel.tp=2", "parallel.pp=2", "parallel.dp=2", "parallel.zero_stage=1"]
# Adam's eps large enough that near-zero gradients (rare tokens' embedding rows) do not turn float
# noise between layouts into ±lr updates: comparisons across layouts stay tight.
OPTIM = ["optim.warmup_steps=1", "optim.eps=1e-3"]
STEPS = 4  # every run here schedules 4 steps (the LR schedule depends on it)
HALF = 2


def train(data: Path, run_dir: Path, *extra: str) -> None:
    launch(short_job(data, run_dir, *OPTIM, *extra, steps=STEPS), default_run_dir=run_dir)


@pytest.fixture(scope="session")
def run_3d(sample_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The run folder of a tp=2 x pp=2 x dp=2 (ZeRO 1) run of STEPS steps that checkpoints and
    evaluates at step HALF too: the 3D layout of test_convert and the source of every reshard
    in test_reshard (one 8-rank run for both). It saves asynchronously (trainer.async_save), so
    every test reading or resuming its checkpoints checks the background writer's files too."""
    run_dir = tmp_path_factory.mktemp("run-3d")
    train(sample_data, run_dir, *THREE_D, f"trainer.save_interval={HALF}",
          f"trainer.eval_interval={HALF}", "trainer.async_save=true")  # fmt: skip
    return run_dir
