"""ZeRO 0-3 on 2 gloo ranks reproduce a single-process plain-PyTorch AdamW run, step by step.

The megalite job runs end to end (launcher → spawned ranks → DeepSpeed → metrics.jsonl); the
reference is a plain loop in this process over the same model init and the same batches: the
concatenation of what each DP rank's stream yields for each step.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megalite.config import Config
from megalite.data.stream import TokenStream
from megalite.launch import launch
from megalite.model.llama import Llama, cross_entropy
from megalite.parallel.engine import build_optimizer
from megalite.parallel.schedule import build_scheduler
from tests.helpers import read_metrics, reference_step, short_job, train_losses

STEPS = 10


def job_config(data: Path, run_dir: Path, *extra: str) -> Config:
    """dp=2, 2 accumulation steps of micro-batch 2 (global batch 8), clipping active."""
    return short_job(
        data,
        run_dir,
        "parallel.dp=2",
        "optim.warmup_steps=3",
        "optim.grad_clip=0.5",
        *extra,
        steps=STEPS,
    )


def reference_losses(cfg: Config, data: Path) -> list[float]:
    """Plain PyTorch: one process, the whole global batch per step, torch AdamW, same schedule."""
    t, dp = cfg.trainer, cfg.parallel.dp
    model = Llama(cfg.model, seed=t.seed)
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, optim=cfg.optim, max_steps=t.max_steps)
    streams = [
        iter(
            TokenStream(
                data,
                "train",
                seq_len=t.seq_len,
                micro_batch_size=t.micro_batch_size,
                dp_rank=r,
                dp_size=dp,
                seed=t.seed,
            )
        )
        for r in range(dp)
    ]
    losses = []
    for _ in range(t.max_steps):
        batch = torch.cat([next(s) for s in streams for _ in range(cfg.grad_accum_steps)])
        loss = cross_entropy(model(batch[:, :-1]), batch[:, 1:])  # (global_batch, s)
        losses.append(reference_step(loss, model, opt, sched, grad_clip=cfg.optim.grad_clip))
    return losses


def assert_losses_close(got: dict[int, float], want: list[float], *, rtol: float) -> None:
    """megalite's logged losses for steps 1..STEPS against the reference's, step by step."""
    torch.testing.assert_close(
        torch.tensor([got[s] for s in range(1, STEPS + 1)], dtype=torch.float64),
        torch.tensor(want, dtype=torch.float64),
        rtol=rtol,
        atol=0,
    )


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_zero_matches_single_process(stage: int, sample_data: Path, tmp_path: Path) -> None:
    cfg = job_config(sample_data, tmp_path / "run", f"parallel.zero_stage={stage}")
    launch(cfg, default_run_dir=tmp_path / "unused")
    got = train_losses(tmp_path / "run")
    want = reference_losses(cfg, sample_data)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert_losses_close(got, want, rtol=1e-5)
    assert want[-1] < want[0]  # it trains
    # The host read device values twice per logged step (every step logs here): the judged loss
    # (with the stop flags, one all-reduce) and the line's grad norm (rank/host.py).
    assert {r["host_syncs"] for r in read_metrics(tmp_path / "run") if "loss" in r} == {2}


def test_bf16_tracks_fp32_reference(sample_data: Path, tmp_path: Path) -> None:
    """bf16 mixed precision (fp32 master weights in DeepSpeed) stays within bf16 rounding."""
    cfg = job_config(
        sample_data, tmp_path / "run", "parallel.zero_stage=2", "trainer.precision=bf16"
    )
    launch(cfg, default_run_dir=tmp_path / "unused")
    got = train_losses(tmp_path / "run")
    want = reference_losses(job_config(sample_data, tmp_path / "ref"), sample_data)
    torch.testing.assert_close(
        torch.tensor([got[s] for s in range(1, STEPS + 1)], dtype=torch.float64),
        torch.tensor(want, dtype=torch.float64),
        rtol=2e-2,
        atol=0,
    )


@pytest.mark.parametrize(
    "stage,sp", [(1, False), (2, True)], ids=["tp2-dp2-zero1", "tp2-dp2-zero2-sp"]
)
def test_tp_with_zero_matches_single_process(
    stage: int, sp: bool, sample_data: Path, tmp_path: Path
) -> None:
    """4 processes: TP inside each DP replica, ZeRO over the DP group only."""
    cfg = job_config(
        sample_data,
        tmp_path / "run",
        "parallel.tp=2",
        f"parallel.zero_stage={stage}",
        f"parallel.sequence_parallel={sp}",
    )
    launch(cfg, default_run_dir=tmp_path / "unused")
    got = train_losses(tmp_path / "run")
    want = reference_losses(cfg, sample_data)
    assert_losses_close(got, want, rtol=1e-5)
