"""Which checkpoints a run writes: `trainer.save_interval` (every N steps; 0: none along the way),
`trainer.save_final` (the one at the end) and a stop request (saved unless the run saves none at
all, as benchmarks run); and what needs a checkpoint is refused without one, in one line."""

from __future__ import annotations

import logging
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest

from megalite.checkpoint import store
from megalite.config import ConfigError, TrainerConfig, validate
from megalite.launch import launch
from megalite.train.trainer import Trainer
from tests.helpers import compose_config, short_job, train_losses

STEPS = 3


def files_under(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()] if folder.exists() else []


@pytest.mark.parametrize(
    ("saves", "committed"),
    [
        (["trainer.save_final=false"], []),  # save_interval=0 (short_job's)
        ([], [STEPS]),  # save_final's default
        (["trainer.save_interval=2", "trainer.save_final=false"], [2]),
    ],
)
def test_save_interval_and_save_final(
    sample_data: Path, tmp_path: Path, saves: list[str], committed: list[int]
) -> None:
    launch(short_job(sample_data, tmp_path, *saves, steps=STEPS), default_run_dir=tmp_path)
    assert sorted(train_losses(tmp_path)) == list(range(1, STEPS + 1))  # it trained
    root = tmp_path / "checkpoints"
    assert [p.name for p in store.committed(root)] == [store.step_name(s) for s in committed]
    if not committed:
        assert files_under(root) == []  # nothing on disk: no partial, no staging folder


@pytest.mark.parametrize(
    ("interval", "final", "saved"), [(0, False, False), (0, True, True), (2, False, True)]
)
def test_a_stop_request_saves_unless_the_run_saves_nothing(
    interval: int, final: bool, saved: bool, caplog: pytest.LogCaptureFixture
) -> None:
    calls: list[int] = []
    trainer = SimpleNamespace(
        cfg=SimpleNamespace(trainer=TrainerConfig(save_interval=interval, save_final=final)),
        step=5,
        _save_unless_saved=lambda: calls.append(5),
    )
    with caplog.at_level(logging.INFO, logger="megalite"):
        result = Trainer._stop_on(trainer, signal.SIGUSR1)  # type: ignore[arg-type]
    assert result == {"stopped_by": "SIGUSR1", "step": 5}
    assert calls == ([5] if saved else [])
    said = "SIGUSR1 at step 5: checkpointing, then stopping"
    if not saved:
        said = (
            "SIGUSR1 at step 5: stopping without a checkpoint "
            "(trainer.save_interval=0 trainer.save_final=false)"
        )
    assert caplog.messages == [said]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["trainer.anomaly=rollback", "trainer.save_interval=0"],
            "trainer.anomaly=rollback reloads the last checkpoint, and trainer.save_interval=0 "
            "saves none along the way: set trainer.save_interval > 0 or another trainer.anomaly",
        ),
        (
            ["trainer.stop_at_step=2", "trainer.save_final=false"],
            "trainer.stop_at_step=2 stops with a checkpoint to resume from, and "
            "trainer.save_final=false writes none: drop one of them",
        ),
    ],
)
def test_what_needs_a_checkpoint_is_refused_without_one(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as e:
        validate(compose_config(overrides))
    assert str(e.value) == message  # one line, before any process starts (prepare_run's check)


def test_what_has_its_checkpoints_is_accepted() -> None:
    validate(compose_config(["trainer.anomaly=rollback", "trainer.save_interval=5"]))
    validate(compose_config(["trainer.stop_at_step=2", "trainer.save_interval=0"]))
