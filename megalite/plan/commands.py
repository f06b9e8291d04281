"""The four planning commands: each turns parsed arguments into a result dict (what `--json`
prints, with plainly named fields) and a readable text, and draws its `--plot` if asked."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, replace
from typing import Any

from megalite.config import ModelConfig
from megalite.model.flops import flops_per_token, flops_per_token_6n, param_count
from megalite.plan import report, scaling
from megalite.plan.errors import PlanError, require_positive
from megalite.plan.gpus import GPU, resolve_gpu
from megalite.plan.layout import Estimate, Layout, estimate, search
from megalite.plan.memory import HostMemory, StageMemory, host_memory
from megalite.plan.presets import load_preset
from megalite.plan.throughput import Network

SECONDS_PER_DAY = 86400.0


def _emit(args: argparse.Namespace, result: Any, text: str) -> str:
    return json.dumps(result, indent=2) if args.json else text


def _gpu(args: argparse.Namespace) -> GPU:
    return resolve_gpu(
        args.gpu,
        peak_tflops=args.peak_tflops,
        memory_gib=args.memory_gib,
        link_gb_s=args.link_gb_s,
    )


def _check_mfu(mfu: float) -> None:
    require_positive("--mfu", mfu)
    if mfu > 1:
        raise PlanError(f"--mfu={mfu:g} is a fraction of peak: use a value in (0, 1]")


FIT_NAMES = {"hoffmann": "Hoffmann et al. 2022", "epoch": "Besiroglu et al. 2024"}


def _law_line(method: str, fit: str) -> str:
    lw = scaling.law(fit)
    law = f"L = {lw.E:g} + {lw.A:g}/N^{lw.alpha:g} + {lw.B:g}/D^{lw.beta:g}"
    source = f"{FIT_NAMES[fit]} ({fit})"
    if method == "approach3":
        return f"approach 3, the optimum of {source}: {law}, C = 6ND"
    f = scaling.frontier(method, fit)
    return f"Hoffmann et al. 2022 {method}: N = {f.k:g} C^{f.a:g}, C = 6ND; loss by {source}: {law}"


# ---------------------------------------------------------------------------------------------


def chinchilla(args: argparse.Namespace) -> str:
    method, fit = args.method, args.fit
    lw = scaling.law(fit)
    if args.model and args.params is not None:
        raise PlanError("give --model or --params, not both")
    cfg = load_preset(args.model) if args.model else None
    computes = args.compute or []
    if cfg is not None:
        records = _preset_records(cfg, args, computes, method, fit)
    elif computes:
        records = [
            _alloc_record(scaling.optimal(compute=c, method=method, fit=fit)) for c in computes
        ]
    elif args.params is not None or args.tokens is not None:
        alloc = scaling.optimal(params=args.params, tokens=args.tokens, method=method, fit=fit)
        records = [_alloc_record(alloc)]
    else:
        raise PlanError("give --compute FLOPS, --params N, --tokens D or --model NAME")
    for r in records:
        r.update(method=method, fit=fit)
    if args.plot:
        from megalite.plan.plots import isoflop_plot

        budgets = [r.get("compute_flops_6nd", r["compute_flops"]) for r in records]
        best = [scaling.optimal(compute=c, method=method, fit=fit) for c in budgets]
        isoflop_plot(
            args.plot,
            fit=fit,
            budgets=budgets,
            optima=[(a.params, lw.loss(a.params, a.tokens)) for a in best],
            models=[(r["params"], r["loss"], cfg.name) for r in records] if cfg else [],
        )
    header = ["compute FLOPs", "params", "tokens", "tokens/param", "loss"]
    rows = [
        [
            report.flops(r["compute_flops"]),
            report.human(r["params"]),
            report.human(r["tokens"]),
            f"{r['tokens_per_param']:.1f}",
            f"{r['loss']:.4f}",
        ]
        for r in records
    ]
    lines = [_law_line(method, fit)]
    if cfg is not None:
        lines.append(
            f"model {cfg.name}: {param_count(cfg):,} params; compute is its exact training FLOPs "
            f"at seq_len {records[0]['seq_len']} ({report.flops(records[0]['flops_per_token'])} "
            "per token, attention and logits included), 6ND beside it"
        )
        header.insert(1, "6ND FLOPs")
        for row, r in zip(rows, records, strict=True):
            row.insert(1, report.flops(r["compute_flops_6nd"]))
    lines.append(report.table(header, rows))
    if args.plot:
        lines.append(f"plot: {args.plot}")
    return _emit(args, records[0] if len(records) == 1 else records, "\n".join(lines))


def _alloc_record(a: scaling.Allocation) -> dict[str, Any]:
    return {
        "compute_flops": a.compute_flops,
        "params": a.params,
        "tokens": a.tokens,
        "tokens_per_param": a.tokens_per_param,
        "loss": a.loss,
    }


def _preset_records(cfg: ModelConfig, args, computes, method: str, fit: str) -> list[dict]:
    """A preset's tokens: those `computes` buy at its exact FLOPs per token, or the given
    --tokens, or the compute-optimal count for its size."""
    seq = cfg.max_seq_len if args.seq_len is None else args.seq_len
    require_positive("--seq-len", seq)
    n = param_count(cfg)
    fpt = flops_per_token(cfg, seq)
    if computes and args.tokens is not None:
        raise PlanError("give --compute or --tokens with --model, not both")
    if computes:
        for c in computes:
            require_positive("--compute", c)
        token_counts = [c / fpt for c in computes]
    elif args.tokens is not None:
        require_positive("--tokens", args.tokens)
        token_counts = [args.tokens]
    else:
        token_counts = [scaling.optimal(params=n, method=method, fit=fit).tokens]
    lw = scaling.law(fit)
    return [
        {
            "model": cfg.name,
            "compute_flops": fpt * d,
            "compute_flops_6nd": 6 * n * d,
            "params": n,
            "tokens": d,
            "tokens_per_param": d / n,
            "loss": lw.loss(n, d),
            "seq_len": seq,
            "flops_per_token": fpt,
        }
        for d in token_counts
    ]


# ---------------------------------------------------------------------------------------------


def budget(args: argparse.Namespace) -> str:
    gpu = _gpu(args)
    if args.gpus is None:
        raise PlanError("budget needs --gpus N")
    require_positive("--gpus", args.gpus)
    require_positive("--days", args.days)
    require_positive("--price-per-gpu-hour", args.price_per_gpu_hour)
    _check_mfu(args.mfu)
    rate = args.gpus * gpu.peak_flops * args.mfu  # useful FLOP/s of the cluster
    job = args.model or args.params is not None or args.tokens is not None
    if args.model and args.params is not None:
        raise PlanError("give --model or --params, not both")
    if job:
        compute, n, d, fpt = _job_compute(args, rate)
        days = compute / rate / SECONDS_PER_DAY
    else:
        if args.days is None:
            raise PlanError(
                "give --days D (the compute it buys), or a job: --model/--params, --tokens"
            )
        days = args.days
        compute = rate * days * SECONDS_PER_DAY
        alloc = scaling.optimal(compute=compute, method=args.method, fit=args.fit)
        n, d, fpt = alloc.params, alloc.tokens, 6 * alloc.params
    gpu_hours = args.gpus * days * 24
    price = args.price_per_gpu_hour
    result = {
        "gpus": args.gpus,
        "gpu": gpu.name,
        "peak_flops": gpu.peak_flops,
        "mfu": args.mfu,
        "days": days,
        "gpu_hours": gpu_hours,
        "compute_flops": compute,
        "params": n,
        "tokens": d,
        "tokens_per_param": d / n,
        "flops_per_token": fpt,
        "loss": scaling.law(args.fit).loss(n, d),
        "method": args.method,
        "fit": args.fit,
        "price_per_gpu_hour": price,
        "cost": None if price is None else gpu_hours * price,
    }
    if args.plot:
        from megalite.plan.plots import isoflop_plot

        best = scaling.optimal(compute=6 * n * d, method=args.method, fit=args.fit)
        lw = scaling.law(args.fit)
        isoflop_plot(
            args.plot,
            fit=args.fit,
            budgets=[6 * n * d],
            optima=[(best.params, lw.loss(best.params, best.tokens))],
            models=[(n, result["loss"], args.model or "job")] if job else [],
        )
    cost = "" if price is None else f", {report.money(result['cost'])} at ${price:g}/GPU-hour"
    cluster = f"{args.gpus} x {gpu.name} at MFU {args.mfu:g}"
    if job:
        what = f"model {args.model}" if args.model else f"{report.human(n)} params"
        lines = [
            f"{what} on {report.human(d)} tokens: {report.flops(compute)} FLOPs "
            f"({report.flops(fpt)} per token{'' if args.model else ', 6N'})",
            f"{cluster}: {gpu_hours:,.0f} GPU-hours = {days:.1f} days{cost}",
            f"predicted loss ({args.fit} fit): {result['loss']:.4f}",
        ]
    else:
        lines = [
            f"{cluster} for {days:g} days: {report.flops(compute)} FLOPs, "
            f"{gpu_hours:,.0f} GPU-hours{cost}",
            _law_line(args.method, args.fit),
            f"compute-optimal: {report.human(n)} params on {report.human(d)} tokens "
            f"({d / n:.1f} tokens/param), predicted loss {result['loss']:.4f}",
        ]
    if args.plot:
        lines.append(f"plot: {args.plot}")
    return _emit(args, result, "\n".join(lines))


def _job_compute(args, rate: float) -> tuple[float, float, float, float]:
    """(compute, params, tokens, FLOPs per token) of the job --model/--params with --tokens,
    or with the tokens --days buys, or with its compute-optimal tokens."""
    if args.model:
        cfg = load_preset(args.model)
        seq = cfg.max_seq_len if args.seq_len is None else args.seq_len
        require_positive("--seq-len", seq)
        n, fpt = float(param_count(cfg)), flops_per_token(cfg, seq)
    else:
        if args.params is None:
            raise PlanError("give the job's size: --model NAME or --params N")
        require_positive("--params", args.params)
        n, fpt = args.params, 6 * args.params
    if args.tokens is not None and args.days is not None:
        raise PlanError("give --tokens or --days for a job, not both")
    if args.tokens is not None:
        require_positive("--tokens", args.tokens)
        d = args.tokens
    elif args.days is not None:
        d = rate * args.days * SECONDS_PER_DAY / fpt
    else:
        d = scaling.optimal(params=n, method=args.method, fit=args.fit).tokens
    return fpt * d, n, d, fpt


# ---------------------------------------------------------------------------------------------


def _model(args: argparse.Namespace) -> ModelConfig:
    if not args.model:
        raise PlanError(f"{args.command} needs a model: model=NAME (e.g. model=7b)")
    return load_preset(args.model)


def _network(args: argparse.Namespace) -> Network:
    require_positive("--gpus-per-node", args.gpus_per_node)
    require_positive("--inter-node-gb-s", args.inter_node_gb_s)
    return Network(gpus_per_node=args.gpus_per_node, inter_node_gb_s=args.inter_node_gb_s)


def _usable(args: argparse.Namespace) -> float:
    require_positive("--usable-memory", args.usable_memory)
    if args.usable_memory > 1:
        raise PlanError("--usable-memory is a fraction of the GPU's memory: use (0, 1]")
    return args.usable_memory


def _base_layout(args: argparse.Namespace, cfg: ModelConfig) -> Layout:
    """The layout the flags and key=value arguments give, defaults filling the rest."""
    values = {
        "tp": args.tp,
        "pp": args.pp,
        "dp": args.dp,
        "zero": args.zero,
        "micro_batch": args.micro_batch,
        "seq_len": args.seq_len if args.seq_len is not None else cfg.max_seq_len,
        "global_batch": args.global_batch,
        "ac": args.ac,
        "sp": args.sp,
        "precision": args.precision,
    }
    for name in ("tp", "pp", "dp", "micro_batch", "seq_len", "global_batch"):
        if values[name] is not None:
            require_positive(name, values[name])
    return Layout(**{k: v for k, v in values.items() if v is not None})


def run_estimate(args: argparse.Namespace) -> str:
    cfg, gpu = _model(args), _gpu(args)
    _check_mfu(args.mfu)
    layout = _base_layout(args, cfg)
    if args.gpus is not None:
        require_positive("--gpus", args.gpus)
        per_replica = layout.tp * layout.pp
        if args.gpus % per_replica:
            raise PlanError(f"--gpus {args.gpus} is not divisible by tp x pp = {per_replica}")
        dp = args.gpus // per_replica
        if args.dp is not None and args.dp != dp:
            raise PlanError(f"dp={args.dp} but --gpus {args.gpus} / (tp x pp) = {dp}: drop one")
        layout = replace(layout, dp=dp)
    est = estimate(
        cfg, layout, gpu, mfu=args.mfu, usable_fraction=_usable(args), network=_network(args)
    )
    result = estimate_record(cfg, est, mfu=args.mfu)
    result["host"] = host_record(cfg, est, gpus_per_node=args.gpus_per_node, node_mem=args.node_mem)
    if args.plot:
        from megalite.plan.plots import memory_plot

        memory_plot(
            args.plot,
            labels=[f"stage {s.stage}" for s in est.stages],
            parts=[_parts(s) for s in est.stages],
            usable_bytes=est.usable_bytes,
            title=f"{cfg.name}: {layout.label()}",
        )
    from megalite.plan.text import estimate_text

    text = estimate_text(cfg, est, result)
    if args.plot:
        text += f"\nplot: {args.plot}"
    return _emit(args, result, text)


def host_record(
    cfg: ModelConfig, est: Estimate, *, gpus_per_node: int, node_mem: int | None
) -> dict[str, Any]:
    """Host memory at start-up: per rank (the larger stage), per node, against `cluster.mem`."""
    lay = est.layout
    hosts = [host_memory(cfg, lay, s) for s in est.stages]
    rank: HostMemory = max(hosts, key=lambda h: h.peak)
    ranks_per_node = min(gpus_per_node, lay.gpus)
    per_node = ranks_per_node * rank.peak
    return {
        "stage": rank.stage,
        "process": rank.process,
        "build": rank.build,
        "resume": rank.resume,
        "per_rank": rank.peak,
        "ranks_per_node": ranks_per_node,
        "per_node": per_node,
        "node_mem": node_mem,
        "fits": None if node_mem is None else per_node <= node_mem,
    }


def _short(lay: Layout) -> str:
    sp = "sp " if lay.sp else ""
    return f"tp{lay.tp} {sp}pp{lay.pp} z{lay.effective_zero} mb{lay.micro_batch} {lay.ac}"


def _parts(stage: StageMemory) -> dict[str, float]:
    s = stage.state
    state = s.weights + s.gradients + s.optimizer
    return {
        "weights": s.weights,
        "gradients": s.gradients,
        "optimizer state": s.optimizer,
        "activations": stage.activations,
        "temporary buffers": stage.total - state - stage.activations,
    }


def _stage_record(stage: StageMemory) -> dict[str, Any]:
    s = stage.state
    return {
        "stage": stage.stage,
        "weights": s.weights,
        "gradients": s.gradients,
        "optimizer_state": s.optimizer,
        "activations": stage.activations,
        "activations_per_micro_batch": stage.activations_per_micro_batch,
        "micro_batches_in_flight": stage.in_flight,
        "recompute_working_set": stage.recompute_working_set,
        "pipeline_buffers": stage.pipeline_buffers,
        "temporary_buffers": s.backward_buffers,
        "step_buffers": s.step_buffers,
        "total": stage.total,
    }


def layout_record(layout: Layout) -> dict[str, Any]:
    return {
        **asdict(layout),
        "zero_effective": layout.effective_zero,
        "grad_accum": layout.grad_accum,
    }


def estimate_record(cfg: ModelConfig, est: Estimate, *, mfu: float) -> dict[str, Any]:
    t, lay = est.time, est.layout
    return {
        "model": cfg.name,
        "params": param_count(cfg),
        "gpus": lay.gpus,
        "gpu": {
            "name": est.gpu.name,
            "peak_flops": est.gpu.peak_flops,
            "memory_bytes": est.gpu.memory_bytes,
        },
        "layout": layout_record(lay),
        "flops_per_token": flops_per_token(cfg, lay.seq_len),
        "flops_per_token_6n": flops_per_token_6n(cfg),
        "memory": {
            **_stage_record(est.memory),
            "usable": est.usable_bytes,
            "fits": est.fits,
        },
        "stages": [_stage_record(s) for s in est.stages],
        "time": {
            "step_s": t.step_s,
            "tokens_per_s": t.tokens_per_s,
            "tokens_per_s_per_gpu": t.tokens_per_s / lay.gpus,
            "mfu": t.mfu,
            "mfu_assumed": mfu,
            "bubble": t.bubble,
            "compute_s": t.compute_s,
            "tp_comm_s": t.tp_comm_s,
            "pp_comm_s": t.pp_comm_s,
            "dp_comm_s": t.dp_comm_s,
            "model_flops_per_step": t.model_flops,
            "executed_flops_per_step": t.executed_flops,
        },
    }


def run_search(args: argparse.Namespace) -> str:
    cfg, gpu = _model(args), _gpu(args)
    _check_mfu(args.mfu)
    if args.gpus is None:
        raise PlanError("search needs --gpus N")
    require_positive("--gpus", args.gpus)
    if args.dp is not None:
        raise PlanError("search derives dp from --gpus: drop dp")
    base = _base_layout(args, cfg)
    fixed = frozenset(
        k for k in ("tp", "pp", "zero", "micro_batch", "ac", "sp") if getattr(args, k) is not None
    )
    result = search(
        cfg,
        gpus=args.gpus,
        gpu=gpu,
        base=base,
        mfu=args.mfu,
        usable_fraction=_usable(args),
        network=_network(args),
        fixed=fixed,
    )
    if not result.layouts:
        where = f"no layout of {cfg.name} fits on {args.gpus} x {gpu.name}"
        lean = result.leanest
        if lean is not None:
            raise PlanError(
                f"{where}: the leanest ({lean.layout.label()}) needs "
                f"{report.gib(lean.memory.total)} GiB, {report.gib(lean.usable_bytes)} GiB "
                "usable; use more or larger GPUs, a shorter seq_len or a smaller model"
            )
        r = result.rejected[0]
        family = f"tp={r.tp}" + ("" if r.pp is None else f" pp={r.pp}")
        raise PlanError(f"{where}: {family}: {r.reason}")
    top = result.layouts if args.top <= 0 else result.layouts[: args.top]
    records = {
        "model": cfg.name,
        "params": param_count(cfg),
        "gpus": args.gpus,
        "gpu": gpu.name,
        "evaluated": result.evaluated,
        "fitting": len(result.layouts),
        "layouts": [
            {
                **layout_record(e.layout),
                "memory": e.memory.total,
                "step_s": e.time.step_s,
                "tokens_per_s": e.time.tokens_per_s,
                "mfu": e.time.mfu,
                "bubble": e.time.bubble,
            }
            for e in top
        ],
        "rejected": [asdict(r) for r in result.rejected],
    }
    if args.plot:
        from megalite.plan.plots import memory_plot

        memory_plot(
            args.plot,
            labels=[f"#{i + 1} {_short(e.layout)}" for i, e in enumerate(top)],
            parts=[_parts(e.memory) for e in top],
            usable_bytes=top[0].usable_bytes,
            title=f"{cfg.name} on {args.gpus} x {gpu.name}: memory of the fastest layouts",
        )
    from megalite.plan.text import search_text

    text = search_text(cfg, args, base, gpu, result, top)
    if args.plot:
        text += f"\nplot: {args.plot}"
    return _emit(args, records, text)
