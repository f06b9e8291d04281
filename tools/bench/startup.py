#!/usr/bin/env python3
"""Start-up memory and time per rank: sharded construction (megalite/parallel/build.py) measured.

    python tools/bench/startup.py [--models 350m 1b] [--layouts tp1 tp2 tp2pp2 dp2z3]
                                  [--one-rank 70b:tp8pp8] [--no-step]

For each model × layout one local gloo world (fp32, CPU) builds the real stack — `build_model`
→ `build_engine` → one training step on random tokens — and every rank reports:

- stage: its pipeline stage;
- base: its anonymous memory just before the build (torch, DeepSpeed and megalite loaded, gloo
  joined: the planner's `PROCESS_BYTES`);
- share: its parameters' fp32 bytes (its TP slice of its stage; under ZeRO-3 its partition);
- build, engine, step: the peak of its anonymous resident memory (`RssAnon`, polled every 2 ms:
  what the rank allocates, without the library pages that RSS also counts as code first runs)
  above what it had just before the build, after each phase, in GiB and as a multiple of its
  share;
- seconds to build, to set up the engine, and from the start of the build to the end of the
  first step.

The table shows the largest rank of each world. `--one-rank MODEL:tpXppY` builds the stage of
one rank of that layout alone (stage 0, TP rank 0: the embedding's stage) in this process,
without the world: the TP cut and the stage choice are computed for the full layout, the process
groups are not made (no collective runs while a stage is built), and no engine is set up. This
is how a rank of 70b at tp8 × pp8 is measured on a 24 GiB machine.

Before the sharded build, every rank built and drew the whole fp32 model, then sliced (350m:
1.73 GiB above baseline on every rank of tp1, tp2, tp2×pp2 and dp2 ZeRO-3 alike, measured in the
issue that replaced it); the "build" column is what that became.
"""

# ruff: noqa: E402  (sys.path is set before the megalite imports)
from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before any DeepSpeed import, here and in ranks

import torch
import torch.distributed as dist

from megalite.cluster.local import spawn
from megalite.config import Config
from megalite.launch import compose_config
from megalite.model.llama import Llama
from megalite.parallel.build import Materialiser, build_model, materialise_stage
from megalite.parallel.dims import ParallelDims
from megalite.parallel.engine import build_engine
from megalite.parallel.parallelize import apply_tp, tag_plain_names
from megalite.rank.env import from_environ, init_distributed
from megalite.train.memory_check import PeakSampler
from megalite.train.trainer import pairs
from megalite.train.worker import quiet_known_warnings

CPU = torch.device("cpu")
GIB = 2**30
LAYOUTS = {  # name → overrides (world = tp × pp × dp)
    "tp1": ["parallel.tp=1"],
    "tp2": ["parallel.tp=2"],
    "tp2pp2": ["parallel.tp=2", "parallel.pp=2"],
    "dp2z3": ["parallel.dp=2", "parallel.zero_stage=3"],
    "tp2dp2z1": ["parallel.tp=2", "parallel.dp=2", "parallel.zero_stage=1"],
}
BASE = [
    "trainer.seq_len=128",
    "trainer.micro_batch_size=1",
    "trainer.precision=fp32",
    "logging.wandb.mode=disabled",
]


def share_bytes(module: torch.nn.Module) -> int:
    return 4 * sum(getattr(p, "ds_tensor", p).numel() for p in module.parameters())


def config_for(model: str, layout: list[str]) -> Config:
    overrides = dict(o.split("=", 1) for o in layout)
    world = 1
    for axis in ("tp", "pp", "dp"):
        world *= int(overrides.get(f"parallel.{axis}", 1))
    micro = 2 if "parallel.pp=2" in layout else 1  # a pipeline needs micro-batches to fill
    gbs = world // int(overrides.get("parallel.tp", 1)) // int(overrides.get("parallel.pp", 1))
    return compose_config(
        [f"model={model}", *BASE, *layout, f"trainer.global_batch_size={gbs * micro}"]
    )


def measure_rank(cfg: Config, dims: ParallelDims, *, engine: bool, step: bool) -> dict[str, Any]:
    """Build, engine and one step on this rank (as asked); its memory and seconds."""
    sampler = PeakSampler()
    start = time.perf_counter()
    try:
        module, loss_fn = build_model(cfg, dims, CPU)
        built = time.perf_counter()
        out: dict[str, Any] = {"build_peak": sampler.above_base(), "build_s": built - start}
        out["base"], out["stage"] = sampler.base, dims.pp_rank
        out["share"] = share_bytes(module)
        if engine:
            eng, _ = build_engine(module, cfg, dims)
            out["engine_peak"] = sampler.above_base()
            out["engine_s"] = time.perf_counter() - built
            out["share"] = share_bytes(module)  # ZeRO-3: the partitions the engine keeps
            if step:
                _one_step(eng, loss_fn, cfg)
                out["step_peak"] = sampler.above_base()
        out["first_step_s"] = time.perf_counter() - start
        return out
    finally:
        sampler.close()


def _one_step(engine: Any, loss_fn: Any, cfg: Config) -> None:
    t, vocab = cfg.trainer, cfg.model.vocab_size
    g = torch.Generator().manual_seed(0)

    def window() -> torch.Tensor:
        return torch.randint(0, vocab, (t.micro_batch_size, t.seq_len + 1), generator=g)

    if cfg.parallel.pp > 1:  # as the trainer feeds it: every micro-batch of random ids weighs 1
        windows = [window() for _ in range(cfg.grad_accum_steps)]
        engine.train_batch(data_iter=pairs(windows, [1.0] * len(windows)))
        return
    for _ in range(cfg.grad_accum_steps):
        x = window()
        x, y = x[:, :-1], x[:, 1:]
        engine.backward(loss_fn(engine(x), y))
        engine.step()


def _rank_main(cfg: Config, engine: bool, step: bool, out_path: str) -> None:
    env = from_environ()
    assert env is not None, "started by megalite.cluster.local.spawn"
    quiet_known_warnings()
    warnings.filterwarnings("ignore", category=UserWarning, module="deepspeed")
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    with contextlib.redirect_stdout(io.StringIO()):  # DeepSpeed's prints
        init_distributed(env, device=CPU)
        torch.set_num_threads(1)
        p = cfg.parallel
        dims = ParallelDims(tp=p.tp, pp=p.pp, dp=p.dp, global_rank=env.global_rank)
        dims.build_groups()
        mine = measure_rank(cfg, dims, engine=engine, step=step)
        every: list[Any] | None = [None] * dims.world_size if env.global_rank == 0 else None
        dist.gather_object(mine, every, dst=0)
        dist.destroy_process_group()
    if env.global_rank == 0:
        Path(out_path).write_text(json.dumps(every))


def measure_world(cfg: Config, *, engine: bool = True, step: bool = True) -> list[dict[str, Any]]:
    """Every rank's figures, from one spawned world of `cfg`'s layout."""
    p = cfg.parallel
    with tempfile.TemporaryDirectory(prefix="megalite-startup-bench-") as tmp:
        out_path = Path(tmp) / "ranks.json"
        spawn(_rank_main, nprocs=p.tp * p.pp * p.dp, args=(cfg, engine, step, str(out_path)))
        return json.loads(out_path.read_text())


def measure_one_rank(model: str, layout: str) -> dict[str, Any]:
    """Stage 0, TP rank 0 of `layout` (e.g. tp8pp8) built alone in this process (see the module
    docstring); no process group is made and no collective runs."""
    tp, pp = (int(x) for x in layout.removeprefix("tp").split("pp"))
    cfg = compose_config([f"model={model}", *BASE, f"parallel.tp={tp}", f"parallel.pp={pp}"])
    dims = ParallelDims(tp=tp, pp=pp, dp=1, global_rank=0)
    dims.group = lambda axis: None  # the layers keep their group; nothing communicates here
    sampler = PeakSampler()
    start = time.perf_counter()
    meta = Llama(cfg.model, device="meta")
    apply_tp(meta, dims, sequence_parallel=False)
    tag_plain_names(meta)
    fill = Materialiser(cfg, dims, CPU, init=True)
    _, bounds = materialise_stage(meta, cfg, dims, fill)
    seconds = time.perf_counter() - start
    peak = sampler.above_base()
    sampler.close()
    return {
        "base": sampler.base,
        "share": 4 * fill.numel,
        "build_peak": peak,
        "build_s": seconds,
        "layers": bounds,
    }


def _gib(n: float) -> str:
    return f"{n / GIB:.2f}"


def _row(model: str, layout: str, ranks: list[dict[str, Any]]) -> str:
    r = max(ranks, key=lambda x: x["build_peak"])
    cells = [model, layout, str(len(ranks)), _gib(r["base"]), _gib(r["share"])]
    for phase in ("build", "engine", "step"):
        peak = r.get(f"{phase}_peak")
        cells.append("-" if peak is None else f"{_gib(peak)} ({peak / r['share']:.2f}x)")
    cells += [
        f"{r['build_s']:.1f}",
        f"{r.get('engine_s', 0):.1f}",
        f"{r.get('first_step_s', 0):.1f}",
    ]
    return "| " + " | ".join(cells) + " |"


HEADER = (
    "| model | layout | ranks | base GiB | share GiB | build peak GiB | engine peak GiB "
    "| step peak GiB | build s | engine s | to 1st step s |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|"
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="*", default=["350m", "1b"])
    parser.add_argument("--layouts", nargs="*", default=["tp1", "tp2", "tp2pp2", "dp2z3"])
    parser.add_argument("--one-rank", nargs="*", default=["70b:tp8pp8"], metavar="MODEL:LAYOUT")
    parser.add_argument("--no-step", action="store_true", help="stop after the engine")
    args = parser.parse_args()
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; fp32, gloo\n")
    print(HEADER)
    for model in args.models:
        for layout in args.layouts:
            ranks = measure_world(config_for(model, LAYOUTS[layout]), step=not args.no_step)
            print(_row(model, layout, ranks), flush=True)
    for spec in args.one_rank:
        model, layout = spec.split(":")
        r = measure_one_rank(model, layout)
        print(_row(model, f"{layout} (1 rank, stage 0)", [r]), flush=True)


if __name__ == "__main__":
    main()
