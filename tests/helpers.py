"""Shared test helpers: compose a config the way `launch/pretrain.py` does, read a run's metrics."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from megalite.config import Config
from megalite.launch import CONF_DIR as CONF
from megalite.launch import compose_config

ROOT = Path(__file__).resolve().parents[1]
__all__ = [
    "CONF",
    "ROOT",
    "compose_config",
    "read_metrics",
    "short_job",
    "short_job_overrides",
    "train_losses",
]


def run_python(
    *args: str, env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """`python ARGS` from the repository's root, as a user types it; its output captured."""
    cmd = [sys.executable, *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def save_hf(folder: Path, *, tokenizer: Path | None, vocab: int = 4096) -> torch.nn.Module:
    """A random LlamaForCausalLM saved to `folder` (with `tokenizer` copied in, if given)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        rope_theta=50000.0, tie_word_embeddings=False, rms_norm_eps=1e-5,
    )  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(folder)
    if tokenizer is not None:
        (folder / "tokenizer.json").write_bytes(tokenizer.read_bytes())
        (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ x }}"}))
    return model


def reference_step(
    loss: torch.Tensor, model: torch.nn.Module, opt, sched, *, grad_clip: float
) -> float:
    """One plain optimizer step of a single-process reference loop (backward, clipping, AdamW,
    the schedule); returns the loss."""
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


def read_metrics(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.jsonl") as f:
        return [json.loads(line) for line in f if line.strip()]


def train_losses(run_dir: Path) -> dict[int, float]:
    """step -> training loss, from metrics.jsonl (the last record of a step wins)."""
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


def short_job_overrides(data: Path, run_dir: Path | None, *overrides: str, steps: int) -> list[str]:
    """The overrides of a few-step tiny-model job on `data` (32-token windows, global batch 8, a
    loss logged every step, no intermediate eval or save, wandb off); `overrides` come last and
    win. run_dir None leaves trainer.run_dir to Hydra."""
    return [
        "model=tiny",
        f"data.path={data}",
        f"trainer.max_steps={steps}",
        "trainer.seq_len=32",
        "trainer.micro_batch_size=2",
        "trainer.global_batch_size=8",
        "trainer.log_interval=1",
        "trainer.eval_interval=0",
        "trainer.eval_steps=1",
        "trainer.save_interval=0",
        "optim.lr=3e-3",
        *([f"trainer.run_dir={run_dir}"] if run_dir is not None else []),
        "logging.wandb.mode=disabled",
        *overrides,
    ]


def short_job(data: Path, run_dir: Path, *overrides: str, steps: int) -> Config:
    """The Config of `short_job_overrides`."""
    return compose_config(short_job_overrides(data, run_dir, *overrides, steps=steps))
