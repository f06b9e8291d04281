"""data.document_mask under pipeline parallelism: the documents travel between stages with the
hidden states, and pp2 and tp2 x pp2 runs reproduce one process's losses with the mask (3 steps,
fp32, rel <= 1e-5): tied embeddings with full activation checkpointing, and a layer count not
divisible by pp with TP's pipe partitioning (h split over TP, the int64 documents sent whole)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megalite.config import Config
from megalite.launch import launch
from megalite.model.llama import Llama
from megalite.parallel.build import data_eod_id
from tests.helpers import short_job, train_losses
from tests.train import test_parity

STEPS = 3
CASES = {
    "pp2-tied-full-ac": [
        "parallel.pp=2",
        "model.tie_embeddings=true",
        "parallel.activation_checkpointing=full",
    ],
    "tp2-pp2-3-layers-selective-ac": [
        "parallel.tp=2",
        "parallel.pp=2",
        "model.n_layers=3",
        "parallel.activation_checkpointing=selective",
    ],
}


def job_config(data: Path, run_dir: Path, *extra: str, mask: bool = True) -> Config:
    """dp=1, 4 micro-batches of 2 per step (global batch 8), clipping active."""
    return short_job(
        data,
        run_dir,
        "parallel.dp=1",
        "parallel.zero_stage=1",
        f"data.document_mask={mask}",
        "optim.warmup_steps=1",
        "optim.grad_clip=0.5",
        *extra,
        steps=STEPS,
    )


def reference_losses(cfg: Config, data: Path, monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """test_parity's plain single-process loop, its model masking documents as `build_model`
    sets it up when `data.document_mask` is on."""
    eod = data_eod_id(cfg) if cfg.data.document_mask else None

    def model(*args, **kwargs) -> Llama:
        llama = Llama(*args, **kwargs)
        llama.document_eod = eod
        return llama

    with monkeypatch.context() as m:
        m.setattr(test_parity, "Llama", model)
        return test_parity.reference_losses(cfg, data)


@pytest.fixture(scope="module")
def runs(sample_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each case's megalite job, run once: case -> run folder."""
    out = {}
    for case, extra in CASES.items():
        folder = tmp_path_factory.mktemp(case)
        launch(job_config(sample_data, folder / "run", *extra), default_run_dir=folder / "unused")
        out[case] = folder / "run"
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_pipeline_with_documents_matches_single_process(
    case: str,
    runs: dict[str, Path],
    sample_data: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    got = train_losses(runs[case])
    want = reference_losses(
        job_config(sample_data, tmp_path, *CASES[case]), sample_data, monkeypatch
    )
    assert sorted(got) == list(range(1, STEPS + 1))
    torch.testing.assert_close(
        torch.tensor([got[s] for s in range(1, STEPS + 1)], dtype=torch.float64),
        torch.tensor(want, dtype=torch.float64),
        rtol=1e-5,
        atol=0,
    )


def test_the_mask_changes_the_losses(
    sample_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sample's 32-token windows hold several documents, so the parity above tests the mask."""
    extra = CASES["pp2-tied-full-ac"]
    masked = reference_losses(job_config(sample_data, tmp_path, *extra), sample_data, monkeypatch)
    plain = job_config(sample_data, tmp_path, *extra, mask=False)
    unmasked = reference_losses(plain, sample_data, monkeypatch)
    # 100x the parity's tolerance (at init the losses are all near ln(vocab): step 1 differs least)
    assert max(abs(a - b) / b for a, b in zip(masked, unmasked, strict=True)) > 1e-3
