"""Exact resume: a run resumed from step N of a 2N-step run continues it bit for bit (fp32; dp=2
ZeRO 2 and TP+SP layouts; tp × pp × dp = 2 × 2 × 2 in tests/checkpoint/test_reshard.py), and a
checkpoint folder on disk holds what the design says."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from megalite.checkpoint import store
from megalite.launch import launch
from tests.helpers import read_metrics, short_job, train_losses

N = 4


def run(data: Path, run_dir: Path, *extra: str) -> None:
    cfg = short_job(
        data,
        run_dir,
        "parallel.dp=2",
        "parallel.zero_stage=2",
        "trainer.eval_steps=2",
        "optim.warmup_steps=2",
        *extra,
        steps=2 * N,
    )
    launch(cfg, default_run_dir=run_dir)


LAYOUTS = {
    "dp2-zero2": (),
    "tp2-dp2-zero1-sp": (
        "parallel.tp=2",
        "parallel.zero_stage=1",
        "parallel.sequence_parallel=true",
    ),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_resume_is_bit_identical(layout: str, sample_data: Path, tmp_path: Path) -> None:
    """2N steps straight, saving at step N; a run resumed from that checkpoint trains steps
    N+1..2N with the straight run's losses, bit for bit."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run(sample_data, straight, *LAYOUTS[layout], f"trainer.save_interval={N}")
    ckpt = straight / "checkpoints" / store.step_name(N)
    meta = store.read_meta(ckpt)
    if "parallel.tp=2" in LAYOUTS[layout]:
        sp = "parallel.sequence_parallel=true" in LAYOUTS[layout]
        assert meta["layout"]["tp"] == 2 and meta["sequence_parallel"] == sp
        assert meta["tp_shards"]["layers.0.mlp.w3.weight"]["kind"] == "gate_up"
        assert {"embed.weight", "layers.1.attn.wk.weight"} <= set(meta["tp_shards"])
        assert {"mp_rank_00_model_states.pt", "mp_rank_01_model_states.pt"} <= set(meta["files"])
    run(sample_data, resumed, *LAYOUTS[layout], f"trainer.resume={ckpt}")

    want, got = train_losses(straight), train_losses(resumed)
    assert sorted(want) == list(range(1, 2 * N + 1))
    assert sorted(got) == list(range(N + 1, 2 * N + 1))
    assert [got[s] for s in sorted(got)] == [want[s] for s in sorted(got)]  # bit-identical
    final_val = [r["val_loss"] for r in read_metrics(straight) if "val_loss" in r][-1]
    assert [r["val_loss"] for r in read_metrics(resumed) if "val_loss" in r][-1] == final_val


def test_checkpoint_contents(sample_data: Path, tmp_path: Path) -> None:
    run(sample_data, tmp_path, f"trainer.stop_at_step={N}")
    ckpt = store.latest(tmp_path / "checkpoints")
    meta = json.loads((ckpt / store.META).read_text())
    assert meta["step"] == N
    assert meta["consumed_tokens"] == N * 8 * 32
    assert meta["layout"] == {"tp": 1, "pp": 1, "dp": 2} and meta["tp_shards"] == {}
    assert meta["model"]["dim"] > 0 and meta["config"]["parallel"]["zero_stage"] == 2
    assert {"rank_00000.pt", "rank_00001.pt"} <= set(meta["files"])
    assert any("optim_states" in f for f in meta["files"])
    assert not list((tmp_path / "checkpoints").glob(store.TMP_PREFIX + "*"))
    assert (tmp_path / "config.yaml").is_file()
