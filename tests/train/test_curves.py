"""tools/plot.py (megalite/train/curves.py) on hand-written metrics.jsonl files, and the
logbook's TensorBoard sink read back from its event file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from megalite.config import ConfigError, LoggingConfig, validate_logging
from megalite.train import curves
from megalite.train.logbook import Logbook

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def train_record(step: int, loss: float) -> dict[str, Any]:
    return {
        "step": step,
        "loss": loss,
        "lr": 1e-3 * step,
        "grad_norm": 1.0 / step,
        "tokens_per_s": 1000.0 + step,
        "tokens": 256 * step,
        "max_steps": 10,
        "mfu": 0.1,
        "memory_gib": 0.5,
    }


def eval_record(step: int, val_loss: float) -> dict[str, Any]:
    return {"step": step, "tokens": 256 * step, "val_loss": val_loss, "tokens_per_source": {"a": 1}}


def write_run(folder: Path, records: list[dict[str, Any]], *, tail: str = "") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    lines = "".join(json.dumps(r) + "\n" for r in records)
    (folder / "metrics.jsonl").write_text(lines + tail)
    return folder


def simple_run(folder: Path, *, offset: float = 0.0) -> Path:
    """Steps 2, 4, …, 10; eval at 0, 4 (best: 6.5 + offset), 8."""
    records: list[dict[str, Any]] = [eval_record(0, 9.0 + offset)]
    records += [train_record(s, 10.0 - s / 2 + offset) for s in range(2, 11, 2)]
    records.insert(3, eval_record(4, 6.5 + offset))
    records.append(eval_record(8, 7.0 + offset))
    records.append({"step": 1, "memory_measured_gib": 0.2})  # neither kind: ignored
    return write_run(folder, records)


def write_overrides(job: Path, overrides: list[str]) -> None:
    """What Hydra records of a multirun job's command line."""
    (job / ".hydra").mkdir()
    (job / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))


def plot(*args: str | Path) -> int:
    return curves.main([str(a) for a in args])


def rows(out: str) -> list[list[str]]:
    return [line.split() for line in out.splitlines()[1:] if not line.startswith("curves:")]


def test_one_run_table_and_png(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = simple_run(tmp_path / "run-a")
    assert plot(run) == 0
    out = capsys.readouterr().out
    png = run / "curves.png"
    assert png.read_bytes()[:8] == PNG_MAGIC
    assert f"curves: {png}" in out
    assert out.splitlines()[0].split()[:4] == ["run", "steps", "tokens", "train"]
    # run, steps, tokens, final train loss, final val loss, best val loss, (its step)
    assert rows(out) == [["run-a", "10", "2,560", "5.0000", "7.0000", "6.5000", "(4)"]]


def test_resumed_run_keeps_the_last_record_of_each_step(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first = [train_record(s, 10.0 - s) for s in (1, 2, 3, 4)] + [eval_record(4, 8.0)]
    again = [train_record(s, 5.0 - s) for s in (3, 4, 5)] + [eval_record(4, 7.5)]  # rollback to 2
    run = write_run(tmp_path / "resumed", first + again)
    loaded = curves.load_runs([run])[0]
    assert [r["step"] for r in loaded.train] == [1, 2, 3, 4, 5]
    assert [r["loss"] for r in loaded.train] == [9.0, 8.0, 2.0, 1.0, 0.0]
    assert [r["val_loss"] for r in loaded.evals] == [7.5]
    assert plot(run, "--x", "tokens", "--out", tmp_path / "r.png") == 0
    assert rows(capsys.readouterr().out) == [
        ["resumed", "5", "1,280", "0.0000", "7.5000", "7.5000", "(4)"]
    ]


def test_sweep_expands_to_its_runs_labelled_by_overrides(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sweep = tmp_path / "multirun"
    for job, lr in ((0, "1e-3"), (1, "3e-3")):
        simple_run(sweep / str(job), offset=job * 0.25)
        write_overrides(sweep / str(job), ["model=tiny", f"optim.lr={lr}"])  # model=tiny: shared
    out_png = tmp_path / "sweep.png"
    assert plot(sweep, "--out", out_png) == 0
    assert out_png.read_bytes()[:8] == PNG_MAGIC
    table = rows(capsys.readouterr().out)
    assert [(r[0], r[-2], r[-1]) for r in table] == [
        ("optim.lr=1e-3", "6.5000", "(4)"),
        ("optim.lr=3e-3", "6.7500", "(4)"),
    ]


def test_sweep_of_one_job_so_far_drops_the_fixed_overrides(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sweep = tmp_path / "multirun"
    write_overrides(simple_run(sweep / "0"), ["model=tiny", "optim.lr=0.001"])
    (sweep / "1").mkdir()  # the next job, starting
    (sweep / "multirun.yaml").write_text(
        "hydra:\n  overrides:\n    task:\n    - model=tiny\n    - optim.lr=1e-3,3e-3\n"
    )
    assert [r.name for r in curves.load_runs([sweep])] == ["optim.lr=0.001"]
    assert "no metrics.jsonl yet (the folder is empty): skipped" in capsys.readouterr().err


def test_sweep_without_overrides_is_labelled_by_folder(tmp_path: Path) -> None:
    for job in ("0", "1", "10", "2"):
        simple_run(tmp_path / "sw" / job)
    names = [r.name for r in curves.load_runs([tmp_path / "sw"])]
    assert names == ["sw/0", "sw/1", "sw/2", "sw/10"]


def test_partial_last_line_is_dropped_with_a_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = write_run(tmp_path / "live", [train_record(1, 3.0)], tail='{"step": 2, "lo')
    assert plot(run) == 0
    captured = capsys.readouterr()
    assert "ends in a partial line" in captured.err
    assert rows(captured.out) == [["live", "1", "256", "3.0000", "-", "-"]]


def test_folder_without_metrics_says_what_it_holds(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "ckpt" / "checkpoints").mkdir(parents=True)
    (tmp_path / "ckpt" / "config.yaml").write_text("{}")
    assert plot(tmp_path / "ckpt") == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert "no metrics.jsonl (it holds checkpoints/, config.yaml)" in err
    assert plot(tmp_path / "nowhere") == 2
    assert "no such folder" in capsys.readouterr().err


def test_metrics_without_training_records(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = write_run(tmp_path / "evals-only", [eval_record(0, 9.0)])
    assert plot(run) == 2
    assert "no training record" in capsys.readouterr().err


def test_tensorboard_gets_the_scalars(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    book = Logbook(tmp_path, enabled=True, wandb_mode="disabled", tensorboard=True)
    book.write(train_record(1, 4.0))
    book.write(eval_record(1, 3.5))
    book.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "val_loss", "tokens_per_source/a"} <= tags
    assert "step" not in tags
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(1, 4.0)]
    assert [(e.step, e.value) for e in events.Scalars("val_loss")] == [(1, 3.5)]
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") == 2


def test_tensorboard_without_the_package_fails_in_one_line(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import importlib.util

    validate_logging(LoggingConfig(tensorboard=True))  # installed here (tools/dev.py pins it)
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name)
    )
    with pytest.raises(ConfigError, match=r"^logging.tensorboard=true needs the tensorboard"):
        validate_logging(LoggingConfig(tensorboard=True))
    validate_logging(LoggingConfig())  # off: never looked for


def test_tensorboard_after_a_rewind_has_one_line(tmp_path: Path) -> None:
    """A rollback (or resume) to step 2 after steps 1-4 were written: TensorBoard keeps the
    first attempt's steps 1-2 and the second's 3-4, not both attempts' 3 and 4."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    book = Logbook(tmp_path, enabled=True, wandb_mode="disabled", tensorboard=True)
    for step in range(1, 5):
        book.write(train_record(step, 4.0 - step / 10))
    book.rewind(2)
    for step in (3, 4):
        book.write(train_record(step, 9.0 + step))
    book.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [
        (1, pytest.approx(3.9)), (2, pytest.approx(3.8)), (3, 12.0), (4, 13.0)
    ]  # fmt: skip
