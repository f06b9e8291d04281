#!/usr/bin/env python3
"""One-GPU training throughput and MFU of the real trainer, with each feature toggled.

    python tools/bench/mfu.py model=1b trainer.seq_len=4096 [--steps 30] [--warmup 10] [overrides]
    python tools/bench/mfu.py --cpu-smoke      (model=tiny on CPU: checks the script, not a figure)

Each variant is a real `launch/pretrain.py` run (a fresh process, world of one, bf16, no eval or
checkpoint) of `--steps` steps; tokens/s and the model FLOPs per token come from its
metrics.jsonl, over the steps after `--warmup` (compilation and allocator warm-up excluded).
MFU is reported twice: against the datasheet peak (the trainer's own `mfu`, from
megalite/train/metrics.py's table or `trainer.peak_flops`) and against the bf16 matmul ceiling
measured here (a large square bf16 matmul, median of CUDA-event timings) — the latter says how much
of what this GPU can actually do the step achieves. FLOPs per token are the exact count of
megalite/model/flops.py (attention over the full s x s, as Megatron and PaLM count it); activation
recomputation is not counted, so `ac=full` shows its cost as lower MFU.

Variants: the default (kernels.backend=auto: Triton kernels; flash-attn if installed), the torch
kernels, SDPA instead of flash-attn, torch.compile of each block, selective and full activation
checkpointing. Prints a table; measures, never asserts. The issue's goal: MFU >= 50% of the
datasheet peak for the 1b model at seq 4096.
"""

# ruff: noqa: E402  (sys.path is set before the megalite imports)
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import torch

VARIANTS = {
    "default (triton kernels, flash-attn if installed)": [],
    "kernels.backend=torch": ["kernels.backend=torch"],
    "kernels.attention=sdpa": ["kernels.attention=sdpa"],
    "trainer.compile=true": ["trainer.compile=true"],
    "activation_checkpointing=selective": ["parallel.activation_checkpointing=selective"],
    "activation_checkpointing=full": ["parallel.activation_checkpointing=full"],
}
GPU_DEFAULTS = [
    "model=1b",
    "trainer.seq_len=4096",
    "trainer.micro_batch_size=2",
    "trainer.global_batch_size=2",
    "trainer.precision=bf16",
]
CPU_SMOKE = [
    "model=tiny",
    "trainer.seq_len=64",
    "trainer.micro_batch_size=2",
    "trainer.global_batch_size=2",
    "trainer.device=cpu",
]


def matmul_ceiling(device: torch.device, n: int = 8192, repeats: int = 20) -> float:
    """Achieved bf16 FLOP/s of an n x n x n matmul (median over `repeats`)."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * n**3 / statistics.median(times)


def run_variant(overrides: list[str], *, steps: int, workdir: Path, env: dict) -> list[dict]:
    """Train `steps` steps in a fresh process; returns its per-step metrics records."""
    run_dir = workdir / f"run-{len(list(workdir.iterdir()))}"
    cmd = [
        sys.executable, str(ROOT / "launch/pretrain.py"), *overrides,
        f"trainer.max_steps={steps}", "trainer.log_interval=1", "trainer.eval_interval=0",
        "trainer.eval_steps=1", "trainer.save_interval=0", "logging.wandb.mode=disabled",
        f"trainer.run_dir={run_dir}",
    ]  # fmt: skip
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "failed")
    with open(run_dir / "metrics.jsonl") as f:
        return [r for r in map(json.loads, f) if "tokens_per_s" in r]


def summarise(records: list[dict], warmup: int) -> dict[str, float]:
    timed = [r for r in records if r["step"] > warmup] or records
    return {
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in timed),
        "mfu": statistics.median(r["mfu"] for r in timed),
        "memory_gib": max(r.get("memory_gib", 0.0) for r in timed),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=10, help="steps left out of the figures")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny model on CPU, 4 steps")
    args, overrides = parser.parse_known_args()
    if args.cpu_smoke:
        base, steps, warmup = CPU_SMOKE, 4, 1
        variants = {k: v for k, v in VARIANTS.items() if "compile" not in k}  # minutes on CPU
    elif not torch.cuda.is_available():
        print(
            "tools/bench/mfu.py measures a GPU and none is visible (--cpu-smoke checks the script)"
        )
        sys.exit(2)
    else:
        base, steps, warmup, variants = GPU_DEFAULTS, args.steps, args.warmup, VARIANTS
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu_smoke else "cpu")
    ceiling = matmul_ceiling(device) if device.type == "cuda" else None
    from megalite.launch import compose_config
    from megalite.model.flops import flops_per_token

    cfg = compose_config([*base, *overrides])
    fpt = flops_per_token(cfg.model, cfg.trainer.seq_len)
    env = {**os.environ, "DS_ACCELERATOR": "cuda" if device.type == "cuda" else "cpu"}
    if args.cpu_smoke:
        env["TRITON_INTERPRET"] = "1"
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(
        f"{name}: model {cfg.model.name}, seq {cfg.trainer.seq_len}, micro batch "
        f"{cfg.trainer.micro_batch_size}, {cfg.trainer.precision}; {fpt:.3e} FLOPs/token; "
        f"bf16 matmul ceiling {ceiling / 1e12:.0f} TFLOP/s"
        if ceiling
        else f"{name} (smoke)"
    )
    print(f"{'variant':<52}{'tokens/s':>11}{'MFU peak':>10}{'MFU ceil':>10}{'mem GiB':>9}")
    with tempfile.TemporaryDirectory() as tmp:
        for label, extra in variants.items():
            try:
                s = summarise(run_variant([*base, *overrides, *extra], steps=steps,
                                          workdir=Path(tmp), env=env), warmup)  # fmt: skip
            except RuntimeError as e:
                print(f"{label:<52}  failed: {e}", flush=True)
                continue
            vs_ceiling = f"{s['tokens_per_s'] * fpt / ceiling:.1%}" if ceiling else "-"
            print(
                f"{label:<52}{s['tokens_per_s']:>11,.0f}{s['mfu']:>10.1%}{vs_ceiling:>10}"
                f"{s['memory_gib']:>9.1f}",
                flush=True,
            )
    print("goal: MFU >= 50% of the datasheet peak (model=1b, seq 4096), the first row")


if __name__ == "__main__":
    main()
