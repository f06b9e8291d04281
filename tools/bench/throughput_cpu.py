#!/usr/bin/env python3
"""CPU throughput: a megalite training step against a minimal plain-PyTorch loop and a plain
Hugging Face `LlamaForCausalLM` loop, and the data stream against what training consumes. Prints a
table; measures, never asserts.

    python tools/bench/throughput_cpu.py [--steps 30] [--repeats 3] [overrides ...]

Both loops train the same model (same init), on the same stream of batches, with the same AdamW
and gradient clipping, in one process. megalite's step goes through everything a real run uses
(the DeepSpeed engine with ZeRO over a world of one, the schedule, loss all-reduce, the NaN check);
the plain loop is forward, backward, clip, step. The HF loop is what a user would write instead:
the same shape as a `LlamaForCausalLM` (SDPA attention, fp32, untied, HF's own init), torch AdamW
with megalite's settings, `clip_grad_norm_`, the same batches. The blocks alternate and the median
is reported; each ratio column is megalite over that baseline.
"""

# ruff: noqa: E402  (sys.path is set before the megalite imports)
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch

from megalite.checkpoint.hf import hf_config
from megalite.cluster.local import free_port
from megalite.data.stream import TokenStream
from megalite.launch import compose_config, prepare_run
from megalite.model.llama import Llama, cross_entropy
from megalite.parallel.dims import ParallelDims
from megalite.parallel.engine import build_engine, build_optimizer
from megalite.rank.env import from_environ, init_distributed
from megalite.train.logbook import Logbook
from megalite.train.trainer import Trainer
from megalite.train.worker import make_trainer, seed_everything

DEFAULTS = [
    "model=tiny",
    "trainer.seq_len=256",
    "trainer.micro_batch_size=8",
    "trainer.global_batch_size=8",
    "parallel.zero_stage=1",
    "trainer.save_interval=0",  # it times steps, never a checkpoint
    "trainer.save_final=false",
    "logging.wandb.mode=disabled",
]


def stream(cfg, data: Path) -> TokenStream:
    t = cfg.trainer
    return TokenStream(
        data, "train", seq_len=t.seq_len, micro_batch_size=t.micro_batch_size,
        dp_rank=0, dp_size=1, seed=t.seed,
    )  # fmt: skip


def update(model: torch.nn.Module, opt: torch.optim.Optimizer, cfg) -> None:
    """The baselines' optimizer step: clipping, AdamW, gradients cleared."""
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)


def plain_loop(cfg, data: Path):
    """The baseline: nothing but forward, backward, clip and AdamW."""
    seed_everything(cfg.trainer.seed)
    model = Llama(cfg.model, seed=cfg.trainer.seed)
    opt = build_optimizer(model, cfg)
    batches = iter(stream(cfg, data))

    def step() -> None:
        for _ in range(cfg.grad_accum_steps):
            batch = next(batches)
            loss = cross_entropy(model(batch[:, :-1]), batch[:, 1:])
            loss.backward()
        update(model, opt, cfg)

    return step


def hf_loop(cfg, data: Path):
    """What a user would write instead: Hugging Face's Llama of the same shape, same batches."""
    from transformers import LlamaConfig, LlamaForCausalLM

    seed_everything(cfg.trainer.seed)
    shape = hf_config(cfg.model, dtype="fp32", eos_token_id=None)
    hf = LlamaConfig(**shape, attn_implementation="sdpa")
    model = LlamaForCausalLM(hf).float().train()
    opt = build_optimizer(model, cfg)
    batches = iter(stream(cfg, data))
    vocab = cfg.model.vocab_size

    def step() -> None:
        for _ in range(cfg.grad_accum_steps):
            batch = next(batches)  # (b, s + 1)
            logits = model(input_ids=batch[:, :-1], use_cache=False).logits  # (b, s, vocab)
            loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, vocab).float(), batch[:, 1:].reshape(-1)
            )
            (loss / cfg.grad_accum_steps).backward()
        update(model, opt, cfg)

    return step


def single_process_trainer(cfg, run_dir: Path) -> Trainer:
    """The trainer of a world of one process, as the worker builds it (also step_profile.py's)."""
    seed_everything(cfg.trainer.seed)
    dims = ParallelDims(tp=1, pp=1, dp=1, global_rank=0)
    dims.build_groups()
    engine, scheduler = build_engine(Llama(cfg.model, seed=cfg.trainer.seed), cfg, dims)
    return make_trainer(
        cfg, engine=engine, scheduler=scheduler, dims=dims, device=torch.device("cpu"),
        run_dir=run_dir, logbook=Logbook(run_dir, enabled=False),
    )  # fmt: skip


def megalite_loop(cfg, run_dir: Path):
    return single_process_trainer(cfg, run_dir).train_step


def run_alone(measure: Callable[[argparse.Namespace, Any, Path], None], args, *, prefix: str):
    """`measure(args, cfg, run_dir)` in a world of this one process (gloo), the config composed
    from DEFAULTS and `args.overrides`, in a temporary run folder removed afterwards."""
    os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_PORT=str(free_port()))
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    run_dir = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        cfg = compose_config([*DEFAULTS, *args.overrides, f"trainer.run_dir={run_dir}"])
        prepare_run(cfg, run_dir=run_dir, world_size=1)
        init_distributed(from_environ(), device=torch.device("cpu"))
        measure(args, cfg, run_dir)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def tokens_per_s(step, steps: int, tokens_per_step: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * tokens_per_step / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("overrides", nargs="*")
    run_alone(measure, parser.parse_args(), prefix="megalite-bench-")


def measure(args: argparse.Namespace, cfg: Any, run_dir: Path) -> None:
    data = Path(cfg.data.path)
    tokens_per_step = cfg.trainer.global_batch_size * cfg.trainer.seq_len

    loops = {
        "megalite": megalite_loop(cfg, run_dir),
        "plain PyTorch": plain_loop(cfg, data),
        "HF Llama": hf_loop(cfg, data),
    }
    for step in loops.values():  # warm-up
        tokens_per_s(step, 3, tokens_per_step)
    results: dict[str, list[float]] = {name: [] for name in loops}
    for _ in range(args.repeats):
        for name, step in loops.items():
            results[name].append(tokens_per_s(step, args.steps, tokens_per_step))
    med = {name: statistics.median(v) for name, v in results.items()}

    batches = iter(stream(cfg, data))
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < 3.0:
        n += next(batches).numel()
    stream_tps = n / (time.perf_counter() - start)

    print(f"\nmodel={cfg.model.name} seq_len={cfg.trainer.seq_len} "
          f"batch={cfg.trainer.global_batch_size} threads={torch.get_num_threads()} "
          f"steps={args.steps}x{args.repeats} "
          f"zero={cfg.parallel.effective_zero_stage}")  # fmt: skip
    ours = med["megalite"]
    print(f"{'what':<28}{'tokens/s':>12}{'ratio':>10}{'vs HF':>10}")
    print(f"{'megalite train step':<28}{ours:>12.0f}"
          f"{ours / med['plain PyTorch']:>10.3f}{ours / med['HF Llama']:>10.3f}")  # fmt: skip
    print(f"{'plain PyTorch loop':<28}{med['plain PyTorch']:>12.0f}{1.0:>10.3f}")
    print(f"{'HF LlamaForCausalLM loop':<28}{med['HF Llama']:>12.0f}{'':>10}{1.0:>10.3f}")
    print(f"{'data stream (alone)':<28}{stream_tps:>12.0f}"
          f"{stream_tps / med['megalite']:>10.1f}x what training consumes")  # fmt: skip


if __name__ == "__main__":
    main()
