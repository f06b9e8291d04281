"""Generation: a random Hugging Face Llama (built locally, nothing downloaded), read directly,
through its `from-hf` checkpoint and through a native tp=2 x pp=2 run's, gives `transformers`'
greedy tokens exactly — with and without the KV cache, alone and batched with prompts of other
lengths; sampling follows its seed; the CLI prints continuations, and refuses bad requests in one
line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from megalite.checkpoint import store
from megalite.checkpoint.cli import main as convert_main
from megalite.infer.cli import main as generate_main
from megalite.infer.generate import GenerateError, generate
from megalite.infer.load import load_model
from tests.helpers import save_hf

NEW = 12  # new tokens per prompt
PROMPT_LENGTHS = (3, 9, 5)  # batched together: left padding of 6, 0 and 4


@pytest.fixture(scope="module")
def models(
    sample_data: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[torch.nn.Module, Path, Path]:
    """(the transformers model, its folder, the `from-hf` checkpoint of it)."""
    hf_dir = tmp_path_factory.mktemp("hf")
    hf = save_hf(hf_dir, tokenizer=sample_data / "tokenizer.json")
    ckpt = hf_dir.parent / "megalite"
    assert convert_main(["from-hf", "--src", str(hf_dir), "--dst", str(ckpt), "--quiet"]) == 0
    return hf, hf_dir, ckpt


def prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(3)
    return [torch.randint(0, 4096, (n,), generator=g).tolist() for n in PROMPT_LENGTHS]


def hf_greedy(hf: torch.nn.Module, prompt: list[int], *, eos: int | None) -> list[int]:
    """transformers' greedy continuation of one prompt (stopping after its EOS, as ours)."""
    out = hf.generate(  # type: ignore[operator]
        torch.tensor([prompt]),
        attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        do_sample=False,
        max_new_tokens=NEW,
        eos_token_id=eos,
        pad_token_id=0,
    )
    return out[0, len(prompt) :].tolist()


@pytest.mark.parametrize("source", ["hf-folder", "from-hf"])
def test_greedy_equals_transformers(models: tuple, source: str) -> None:
    hf, hf_dir, ckpt = models
    loaded = load_model(hf_dir if source == "hf-folder" else ckpt)
    assert loaded.max_seq_len == 128 and not loaded.model.training
    tok = loaded.tokenizer
    assert tok is not None and tok.eos_id == 2  # the HF config's (LlamaConfig's default)
    stops = (tok.eos_id,)
    want = [hf_greedy(hf, p, eos=tok.eos_id) for p in prompts()]
    assert any(len(w) == NEW for w in want)
    batched = generate(loaded.model, prompts(), max_new_tokens=NEW, stop_ids=stops)
    assert batched == want
    alone = [generate(loaded.model, [p], max_new_tokens=NEW, stop_ids=stops)[0] for p in prompts()]
    assert alone == want
    full = generate(loaded.model, prompts(), max_new_tokens=NEW, stop_ids=stops, use_cache=False)
    assert full == want


def test_native_tp2_pp2_checkpoint(models: tuple, sample_data: Path, tmp_path: Path) -> None:
    """A run's native checkpoint (its data's tokenizer), named by the run folder."""
    from megalite.launch import launch
    from tests.helpers import compose_config

    hf, hf_dir, _ = models
    run_dir = tmp_path / "native"
    overrides = [
        f"data.path={sample_data}", "trainer.seq_len=32", "trainer.micro_batch_size=2",
        "trainer.global_batch_size=4", "trainer.eval_interval=0", "trainer.eval_steps=1",
        "trainer.save_interval=0", "logging.wandb.mode=disabled", f"trainer.run_dir={run_dir}",
        "parallel.tp=2", "parallel.pp=2", f"trainer.init_from={hf_dir}", "trainer.max_steps=1",
        "trainer.stop_at_step=0",
    ]  # fmt: skip
    launch(compose_config(overrides), default_run_dir=run_dir)
    ckpt = store.latest(run_dir / "checkpoints")
    assert ckpt is not None and store.read_meta(ckpt)["layout"] == {"tp": 2, "pp": 2, "dp": 1}
    loaded = load_model(run_dir)
    assert loaded.source == ckpt and loaded.tokenizer is not None
    eos = loaded.tokenizer.eos_id
    assert eos == loaded.tokenizer.encoder.eod_id  # the data's <|endoftext|>
    want = [hf_greedy(hf, p, eos=eos) for p in prompts()]
    assert generate(loaded.model, prompts(), max_new_tokens=NEW, stop_ids=(eos,)) == want


def test_sampling_follows_the_seed(models: tuple) -> None:
    loaded = load_model(models[2], tokenizer=False)
    assert loaded.tokenizer is None

    def sample(seed: int, **kw: object) -> list[list[int]]:
        return generate(loaded.model, prompts(), max_new_tokens=NEW, temperature=1.0,
                        seed=seed, **kw)  # type: ignore[arg-type]  # fmt: skip

    first = sample(7, top_k=50, top_p=0.9)
    assert sample(7, top_k=50, top_p=0.9) == first
    assert sample(8, top_k=50, top_p=0.9) != first
    assert sample(7) != sample(8)
    # A prompt's sample does not depend on the batch it runs in.
    alone = generate(loaded.model, [prompts()[1]], max_new_tokens=NEW, temperature=1.0, seed=8)
    assert alone == [sample(7)[1]]
    assert sample(7, top_k=1) == generate(loaded.model, prompts(), max_new_tokens=NEW)


def test_prompt_too_long(models: tuple) -> None:
    loaded = load_model(models[2], tokenizer=False)
    with pytest.raises(GenerateError, match="prompt 1 has 120 tokens.*at most 118"):
        generate(loaded.model, [[5] * 120], max_new_tokens=10)


def test_bf16_and_the_document_mask(models: tuple) -> None:
    loaded = load_model(models[2], dtype=torch.bfloat16, tokenizer=False)
    assert loaded.model.embed.weight.dtype == torch.bfloat16
    assert len(generate(loaded.model, prompts(), max_new_tokens=4)[0]) == 4
    loaded.model.document_eod = 0  # data.document_mask: documents, not a cache
    with pytest.raises(ValueError, match="KV cache cannot be used with document_eod"):
        generate(loaded.model, prompts(), max_new_tokens=4)


def test_cli(models: tuple, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, hf_dir, ckpt = models
    loaded = load_model(ckpt)
    tok = loaded.tokenizer
    assert tok is not None
    texts = ["ROMEO:", "JULIET: O Romeo, Romeo"]
    news = [generate(loaded.model, [tok.encode(t)], max_new_tokens=NEW)[0] for t in texts]
    want = [t + tok.decode(tok.encode(t) + n)[len(tok.decode(tok.encode(t))) :]
            for t, n in zip(texts, news, strict=True)]  # fmt: skip
    (tmp_path / "prompts.txt").write_text(f"{texts[1]}\n\n")
    for batch in ("1", "2"):  # streamed, then batched
        args = [str(ckpt), "--prompt", texts[0], "--prompts-file", str(tmp_path / "prompts.txt")]
        assert generate_main([*args, "--max-new-tokens", str(NEW), "--batch-size", batch]) == 0
        assert capsys.readouterr().out == "".join(f"{w}\n\n" for w in want)
    # Sampled from the HF folder itself, same text with a seed.
    args = [str(hf_dir), "--prompt", "ROMEO:", "--temperature", "0.8", "--top-p", "0.95"]
    assert generate_main([*args, "--seed", "1", "--max-new-tokens", "5"]) == 0
    once = capsys.readouterr().out
    assert generate_main([*args, "--seed", "1", "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out == once and once.startswith("ROMEO:")


def test_cli_errors(models: tuple, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, _, ckpt = models
    long = " ".join(["Romeo"] * 200)
    assert generate_main([str(ckpt), "--prompt", long, "--max-new-tokens", "8"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "exceeds the model's context of 128" in err
    save_hf(tmp_path / "hf-bare", tokenizer=None)
    bare = tmp_path / "no-tokenizer"
    assert convert_main(["from-hf", "--src", str(tmp_path / "hf-bare"), "--dst", str(bare),
                         "--quiet"]) == 0  # fmt: skip
    capsys.readouterr()  # transformers' progress bars
    assert generate_main([str(bare), "--prompt", "ROMEO:"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "has no tokenizer" in err
    assert load_model(bare, tokenizer=False).tokenizer is None
    assert generate_main([str(tmp_path / "nowhere"), "--prompt", "x"]) == 2
    assert "no such folder" in capsys.readouterr().err
    meta = json.loads((ckpt / store.META).read_text())
    assert meta["eos_token_id"] == 2  # from-hf kept the HF config's, which the tokenizer uses
