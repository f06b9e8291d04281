"""`from-hf`: a randomly initialised LlamaForCausalLM (built locally, nothing downloaded) becomes a
megalite checkpoint whose model gives the HF model's logits, and that a TP run trains from; the
other tools read it (and what `reshard` makes of it) like any checkpoint."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from megalite.checkpoint.cli import main as convert_main
from megalite.checkpoint.universal import read_tensor
from megalite.config import ModelConfig
from megalite.data.stream import TokenStream
from megalite.launch import launch
from megalite.model.llama import Llama, cross_entropy
from tests.helpers import compose_config, train_losses


def hf_model(folder: Path, *, tied: bool, kv: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=4096, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=kv, max_position_embeddings=128,
        rope_theta=50000.0, tie_word_embeddings=tied, rms_norm_eps=1e-5,
    )  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(folder)
    return model


def megalite_model(dst: Path) -> Llama:
    cfg = OmegaConf.to_object(
        OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(dst / "model.yaml"))
    )
    model = Llama(cfg)
    names = [n for n, _ in model.named_parameters()]
    model.load_state_dict({n: read_tensor(dst, n, "param") for n in names}, strict=False)
    return model.eval()


@pytest.mark.parametrize("tied,kv", [(False, 2), (True, 4)], ids=["untied-gqa", "tied-mha"])
def test_from_hf_logits_match(tmp_path: Path, tied: bool, kv: int) -> None:
    hf = hf_model(tmp_path / "hf", tied=tied, kv=kv)
    args = ["from-hf", "--src", str(tmp_path / "hf"), "--dst", str(tmp_path / "ml"), "--quiet"]
    assert convert_main(args) == 0
    model = megalite_model(tmp_path / "ml")
    assert model.cfg.rope_theta == 50000.0 and model.cfg.tie_embeddings == tied
    tokens = torch.randint(0, 4096, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (hf(tokens).logits - model(tokens)).abs().max() <= 1e-4


def test_continue_pretraining_under_tp(sample_data: Path, tmp_path: Path) -> None:
    hf_model(tmp_path / "hf", tied=False, kv=2)
    dst = tmp_path / "ml"
    assert convert_main(["from-hf", "--src", str(tmp_path / "hf"), "--dst", str(dst),
                         "--tp=2", "--quiet"]) == 0  # fmt: skip
    m = OmegaConf.load(dst / "model.yaml")
    model_overrides = [f"model.{k}={v}" for k, v in m.items() if k != "name"]
    run_dir = tmp_path / "run"
    cfg = compose_config(
        [*model_overrides, f"data.path={sample_data}", "parallel.tp=2", "trainer.max_steps=2",
         "trainer.seq_len=32", "trainer.micro_batch_size=2", "trainer.global_batch_size=2",
         "trainer.log_interval=1", "trainer.eval_steps=1", "logging.wandb.mode=disabled",
         f"trainer.resume={dst}", f"trainer.run_dir={run_dir}"]
    )  # fmt: skip
    launch(cfg, default_run_dir=run_dir)
    losses = train_losses(run_dir)
    assert sorted(losses) == [1, 2]
    # The step-0 validation loss of the TP run is the imported model's, computed here unsharded.
    first_val = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])["val_loss"]
    val = TokenStream(sample_data, "val", seq_len=32, micro_batch_size=2, dp_rank=0, dp_size=1,
                      seed=cfg.trainer.seed, shuffle=False)  # fmt: skip
    batch = next(iter(val))
    with torch.no_grad():
        want = cross_entropy(megalite_model(dst)(batch[:, :-1]), batch[:, 1:]).item()
    assert first_val == pytest.approx(want, rel=1e-5)
    # Each TP rank read only its slices of the full tensors: its own parameters' bytes.
    plain = sum(4 * p.numel() for p in megalite_model(dst).parameters())
    for rank in range(2):
        log = (run_dir / "logs" / f"rank_{rank:05d}.log").read_text()
        read = int(re.search(r"layout-free resume: read (\d+) bytes", log)[1])
        assert read == pytest.approx(plain / 2, rel=0.01), (rank, read, plain)


def test_tools_read_an_imported_checkpoint(sample_data: Path, tmp_path: Path, capsys) -> None:
    """inspect, to-hf and reshard of a from-hf checkpoint (weights only: no Adam moments, no
    schedule), and of its reshard: to-hf gives back the Hugging Face weights exactly, with the
    tokenizer and EOS id that from-hf kept."""
    from safetensors.torch import load_file

    hf_model(tmp_path / "hf", tied=True, kv=2)
    shutil.copy(sample_data / "tokenizer.json", tmp_path / "hf" / "tokenizer.json")
    want = load_file(tmp_path / "hf" / "model.safetensors")
    imported, resharded = tmp_path / "ml", tmp_path / "resharded"
    assert convert_main(["from-hf", "--src", str(tmp_path / "hf"), "--dst", str(imported),
                         "--tp=2", "--quiet"]) == 0  # fmt: skip
    assert convert_main(["reshard", "--src", str(imported), "--dst", str(resharded),
                         "--tp=1", "--pp=2", "--quiet"]) == 0  # fmt: skip
    assert "tensors   20 x (weights)\n" in capsys.readouterr().out
    for ckpt in (imported, resharded):
        assert convert_main(["inspect", str(ckpt)]) == 0
        out = capsys.readouterr().out
        assert (
            f"layout       layout-free (resume in any layout), imported from {tmp_path / 'hf'}, "
            "weights only (fresh optimizer)\n"
        ) in out
        assert "step         0   tokens 0" in out and "embed.weight" in out
        hf_dir = tmp_path / f"{ckpt.name}-hf"
        assert convert_main(["to-hf", "--src", str(ckpt), "--dst", str(hf_dir), "--quiet"]) == 0
        got = load_file(hf_dir / "model.safetensors")
        assert sorted(got) == sorted(want)  # tied: no lm_head.weight in either
        assert all(torch.equal(got[n], want[n]) for n in want)
        assert (hf_dir / "tokenizer.json").read_bytes() == (
            tmp_path / "hf" / "tokenizer.json"
        ).read_bytes()
        assert json.loads((hf_dir / "config.json").read_text())["eos_token_id"] == 2
    assert (resharded / "model.yaml").read_text() == (imported / "model.yaml").read_text()
    meta = json.loads((resharded / "meta.json").read_text())
    assert meta["optimizer_state"] is False and meta["layout"] == {"tp": 1, "pp": 2, "dp": 1}


def test_unsupported_architecture(tmp_path: Path, capsys) -> None:
    (tmp_path / "gpt").mkdir()
    (tmp_path / "gpt" / "config.json").write_text(
        json.dumps({"architectures": ["GPT2LMHeadModel"]})
    )
    args = ["from-hf", "--src", str(tmp_path / "gpt"), "--dst", str(tmp_path / "out")]
    assert convert_main(args) == 2
    assert "unsupported architecture GPT2LMHeadModel" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_failed_conversion_leaves_nothing(tmp_path: Path, capsys) -> None:
    hf_model(tmp_path / "hf", tied=False, kv=2)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    config["num_hidden_layers"] = 3  # the weights hold 2: fails after writing some tensors
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    args = ["from-hf", "--src", str(tmp_path / "hf"), "--dst", str(tmp_path / "out"), "--quiet"]
    assert convert_main(args) == 2
    assert "missing tensors layers.2" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no output, no temporary folder
