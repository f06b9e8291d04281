"""`launch/pretrain.py` started by torchrun runs as one rank of torchrun's world (no own spawn)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from megalite.checkpoint import store
from tests.helpers import ROOT, read_metrics


def test_torchrun_two_ranks(sample_data: Path, tmp_path: Path) -> None:
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
        "launch/pretrain.py", "model=tiny", f"data.path={sample_data}", "parallel.dp=2",
        "parallel.zero_stage=3", "trainer.max_steps=3", "trainer.seq_len=32",
        "trainer.micro_batch_size=2", "trainer.global_batch_size=4", "trainer.log_interval=1",
        "trainer.eval_steps=1", "logging.wandb.mode=disabled", f"trainer.run_dir={tmp_path}",
    ]  # fmt: skip
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert [r["step"] for r in read_metrics(tmp_path) if "loss" in r] == [1, 2, 3]
    ckpt = store.latest(tmp_path / "checkpoints")
    assert store.read_meta(ckpt)["layout"] == {"tp": 1, "pp": 1, "dp": 2}
    assert {p.name for p in (tmp_path / "logs").iterdir()} == {"rank_00000.log", "rank_00001.log"}
