"""Resharding: train tp=2 × pp=2 × dp=2, reshard to another layout, resume: the losses are the
uninterrupted run's (fp32, rel ≤ 1e-5), optimizer state and data position included."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megalite.checkpoint import store
from megalite.checkpoint.cli import main as convert_main
from megalite.checkpoint.reader import CheckpointReader
from megalite.checkpoint.universal import load_universal  # noqa: F401  (public entry point)
from megalite.cluster.launch import launch
from tests.helpers import short_job, train_losses

N = 2
SOURCE = ["parallel.tp=2", "parallel.pp=2", "parallel.dp=2", "parallel.zero_stage=1"]


def run(data: Path, run_dir: Path, *extra: str) -> None:
    launch(
        short_job(data, run_dir, "optim.warmup_steps=1", *extra, steps=2 * N),
        default_run_dir=run_dir,
    )


@pytest.fixture(scope="module")
def source(sample_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("reshard")
    run(sample_data, root / "straight", *SOURCE)
    run(sample_data, root / "first", *SOURCE, f"trainer.stop_at_step={N}")
    return {"straight": root / "straight", "ckpt": store.latest(root / "first" / "checkpoints")}


@pytest.mark.parametrize("tp,pp,dp", [(1, 1, 1), (1, 2, 4)])
def test_resume_on_new_layout(
    source: dict[str, Path], sample_data: Path, tmp_path: Path, tp: int, pp: int, dp: int
) -> None:
    dst = tmp_path / "resharded"
    args = ["reshard", "--src", str(source["ckpt"]), "--dst", str(dst), "--quiet"]
    assert convert_main([*args, f"--tp={tp}", f"--pp={pp}", f"--dp={dp}"]) == 0
    layout = [f"parallel.tp={tp}", f"parallel.pp={pp}", f"parallel.dp={dp}"]
    run(sample_data, tmp_path / "run", *layout, "parallel.zero_stage=1", f"trainer.resume={dst}")
    want, got = train_losses(source["straight"]), train_losses(tmp_path / "run")
    assert sorted(got) == list(range(N + 1, 2 * N + 1))
    torch.testing.assert_close(
        torch.tensor([got[s] for s in sorted(got)], dtype=torch.float64),
        torch.tensor([want[s] for s in sorted(got)], dtype=torch.float64),
        rtol=1e-5,
        atol=0,
    )


def test_reshard_round_trip_is_exact(source: dict[str, Path], tmp_path: Path) -> None:
    """A → universal → (loaded into layout B, trained 0 steps, saved) reads back bit-identically."""
    original = CheckpointReader(source["ckpt"])
    dst = tmp_path / "u"
    assert convert_main(["reshard", "--src", str(source["ckpt"]), "--dst", str(dst),
                         "--tp=1", "--pp=1", "--quiet"]) == 0  # fmt: skip
    from megalite.checkpoint.universal import _read

    for kind in ("param", "exp_avg", "exp_avg_sq"):
        for name, t in original.tensors(kind):
            assert torch.equal(_read(dst, name, kind), t), (kind, name)


def test_reshard_refuses_impossible_layouts(
    source: dict[str, Path], tmp_path: Path, capsys
) -> None:
    args = ["reshard", "--src", str(source["ckpt"]), "--dst", str(tmp_path / "x"), "--quiet"]
    assert convert_main([*args, "--tp=3", "--pp=1"]) == 2
    assert "cannot take tp=3" in capsys.readouterr().err
    assert convert_main([*args, "--tp=1", "--pp=8"]) == 2
    assert "exceeds model.n_layers" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
