"""Every config composes; every bad input fails before a process starts, with one clear line."""

from __future__ import annotations

import dataclasses
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megalite.checkpoint.store import CheckpointError
from megalite.config import ConfigError, TrainerConfig, doubtful
from megalite.data.errors import DataError
from megalite.launch import check_overrides, prepare_run
from tests.helpers import CONF, ROOT, compose_config, run_python

GROUPS = ["model", "data", "parallel", "optim", "trainer", "logging", "kernels"]


@pytest.mark.parametrize(
    "group,option",
    [(g, p.stem) for g in GROUPS for p in sorted((CONF / g).glob("*.yaml"))],
)
def test_every_config_composes(group: str, option: str) -> None:
    cfg = compose_config([f"{group}={option}"])
    assert cfg.model.dim > 0 and cfg.trainer.max_steps > 0


def test_typo_fails_at_composition() -> None:
    with pytest.raises(Exception, match="max_stepz"):
        compose_config(["trainer.max_stepz=3"])
    with pytest.raises(ConfigError, match="unknown config key.*trainer.max_stepz"):
        compose_config(["+trainer.max_stepz=3"])
    with pytest.raises(Exception, match="max_steps"):
        compose_config(["trainer.max_steps=abc"])


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["model.n_heads=3"], "not divisible by model.n_heads=3"),
        (["parallel.tp=3"], "model.n_heads=4 is not divisible by parallel.tp=3"),
        (
            ["model.dim=192", "model.n_heads=12", "model.n_kv_heads=4", "parallel.tp=6"],
            "model.n_kv_heads=4 and parallel.tp=6 must divide one another",
        ),
        (["parallel.zero_stage=4"], "is not a ZeRO stage"),
        (["parallel.sequence_parallel=true"], "needs parallel.tp > 1"),
        (
            ["parallel.tp=2", "parallel.sequence_parallel=true", "trainer.seq_len=255"],
            "trainer.seq_len=255 is not divisible by parallel.tp=2, which sequence parallelism",
        ),
        (["parallel.tp=4", "model.ffn_dim=390"], "model.ffn_dim=390 is not divisible"),
        (["parallel.pp=8"], "parallel.pp=8 exceeds model.n_layers=4"),
        (["parallel.pipeline_partition=random"], "use uniform or parameters"),
        (["parallel.activation_checkpointing=some"], "use none, full or selective"),
        (
            ["parallel.dp=3", "trainer.global_batch_size=8", "trainer.micro_batch_size=2"],
            "not divisible by micro_batch_size x dp = 2 x 3 = 6",
        ),
        (["parallel.pp=2", "parallel.zero_stage=2"], "cannot run with pipeline parallelism"),
        (["trainer.precision=fp16"], "use fp32 or bf16"),
        (["trainer.anomaly=ignore"], "use halt, skip or rollback"),
        (["trainer.max_skips=-1"], "trainer.max_skips=-1 must be >= 0"),
        (["data.path=/nonexistent/megalite"], "does not exist"),
        (["data=mixture"], "data=mixture needs data.sources="),
        (
            ["data.path=/tmp", "data.sources=[{path: /tmp}]"],
            "data.path and data.sources are both set",
        ),
        (["data.sources=[{path: /tmp, weight: -1}]"], "has weight -1.0: weights are ≥ 0"),
        (["data.sources=[{path: /nonexistent/a}]"], "data path /nonexistent/a does not exist"),
        (["data.workers=-1"], "data.workers=-1 must be >= 0"),
        (["optim.min_lr=1.0"], "optim.min_lr"),
        (["+cluster=slurm"], "1 x 8 = 8 ranks but tp x pp x dp = 1 x 1 x 1 = 1: set parallel.dp=8"),
        (
            ["+cluster=slurm", "cluster.nodes=2", "parallel.tp=4", "parallel.dp=2"],
            "2 x 8 = 16 ranks but tp x pp x dp = 4 x 1 x 2 = 8: set parallel.dp=4",
        ),
        (
            ["+cluster=slurm", "cluster.gpus_per_node=4", "cluster.tasks_per_node=2"],
            "megalite runs one task per GPU",
        ),
        (["+cluster=slurm", "cluster.gpus_per_node=0", "cluster.time=2-x"], "cluster.time='2-x'"),
    ],
)
def test_bad_config_is_refused(overrides: list[str], message: str, tmp_path: Path) -> None:
    cfg = compose_config(overrides)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")) as e:
        prepare_run(cfg, run_dir=tmp_path, world_size=None)
    assert "\n" not in str(e.value)


def test_world_size_mismatch(tmp_path: Path) -> None:
    cfg = compose_config(["parallel.dp=2", "trainer.global_batch_size=16"])
    with pytest.raises(ConfigError, match=r"world size 3 != tp x pp x dp = 1 x 1 x 2 = 2"):
        prepare_run(cfg, run_dir=tmp_path, world_size=3)


def test_folder_without_shards(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    cfg = compose_config([f"data.path={tmp_path / 'empty'}"])
    with pytest.raises(DataError, match="prepare_data"):
        prepare_run(cfg, run_dir=tmp_path / "run", world_size=None)


def test_tokenizer_larger_than_model(sample_data: Path, tmp_path: Path) -> None:
    cfg = compose_config([f"data.path={sample_data}", "model.vocab_size=256"])
    with pytest.raises(ConfigError, match="tokens but model.vocab_size=256"):
        prepare_run(cfg, run_dir=tmp_path, world_size=None)


def test_resume_pointing_at_nothing(tmp_path: Path) -> None:
    cfg = compose_config([f"trainer.resume={tmp_path / 'nothing'}"])
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        prepare_run(cfg, run_dir=tmp_path, world_size=None)


def test_cli_prints_one_line_and_exits_2(tmp_path: Path) -> None:
    """Through the real entry point, as a user types it, under a torchrun-like environment."""
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "3", "LOCAL_RANK": "0"}
    out = run_python(
        "launch/pretrain.py",
        "parallel.dp=2",
        "trainer.global_batch_size=16",
        f"trainer.run_dir={tmp_path}",
        env=env,
        timeout=120,
    )
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().splitlines() == [
        "error: world size 3 != tp x pp x dp = 1 x 1 x 2 = 2: set parallel.dp=3 "
        "or start that many processes"
    ]


@pytest.mark.parametrize(
    "argv,line",
    [
        (["trainer.max_step=5"], "unknown config key trainer.max_step (did you mean trainer.max_"),
        (["+trainer.max_step=5"], "unknown config key trainer.max_step (did you mean"),
        (["trainr.seed=1"], "unknown config key trainr.seed (did you mean trainer?)"),
        (["model=tni"], "model=tni: no such option; model options: 125m, 13b,"),
        (["model=model_schema"], "model=model_schema: no such option"),
        (["-m", "model=tiny,7bb"], "model=7bb: no such option (did you mean 7b?)"),
        (["+cluster=slurmm"], "cluster=slurmm: no such option (did you mean slurm?)"),
        (["trainer.seed=[1"], "no viable alternative at input '[1'"),
    ],
)  # fmt: skip
def test_a_bad_override_is_one_line(argv: list[str], line: str) -> None:
    with pytest.raises(ConfigError) as e:
        check_overrides(argv)
    assert line in str(e.value) and "\n" not in str(e.value)
    assert "model_schema" not in str(e.value).partition("options:")[2]


def test_good_overrides_pass() -> None:
    check_overrides(["-m", "model=tiny,125m", "optim.lr=1e-3,3e-4", "+cluster=slurm",
                     "cluster.sbatch_extra={a: b}", "data.sources=[{path: x}]", "~trainer.seed",
                     "--config-name", "pretrain", "hydra.run.dir=x"])  # fmt: skip


def test_cli_typo_and_no_run_dir(tmp_path: Path) -> None:
    """As a user types them: a misspelt key is one line, exit 2 (not Hydra's block, exit 1); with
    no trainer.run_dir Hydra's dated folder is the run folder (composition reaches our checks)."""
    pretrain = [sys.executable, str(ROOT / "launch/pretrain.py")]
    typo = subprocess.run([*pretrain, "trainer.max_step=5"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert typo.returncode == 2, typo.stderr
    assert typo.stderr.strip().splitlines() == [
        "error: unknown config key trainer.max_step (did you mean trainer.max_steps?); keys of "
        f"trainer: {', '.join(f.name for f in dataclasses.fields(TrainerConfig))}"
    ]
    bare = subprocess.run([*pretrain, "parallel.tp=3"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert bare.returncode == 2, bare.stderr
    assert bare.stderr.strip().splitlines() == [
        "error: model.n_heads=4 is not divisible by parallel.tp=3: use a tp that divides 4"
    ]
    assert [p.name for p in tmp_path.iterdir()] == ["outputs"]


@pytest.mark.parametrize("previous", ["metrics.jsonl", "checkpoints/step_00000002/meta.json"])
def test_a_fresh_start_never_mixes_with_a_previous_run(
    sample_data: Path, tmp_path: Path, previous: str
) -> None:
    (tmp_path / previous).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / previous).write_text("{}")
    cfg = compose_config([f"data.path={sample_data}"])
    with pytest.raises(ConfigError) as e:
        prepare_run(cfg, run_dir=tmp_path, world_size=None)
    assert str(e.value) == (
        f"trainer.run_dir={tmp_path} holds a previous run ({previous.split('/')[0]}): continue it "
        "with trainer.resume=auto, or start afresh with a new trainer.run_dir"
    )


def test_warmup_longer_than_the_run_is_warned(
    sample_data: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = compose_config([f"data.path={sample_data}", "trainer.max_steps=60"])
    with caplog.at_level(logging.WARNING, logger="megalite"):
        prepare_run(cfg, run_dir=tmp_path, world_size=None)
    assert "optim.warmup_steps=100 is longer than trainer.max_steps=60" in caplog.text
    assert not doubtful(compose_config(["trainer.max_steps=60", "optim.warmup_steps=60"]))


@pytest.mark.parametrize(
    "time,minutes",
    [("90", 90), ("30:00", 30), ("01:30:00", 90), ("2-00:00:00", 2880), ("1-2", 1560), ("0:30", 1)],
)
def test_slurm_time_formats(time: str, minutes: int) -> None:
    from megalite.config import slurm_minutes

    assert slurm_minutes(time) == minutes
