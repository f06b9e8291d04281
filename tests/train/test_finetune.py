"""The fine-tuning path as a user types it: a random Hugging Face Llama with a tokenizer built
locally → `convert.py from-hf` → `prepare_data.py --format chat` with the checkpoint's tokenizer →
`trainer.init_from` training at tp=2 x pp=2 → `convert.py to-hf` → `transformers` loads the folder
and generates. And without training, HF → megalite → HF is exact in logits, through a layout-free
checkpoint and through a native tp=2 x pp=2 one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from megalite.checkpoint import store
from megalite.checkpoint.cli import main as convert_main
from megalite.data.cli import main as prepare_main
from megalite.launch import launch
from tests.helpers import ROOT, compose_config, read_metrics, save_hf

SEQ = 32
EOS = "<|endoftext|>"  # the bundled sample tokenizer's end of document
TP2_PP2 = ["parallel.tp=2", "parallel.pp=2"]


@pytest.fixture(scope="module")
def base(sample_data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A Hugging Face folder (random weights, a local tokenizer with its EOS named) and the
    megalite checkpoint `from-hf` makes of it."""
    hf = tmp_path_factory.mktemp("hf-base")
    save_hf(hf, tokenizer=sample_data / "tokenizer.json")
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOS}
    (hf / "tokenizer_config.json").write_text(json.dumps(config))
    ckpt = hf.parent / "base-megalite"
    assert convert_main(["from-hf", "--src", str(hf), "--dst", str(ckpt), "--quiet"]) == 0
    return hf, ckpt


def chats(folder: Path, n: int) -> Path:
    """`n` two-turn chats from Shakespeare's lines, as jsonl."""
    text = (ROOT.parent / "shared" / "data" / "tinyshakespeare.txt").read_text()
    lines = [line for line in text.splitlines() if len(line) > 20][: 2 * n]
    path = folder / "chats.jsonl"
    with path.open("w") as f:
        for question, answer in zip(lines[::2], lines[1::2], strict=True):
            turns = [
                {"role": "user", "content": question},
                {"role": "assistant", "content": answer},
            ]
            f.write(json.dumps({"messages": turns}) + "\n")
    return path


def job(data: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        f"data.path={data}", f"trainer.seq_len={SEQ}", "trainer.micro_batch_size=2",
        "trainer.global_batch_size=4", "trainer.log_interval=1", "trainer.eval_interval=0",
        "trainer.eval_steps=1", "trainer.save_interval=0", "optim.lr=1e-3",
        "optim.warmup_steps=1", "logging.wandb.mode=disabled", f"trainer.run_dir={run_dir}",
        *TP2_PP2, *extra,
    ]  # fmt: skip


def test_hf_to_chat_sft_to_hf(base: tuple[Path, Path], tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, ckpt = base
    data = tmp_path / "chat-data"
    args = ["--format", "chat", "--input", str(chats(tmp_path, 60)), "--tokenizer", str(ckpt)]
    assert prepare_main([*args, "--output", str(data), "--seq-len", str(SEQ)]) == 0
    run_dir = tmp_path / "sft"
    cfg = compose_config(job(data, run_dir, f"trainer.init_from={ckpt}", "trainer.max_steps=3"))
    launch(cfg, default_run_dir=run_dir)
    steps = [r for r in read_metrics(run_dir) if "loss" in r and "step" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert all(0 < r["trained_tokens"] < 4 * SEQ for r in steps)  # the prompts are not trained
    final = store.latest(run_dir / "checkpoints")
    assert final is not None and store.read_meta(final)["step"] == 3
    out = tmp_path / "hf-chat"
    assert convert_main(["to-hf", "--src", str(final), "--dst", str(out), "--quiet"]) == 0
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    prompt = tokenizer("<|user|>\nWhat light through yonder window breaks?\n<|assistant|>\n")
    ids = torch.tensor([prompt["input_ids"]])
    generated = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert generated.shape[1] > ids.shape[1]
    assert tokenizer.eos_token == EOS


@pytest.mark.parametrize("layout", ["layout-free", "tp2-pp2"])
def test_hf_round_trip_is_exact(
    base: tuple[Path, Path], sample_data: Path, tmp_path: Path, layout: str
) -> None:
    """The logits of HF → megalite → HF equal the original's (fp32, no step trained)."""
    from transformers import AutoModelForCausalLM

    hf, ckpt = base
    if layout == "tp2-pp2":  # a native checkpoint of the layout, written without a step
        run_dir = tmp_path / "native"
        overrides = job(sample_data, run_dir, f"trainer.init_from={hf}", "trainer.max_steps=1")
        launch(compose_config([*overrides, "trainer.stop_at_step=0"]), default_run_dir=run_dir)
        ckpt = store.latest(run_dir / "checkpoints")
        assert ckpt is not None and store.read_meta(ckpt)["layout"] == {"tp": 2, "pp": 2, "dp": 1}
    out = tmp_path / "hf-back"
    assert convert_main(["to-hf", "--src", str(ckpt), "--dst", str(out), "--quiet"]) == 0
    original = AutoModelForCausalLM.from_pretrained(hf).eval()
    back = AutoModelForCausalLM.from_pretrained(out).eval()
    tokens = torch.randint(0, original.config.vocab_size, (2, 24), generator=torch.Generator())
    with torch.no_grad():
        want, got = original(tokens).logits, back(tokens).logits
    assert (got - want).abs().max().item() <= 1e-5
