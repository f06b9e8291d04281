#!/usr/bin/env python3
"""One-GPU training throughput and MFU of the real trainer, with each feature toggled.

    python tools/bench/mfu.py model=1b trainer.seq_len=4096 [--steps 30] [--warmup 10]
                              [--gpu h200] [--budget-s 480] [overrides]
    python tools/bench/mfu.py --cpu-smoke      (model=tiny on CPU: checks the script, not a figure)

Each variant is a real `launch/pretrain.py` run (a fresh process, world of one, bf16, no eval
along the way and no checkpoint at all: trainer.save_interval=0 trainer.save_final=false) of
`--steps` steps in a run folder of its own, removed once its metrics are read; tokens/s and the
model FLOPs per token come from its metrics.jsonl, over the steps after `--warmup` (compilation
and allocator warm-up excluded).
MFU is reported twice: against the datasheet peak (the trainer's own `mfu`, from
megalite/train/metrics.py's table or `trainer.peak_flops`) and against the bf16 matmul ceiling
measured here (a large square bf16 matmul, median of CUDA-event timings) — the latter says how much
of what this GPU can actually do the step achieves. FLOPs per token are the exact count of
megalite/model/flops.py (attention over the full s x s, as Megatron and PaLM count it); activation
recomputation is not counted, so `ac=full` shows its cost as lower MFU.

Variants: the default (kernels.backend=auto: Triton kernels; flash-attn if installed), the torch
kernels, SDPA instead of flash-attn, selective and full activation checkpointing, torch.compile of
each block (last: the costliest to start). Prints a table; measures, never asserts. The issue's
goal: MFU >= 50% of the datasheet peak for the 1b model at seq 4096.

What a row costs (its "est s" column, beside the seconds it took): START_S for a fresh process
(interpreter, torch + DeepSpeed + megalite imports, the one-rank launch, the model and its engine
built on the GPU — 1b: bf16 weights, fp32 master weights and Adam moments, ~17 GB — the Triton
kernels JIT-compiled at the first step, the one-batch evaluations at step 0 and at the end), plus
COMPILE_S for trainer.compile=true, plus `--steps` + 1 steps at the planner's step time
(megalite/plan/throughput.py) on `--gpu` at ASSUMED_MFU. At 1b x seq 4096, micro batch 2, on an
H200 a step is ~0.19 s (0.20 s selective, 0.24 s full recomputation), so 30 steps are ~6 s and
a row is ~46 s (~106 s with torch.compile), ~340 s for the six: the start-up dominates, and
START_S and COMPILE_S are estimates until a GPU run's "took s" column replaces them. A row that
would end past `--budget-s` (the GPU recipe's 8 minutes; the estimates scaled by how much longer
the rows so far took than estimated) is skipped, saying so.
"""

# ruff: noqa: E402  (sys.path is set before the megalite imports)
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import torch

VARIANTS = {
    "default (triton kernels, flash-attn if installed)": [],
    "kernels.backend=torch": ["kernels.backend=torch"],
    "kernels.attention=sdpa": ["kernels.attention=sdpa"],
    "activation_checkpointing=selective": ["parallel.activation_checkpointing=selective"],
    "activation_checkpointing=full": ["parallel.activation_checkpointing=full"],
    "trainer.compile=true": ["trainer.compile=true"],  # last: the costliest row to start
}
GPU_DEFAULTS = [
    "model=1b",
    "trainer.seq_len=4096",
    "trainer.micro_batch_size=2",
    "trainer.global_batch_size=2",
    "trainer.precision=bf16",
]
NO_SAVES = ["trainer.save_interval=0", "trainer.save_final=false"]  # 14 B/param each: 17 GB at 1b
START_S = 40.0  # a row's fixed cost on the GPU, steps aside (estimated; see the docstring)
COMPILE_S = 60.0  # trainer.compile=true: a block's forward and backward compiled (estimated)
ASSUMED_MFU = 0.4  # the planner's default (tools/plan.py --mfu)
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


def estimate_s(overrides: list[str], *, steps: int, gpu: str) -> float:
    """Seconds a row of `overrides` should take on `gpu` (see the module docstring)."""
    from megalite.launch import compose_config
    from megalite.plan.gpus import resolve_gpu
    from megalite.plan.layout import Layout
    from megalite.plan.throughput import Network, step_time

    cfg = compose_config(overrides)
    t = cfg.trainer
    layout = Layout(
        micro_batch=t.micro_batch_size,
        seq_len=t.seq_len,
        global_batch=t.global_batch_size,
        ac=cfg.parallel.activation_checkpointing,
        precision=t.precision,
    )
    step = step_time(cfg.model, layout, resolve_gpu(gpu), mfu=ASSUMED_MFU, network=Network())
    return START_S + (COMPILE_S if t.compile else 0.0) + (steps + 1) * step.step_s


def run_variant(overrides: list[str], *, steps: int, run_dir: Path, env: dict) -> list[dict]:
    """Train `steps` steps in a fresh process in `run_dir` (removed after); returns its per-step
    metrics records."""
    cmd = [
        sys.executable, str(ROOT / "launch/pretrain.py"), *overrides,
        f"trainer.max_steps={steps}", "trainer.log_interval=1", "trainer.eval_interval=0",
        "trainer.eval_steps=1", *NO_SAVES, "logging.wandb.mode=disabled",
        f"trainer.run_dir={run_dir}",
    ]  # fmt: skip
    try:
        out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if out.returncode != 0:
            said = out.stderr.strip()
            raise RuntimeError(said.splitlines()[-1] if said else "failed")
        with open(run_dir / "metrics.jsonl") as f:
            return [r for r in map(json.loads, f) if "tokens_per_s" in r]
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def summarise(records: list[dict], warmup: int) -> dict[str, float]:
    timed = [r for r in records if r["step"] > warmup] or records
    return {
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in timed),
        "mfu": statistics.median(r["mfu"] for r in timed),
        "memory_gib": max(r.get("memory_gib", 0.0) for r in timed),
    }


def main() -> None:
    start = time.monotonic()  # --budget-s counts from here
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=10, help="steps left out of the figures")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny model on CPU, 4 steps")
    parser.add_argument("--gpu", default="h200", help="the planner's GPU for the row estimates")
    parser.add_argument(
        "--budget-s", type=float, help="skip the rows that would end past it (GPU: 480)"
    )
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
    rows = {label: [*base, *overrides, *extra] for label, extra in variants.items()}
    est = {label: estimate_s(row, steps=steps, gpu=args.gpu) for label, row in rows.items()}
    budget = args.budget_s if args.budget_s is not None or args.cpu_smoke else 480.0
    print(
        ("smoke; " if args.cpu_smoke else "")
        + f"estimate on {args.gpu} (planner step time at MFU {ASSUMED_MFU:.0%}, {steps} steps, "
        f"+{START_S:.0f} s start-up per row, +{COMPILE_S:.0f} s torch.compile): "
        f"{sum(est.values()):.0f} s for {len(rows)} rows"
        + (f" of the {budget:.0f} s budget" if budget else "")
    )
    print(
        f"{'variant':<52}{'tokens/s':>11}{'MFU peak':>10}{'MFU ceil':>10}{'mem GiB':>9}"
        f"{'est s':>7}{'took s':>8}"
    )
    slower = 1.0  # how much longer than estimated the rows so far took (at least 1)
    with tempfile.TemporaryDirectory(prefix="megalite-mfu-") as tmp:
        for i, (label, row) in enumerate(rows.items()):
            left = budget - (time.monotonic() - start) if budget else None
            if left is not None and est[label] * slower > left:
                print(f"{label:<52}  skipped: ~{est[label] * slower:.0f} s, {left:.0f} s left "
                      f"of --budget-s {budget:.0f}", flush=True)  # fmt: skip
                continue
            t0 = time.monotonic()
            try:
                s = summarise(run_variant(row, steps=steps, run_dir=Path(tmp) / f"run-{i}",
                                          env=env), warmup)  # fmt: skip
            except RuntimeError as e:
                print(f"{label:<52}  failed: {e}", flush=True)
                continue
            took = time.monotonic() - t0
            if "compile" not in label:  # compilation's own excess says nothing of the others
                slower = max(slower, took / est[label])
            vs_ceiling = f"{s['tokens_per_s'] * fpt / ceiling:.1%}" if ceiling else "-"
            print(
                f"{label:<52}{s['tokens_per_s']:>11,.0f}{s['mfu']:>10.1%}{vs_ceiling:>10}"
                f"{s['memory_gib']:>9.1f}{est[label]:>7.0f}{took:>8.0f}",
                flush=True,
            )
    print("goal: MFU >= 50% of the datasheet peak (model=1b, seq 4096), the first row")


if __name__ == "__main__":
    main()
