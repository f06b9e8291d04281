"""`trainer.compile=true` (torch.compile of each block) trains exactly like eager (fp32)."""

from __future__ import annotations

from pathlib import Path

import torch

from megalite.launch import launch
from tests.helpers import short_job, train_losses


def test_compile_changes_no_loss(sample_data: Path, tmp_path: Path) -> None:
    losses = {}
    for mode in ("false", "true"):
        run_dir = tmp_path / mode
        launch(
            short_job(sample_data, run_dir, "model.n_layers=2", f"trainer.compile={mode}", steps=3),
            default_run_dir=run_dir,
        )
        losses[mode] = train_losses(run_dir)
    assert sorted(losses["true"]) == [1, 2, 3]
    torch.testing.assert_close(
        torch.tensor([losses["true"][s] for s in (1, 2, 3)], dtype=torch.float64),
        torch.tensor([losses["false"][s] for s in (1, 2, 3)], dtype=torch.float64),
        rtol=1e-5,
        atol=0,
    )
    log = (tmp_path / "true" / "logs" / "rank_00000.log").read_text()
    assert "torch.compile: each of the 2 transformer blocks" in log
