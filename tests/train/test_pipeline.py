"""Pipeline and full 3D parallelism reproduce the single-process run: 10 steps, fp32, rel ≤ 1e-5,
tied and untied embeddings, a layer count not divisible by pp, activation checkpointing on."""

from __future__ import annotations

from pathlib import Path

import pytest

from megalite.launch import launch
from tests.helpers import train_losses
from tests.train.test_parity import STEPS, assert_losses_close, job_config, reference_losses

CASES = {
    "pp4-tied-full-ac": [
        "parallel.pp=4",
        "parallel.dp=1",
        "model.tie_embeddings=true",
        "parallel.activation_checkpointing=full",
    ],
    "tp2-pp2-3-layers-sp-selective-ac": [
        "parallel.tp=2",
        "parallel.pp=2",
        "parallel.dp=1",
        "model.n_layers=3",
        "parallel.sequence_parallel=true",
        "parallel.activation_checkpointing=selective",
    ],
    "tp2-pp2-dp2-tied-parameters": [
        "parallel.tp=2",
        "parallel.pp=2",
        "model.tie_embeddings=true",
        "parallel.pipeline_partition=parameters",
    ],
}


@pytest.mark.parametrize("case", list(CASES))
def test_pipeline_matches_single_process(case: str, sample_data: Path, tmp_path: Path) -> None:
    cfg = job_config(sample_data, tmp_path / "run", "parallel.zero_stage=1", *CASES[case])
    launch(cfg, default_run_dir=tmp_path / "unused")
    got = train_losses(tmp_path / "run")
    want = reference_losses(cfg, sample_data)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert_losses_close(got, want, rtol=1e-5)
