"""`data=mixture` from the command line: the realised mixture in metrics.jsonl at every eval, and
a run resumed mid-way (with loader workers) continues with exactly the batches of the straight run.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from megalite.data.prepare import prepare
from tests.data.datagen import make_texts, write_txt
from tests.helpers import ROOT, read_metrics, short_job_overrides, train_losses


@pytest.fixture(scope="module")
def second_source(sample_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    src = write_txt(tmp_path_factory.mktemp("mix_src") / "t.txt", make_texts(300, seed=11))
    out = tmp_path_factory.mktemp("mix_data")
    prepare([src], out, tokenizer=sample_data / "tokenizer.json", val_fraction=0.1)
    return out


def pretrain(run_dir: Path, sources: str, *overrides: str) -> subprocess.CompletedProcess:
    args = [
        a
        for a in short_job_overrides(Path("unused"), run_dir, *overrides, steps=4)
        if not a.startswith("data.path=")
    ]
    cmd = [sys.executable, "launch/pretrain.py", "data=mixture", f"data.sources={sources}", *args]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    return out


def test_mixture_run_logs_proportions_and_resumes_exactly(
    sample_data: Path, second_source: Path, tmp_path: Path
) -> None:
    sources = f"[{{path: {sample_data}, weight: 3, name: plays}}, {{path: {second_source}}}]"
    straight = tmp_path / "straight"
    out = pretrain(straight, sources, "trainer.eval_interval=2", "trainer.save_interval=2")
    assert "weights sum to 4: normalised" in out.stderr + out.stdout
    assert "| mix plays " in out.stderr + out.stdout
    evals = [r for r in read_metrics(straight) if "val_loss" in r]
    assert [r["step"] for r in evals] == [0, 2, 4]
    for r in evals:
        seen = r["tokens_per_source"]
        assert set(seen) == {"plays", second_source.name} and sum(seen.values()) == r["tokens"]
    assert (
        evals[-1]["tokens_per_source"]["plays"] > evals[-1]["tokens_per_source"][second_source.name]
    )

    resumed = tmp_path / "resumed"
    ckpt = straight / "checkpoints" / "step_00000002"
    pretrain(resumed, sources, f"trainer.resume={ckpt}", "data.workers=2")
    want = train_losses(straight)
    assert train_losses(resumed) == {3: want[3], 4: want[4]}
