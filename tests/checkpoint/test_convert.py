"""Reading checkpoints of any layout as the plain model's tensors, and the Hugging Face export.

The same 2 training steps in three layouts — (tp, pp, dp) = (1, 1, 1) with ZeRO 0, (2, 1, 2) with
ZeRO 2 and sequence parallelism, (2, 2, 2) with ZeRO 1 (the shared `run_3d`, see conftest.py) —
must read back as the same full weights and Adam moments (fp32 parity, as the losses); `to-hf` of
any of them loads in `transformers` with megalite's logits.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megalite.checkpoint import store
from megalite.checkpoint.cli import main as convert_main
from megalite.checkpoint.hf import export_hf, narrow
from megalite.checkpoint.reader import CheckpointReader
from megalite.checkpoint.store import CheckpointError
from megalite.model.llama import Llama
from tests.checkpoint.conftest import HALF, train
from tests.helpers import ROOT

LAYOUTS = {
    "1x1x1": ["parallel.dp=1", "parallel.zero_stage=0"],
    "2x1x2-zero2-sp": [
        "parallel.tp=2",
        "parallel.dp=2",
        "parallel.zero_stage=2",
        "parallel.sequence_parallel=true",
    ],
}


def half_run(data: Path, run_dir: Path, *extra: str) -> Path:
    """The checkpoint of step HALF of the shared schedule (the run stops there)."""
    train(data, run_dir, *extra, f"trainer.stop_at_step={HALF}")
    return store.latest(run_dir / "checkpoints")


@pytest.fixture(scope="module")
def checkpoints(
    sample_data: Path, run_3d: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("layouts")
    found = {name: half_run(sample_data, root / name, *extra) for name, extra in LAYOUTS.items()}
    return {**found, "2x2x2": run_3d / "checkpoints" / store.step_name(HALF)}


@pytest.mark.parametrize("kind", ["param", "exp_avg", "exp_avg_sq"])
def test_every_layout_reads_as_the_same_tensors(checkpoints: dict[str, Path], kind: str) -> None:
    readers = {name: CheckpointReader(path) for name, path in checkpoints.items()}
    want = dict(readers["1x1x1"].tensors(kind))
    assert list(want) == [
        n for n, _ in Llama(readers["1x1x1"].model, device="meta").named_parameters()
    ]
    for name, reader in readers.items():
        assert reader.step_count() == HALF
        got = dict(reader.tensors(kind))
        assert list(got) == list(want), name
        for tensor_name, t in want.items():
            scale = t.abs().max().clamp(min=1e-30)
            torch.testing.assert_close(
                got[tensor_name] / scale, t / scale, rtol=0, atol=1e-4, msg=f"{name} {tensor_name}"
            )


@pytest.mark.parametrize("layout", ["1x1x1", "2x2x2"])
def test_to_hf_logits_match(checkpoints: dict[str, Path], layout: str, tmp_path: Path) -> None:
    from transformers import LlamaForCausalLM

    reader = CheckpointReader(checkpoints[layout])
    assert convert_main(["to-hf", "--src", str(reader.path), "--dst", str(tmp_path / "hf"),
                         "--quiet"]) == 0  # fmt: skip
    hf = LlamaForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    model = Llama(reader.model)
    model.load_state_dict(dict(reader.tensors()), strict=True)
    tokens = torch.randint(
        0, reader.model.vocab_size, (3, 24), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        diff = (hf(tokens).logits - model(tokens)).abs().max()
    assert diff <= 1e-4
    assert (tmp_path / "hf" / "tokenizer.json").is_file()
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["num_key_value_heads"] == 2 and config["tie_word_embeddings"] is False


def test_tied_pipeline_export(sample_data: Path, tmp_path: Path) -> None:
    from transformers import LlamaForCausalLM

    ckpt = half_run(sample_data, tmp_path / "run", "parallel.pp=2", "model.tie_embeddings=true")
    export_hf(ckpt, tmp_path / "hf", dtype="bf16", progress=False, max_shard_bytes=2**20)
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert "lm_head.weight" not in index["weight_map"]  # tied: the embedding serves as head
    hf = LlamaForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    reader = CheckpointReader(ckpt)
    model = Llama(reader.model)
    model.load_state_dict({n: t.bfloat16().float() for n, t in reader.tensors()}, strict=False)
    tokens = torch.randint(0, reader.model.vocab_size, (2, 16))
    with torch.no_grad():
        assert (hf(tokens).logits - model(tokens)).abs().max() <= 1e-4


def test_bad_inputs(checkpoints: dict[str, Path], tmp_path: Path, capsys) -> None:
    with pytest.raises(CheckpointError, match="beyond torch.float16"):
        narrow("w", torch.tensor([1e6]), torch.float16)
    assert convert_main(["to-hf", "--src", str(checkpoints["1x1x1"]), "--dst", str(tmp_path)]) == 2
    assert "exists" in capsys.readouterr().err
    damaged = tmp_path / "damaged"
    import shutil

    shutil.copytree(checkpoints["2x2x2"], damaged)
    victim = sorted(damaged.glob("zero_pp_rank_1_*"))[0]
    victim.write_bytes(victim.read_bytes()[:100])
    assert convert_main(["inspect", str(damaged)]) == 2
    assert f"file {victim.name} has 100 bytes" in capsys.readouterr().err


def test_inspect_prints_no_deepspeed_noise(run_3d: Path) -> None:
    """`tools/convert.py inspect` of a ZeRO checkpoint (reading it imports DeepSpeed) with
    DS_ACCELERATOR unset: no DeepSpeed log line (its accelerator detection's) in the table."""
    ckpt = run_3d / "checkpoints" / store.step_name(HALF)
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    done = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "convert.py"), "inspect", str(ckpt)],
        capture_output=True, text=True, env=env, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "[WARNING]" not in done.stdout + done.stderr
    lines = done.stdout.splitlines()
    header = next(i for i, ln in enumerate(lines) if ln.startswith("tensor "))
    rows = lines[header + 1 : -1]  # then the total
    assert rows and all(re.fullmatch(r"[\w.]+ +\([\d, ]*\) +[\d.]+", row) for row in rows)
