"""The readable (non-JSON) answers of `estimate` and `search`."""

from __future__ import annotations

import argparse
from collections import defaultdict
from typing import Any

from megalite.config import ModelConfig
from megalite.model.flops import param_count
from megalite.plan import report
from megalite.plan.gpus import GPU
from megalite.plan.layout import Estimate, Layout, SearchResult


def _state_note(lay: Layout) -> str:
    if lay.effective_zero == 0 and lay.precision == "fp32":
        return "AdamW moments, whole"
    if lay.effective_zero == 0 and lay.pp == 1:
        return "fp32 master + AdamW moments, whole"
    if lay.effective_zero == 0:
        return "fp32 master + AdamW moments, 1/dp each (DeepSpeed's BF16_Optimizer)"
    return "fp32 master + AdamW moments, 1/dp each"


def _model_line(cfg: ModelConfig, params: int) -> str:
    return (
        f"model {cfg.name}: {params:,} params ({cfg.n_layers} layers, dim {cfg.dim}, "
        f"{cfg.n_heads} heads / {cfg.n_kv_heads} kv, ffn {cfg.ffn_dim}, vocab {cfg.vocab_size})"
    )


def _layout_line(lay: Layout, gpu: GPU) -> str:
    zero = f"ZeRO {lay.effective_zero}"
    if lay.effective_zero != lay.zero:
        zero += f" (asked {lay.zero}: dp = pp = 1 leaves nothing to shard)"
    return (
        f"layout: {lay.gpus} x {gpu.name} = tp {lay.tp} x pp {lay.pp} x dp {lay.dp}, {zero}, "
        f"micro batch {lay.micro_batch} x seq {lay.seq_len}, global batch {lay.global_batch} "
        f"({lay.grad_accum} micro-batches per step), ac {lay.ac}, sp {'on' if lay.sp else 'off'}, "
        f"{lay.precision}"
    )


def _buffers_note(zero: int) -> str:
    if zero == 3:
        return "gradient reduction bucket + the weights of 2 blocks, gathered"
    return "gradient reduction bucket"


def _host_lines(h: dict[str, Any]) -> list[str]:
    """Host memory at start-up, and the verdict against cluster.mem when it is given."""
    lines = [
        f"host memory at start-up: {report.gib(h['per_rank'])} GiB per rank (process "
        f"{report.gib(h['process'])} + the larger of one parameter drawn in fp32, "
        f"{report.gib(h['build'])}, and a resume's largest checkpoint file, "
        f"{report.gib(h['resume'])}; the CUDA driver's own not counted), "
        f"{report.gib(h['per_node'])} GiB per node of {h['ranks_per_node']} ranks"
    ]
    if h["fits"] is False:
        over = report.gib(h["per_node"] - h["node_mem"])
        lines.append(
            f"  WARNING: more than cluster.mem={report.gib(h['node_mem'])} GiB per node ({over} "
            "GiB over): raise cluster.mem (0: the whole node), or spread the state (zero=1 or "
            "more dp, more pp)"
        )
    elif h["fits"]:
        lines.append(f"  fits cluster.mem={report.gib(h['node_mem'])} GiB per node")
    return lines


def estimate_text(cfg: ModelConfig, est: Estimate, r: dict[str, Any]) -> str:
    lay, mem, t = est.layout, est.memory, est.time
    fpt, fpt6 = r["flops_per_token"], r["flops_per_token_6n"]
    per_micro = report.gib(mem.activations_per_micro_batch)
    act_note = f"{mem.in_flight} micro-batch(es) in flight x {per_micro} GiB"
    if mem.recompute_working_set:
        act_note += f" + {report.gib(mem.recompute_working_set)} recomputed block"
    if mem.pipeline_buffers:
        act_note += f" + {report.gib(mem.pipeline_buffers)} pipeline outputs"
    rows = [
        ["weights", report.gib(mem.state.weights), ""],
        ["gradients", report.gib(mem.state.gradients), ""],
        ["optimizer state", report.gib(mem.state.optimizer), _state_note(lay)],
        ["activations", report.gib(mem.activations), act_note],
        ["temporary buffers", report.gib(mem.temporary), _buffers_note(lay.effective_zero)],
        ["total", report.gib(mem.total), ""],
    ]
    stage = f"stage {mem.stage} of {lay.pp}" + (", the largest" if lay.pp > 1 else "")
    step = mem.state.step_buffers
    if step > mem.activations + mem.temporary:
        rows[-1][2] = f"at the optimizer step: its fp32 copies, {report.gib(step)} GiB"
    verdict = (
        "fits"
        if est.fits
        else f"DOES NOT FIT ({report.gib(mem.total - est.usable_bytes)} GiB over)"
    )
    ideal = t.model_flops / (lay.gpus * est.gpu.peak_flops * r["time"]["mfu_assumed"])
    lines = [
        _model_line(cfg, r["params"]),
        _layout_line(lay, est.gpu),
        f"FLOPs per token (training): {report.flops(fpt)} exact (every matmul, attention and "
        f"logits included), 6N approximation {report.flops(fpt6)} (exact / 6N = {fpt / fpt6:.3f})",
        "",
        f"memory per GPU, pipeline {stage} (GiB):",
        report.table(["", "GiB", ""], rows, left=(0, 2)),
        f"  {verdict}: {report.gib(est.usable_bytes)} GiB usable of {est.gpu.memory_gib:g} GiB",
        *_host_lines(r["host"]),
        "",
        f"pipeline bubble: {report.percent(t.bubble)} ((pp-1)/(m+pp-1), m = {lay.grad_accum})",
        f"step: {report.human(lay.global_batch * lay.seq_len)} tokens, "
        f"{report.flops(t.model_flops)} FLOPs; {report.duration(ideal)} at MFU "
        f"{r['time']['mfu_assumed']:g} with no bubble, recomputation or exposed communication",
        f"estimated step {report.duration(t.step_s)}: compute {report.duration(t.compute_s)} "
        f"(bubble and recomputation included), TP comm {report.duration(t.tp_comm_s)}, "
        f"PP comm {report.duration(t.pp_comm_s)}, DP comm {report.duration(t.dp_comm_s)}",
        f"  {report.human(t.tokens_per_s)} tokens/s ({report.human(t.tokens_per_s / lay.gpus)} "
        f"per GPU), MFU {t.mfu:.3f}",
    ]
    return "\n".join(lines)


def search_text(
    cfg: ModelConfig,
    args: argparse.Namespace,
    base: Layout,
    gpu: GPU,
    result: SearchResult,
    top: list[Estimate],
) -> str:
    usable = top[0].usable_bytes
    lines = [
        f"search: {cfg.name} ({param_count(cfg):,} params) on {args.gpus} x "
        f"{gpu.name} ({gpu.memory_gib:g} GiB, {report.gib(usable)} usable), seq_len "
        f"{base.seq_len}, global batch {base.global_batch}, {base.precision}",
        f"ranked by estimated tokens/s at MFU {args.mfu:g} before bubble, recomputation and "
        "exposed communication",
        f"{result.evaluated:,} layouts evaluated, {len(result.layouts):,} fit; "
        + (f"the fastest {len(top)}:" if len(top) < len(result.layouts) else "all of them:"),
    ]
    header = [
        "#",
        "tp",
        "sp",
        "pp",
        "dp",
        "zero",
        "micro",
        "ac",
        "GiB/GPU",
        "step",
        "tokens/s",
        "MFU",
        "bubble",
    ]
    rows = [
        [
            str(i + 1),
            str(e.layout.tp),
            "on" if e.layout.sp else "off",
            str(e.layout.pp),
            str(e.layout.dp),
            str(e.layout.effective_zero),
            str(e.layout.micro_batch),
            e.layout.ac,
            report.gib(e.memory.total),
            report.duration(e.time.step_s),
            report.human(e.time.tokens_per_s),
            f"{e.time.mfu:.3f}",
            report.percent(e.time.bubble),
        ]
        for i, e in enumerate(top)
    ]
    lines.append(report.table(header, rows))
    if result.rejected:
        lines.append("rejected:")
        whole_tp: dict[str, list[int]] = defaultdict(list)
        for r in result.rejected:
            if r.pp is None:
                whole_tp[r.reason].append(r.tp)
        for reason, tps in whole_tp.items():
            lines.append(f"  tp={', '.join(map(str, tps))} (every pp): {reason}")
        for r in result.rejected:
            if r.pp is not None:
                lines.append(f"  tp={r.tp} pp={r.pp}: {r.reason}")
    return "\n".join(lines)
