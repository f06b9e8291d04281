#!/usr/bin/env python3
"""Tensor-parallel communication: the collectives one training step issues, counted on a real
gloo world and printed beside Megatron's analytic values. Measures, never fails (exit code 0).

    python tools/bench/tp_comm.py [--tp 2] [--batch 2] [--seq-len 64] [--sp | --no-sp] [overrides]

A step is one forward, `loss_fn` and backward of one random micro-batch (batch, seq_len), fp32 on
CPU, in a world of `tp` local ranks (tp x 1 x 1) running the model `apply_tp` sharded. Both
sequence-parallel settings run unless --sp / --no-sp picks one. Overrides compose the config as
`launch/pretrain.py` does (default `model=tiny`); only the model section is used.

Counting: in every rank, for the step only, `torch.distributed.all_reduce`, `all_gather`,
`reduce_scatter`, `all_gather_into_tensor` and `reduce_scatter_tensor` are wrapped (and restored
afterwards). The `*_tensor` variants count as `all_gather` / `reduce_scatter`: same collective.

Payload convention: a call's size is that of the full (unsharded) tensor the collective works on:
an all-reduce's tensor, an all-gather's output (the local shard x group size), a reduce-scatter's
input (the output shard x group size). So an all-gather of a sequence-sharded activation and the
all-reduce it replaces are both b·s·h. Bytes = elements x element size, per rank (every rank issues
the same calls; the bench checks that). "ring B/rank" is what a ring algorithm sends per rank over a
group of p: 2(p-1)/p x payload for an all-reduce, (p-1)/p x payload for an all-gather or a
reduce-scatter; it is where sequence parallelism's equivalence to plain TP shows.

Every collective issued during the step is counted, whatever its group; the group (TP, a
kv-replica group, other) is part of what is compared, so a call on an unexpected group shows as a
difference instead of vanishing from the count.

Rows are the region that issued a call, not its size (the embedding's, head's and every layer's
collectives are all b·s·h): see `CollectiveCounter`.
"""

# ruff: noqa: E402  (sys.path is set before the megalite imports)
from __future__ import annotations

import argparse
import contextlib
import functools
import inspect
import json
import os
import sys
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch
import torch.distributed as dist
from torch import nn

from megalite.cluster.local import free_port, start_processes
from megalite.config import ModelConfig
from megalite.launch import compose_config
from megalite.model.llama import Llama
from megalite.parallel.dims import ParallelDims
from megalite.parallel.parallelize import apply_tp
from megalite.parallel.tp_layers import ShardedLinear

LAYERS = "layer activations"
EMBED = "embedding"
HEAD = "head entry"
CE = "cross-entropy"
NORMS = "SP norm-gain grads"
KV = "kv-replica weight grads"
OTHER_GRADS = "other weight grads"
UNATTRIBUTED = "unattributed"
ROWS = (LAYERS, EMBED, HEAD, CE, NORMS, KV, OTHER_GRADS, UNATTRIBUTED)
ACTIVATION_ROWS = (LAYERS, EMBED, HEAD)
PHASES = ("fwd", "bwd")
PATCHED = (
    "all_reduce",
    "all_gather",
    "reduce_scatter",
    "all_gather_into_tensor",
    "reduce_scatter_tensor",
)
SHORT = {"all_reduce": "AR", "all_gather": "AG", "reduce_scatter": "RS"}
FP32_BYTES = torch.tensor([], dtype=torch.float32).element_size()
_ROW_KEY = "tp_comm_row"  # autograd node metadata: the row its backward counts under
_SEEN_KEY = "tp_comm_seen"


class Collective(NamedTuple):
    """One collective call as one rank sees it (payload: see the module docstring)."""

    op: str  # "all_reduce", "all_reduce(max)", "all_gather", "reduce_scatter"
    group: str  # "tp" | "kv" (a kv-replica group) | "world" | "other"
    group_size: int
    numel: int
    nbytes: int

    def ring_bytes(self) -> float:
        p = self.group_size
        factor = 2 * (p - 1) / p if self.op.startswith("all_reduce") else (p - 1) / p
        return factor * self.nbytes


class Call(NamedTuple):
    row: str
    phase: str  # "fwd" | "bwd"
    collective: Collective


def _payload(name: str, a: dict[str, Any]) -> tuple[torch.Tensor, int]:
    """(a tensor of the call, elements of the full tensor it works on)."""
    if name == "all_reduce":
        return a["tensor"], a["tensor"].numel()
    if name == "all_gather":
        return a["tensor"], a["tensor"].numel() * len(a["tensor_list"])
    if name == "reduce_scatter":
        return a["output"], sum(t.numel() for t in a["input_list"])
    if name == "all_gather_into_tensor":
        return a["output_tensor"], a["output_tensor"].numel()
    return a["input"], a["input"].numel()  # reduce_scatter_tensor


class CollectiveCounter:
    """Records the collectives one rank issues inside `counting()`, each under the row of the
    model region or parameter gradient that issued it.

    Forward: `region` hooks push the region's row before apply_tp's entry hook and pop it after
    its exit hook. Backward: a collective runs inside the backward of the autograd node its
    forward created, so the entry and exit nodes get a pre-hook/hook pair that pushes/pops the row:
    attribution follows the graph, not the engine's execution order. Weight-gradient syncs
    (`sync_grad`) are the nodes feeding a parameter's AccumulateGrad; `tag_weight_grads` labels
    them by the parameter's name. A call with no row is "unattributed".
    """

    def __init__(self, tp_group: dist.ProcessGroup, kv_groups: list[dist.ProcessGroup]) -> None:
        self.tp_group = tp_group
        self.kv_groups = kv_groups
        self.calls: list[Call] = []
        self.phase = "fwd"
        self._rows: list[str] = []
        self._depth = 0  # a wrapped collective calling another is counted once
        self._active = False

    @contextlib.contextmanager
    def counting(self) -> Iterator[None]:
        originals = {name: getattr(dist, name) for name in PATCHED}
        try:
            for name, fn in originals.items():
                setattr(dist, name, self._wrap(name, fn))
            self._active = True
            yield
        finally:
            self._active = False
            for name, fn in originals.items():
                setattr(dist, name, fn)

    @contextlib.contextmanager
    def row(self, row: str) -> Iterator[None]:
        self._rows.append(row)
        try:
            yield
        finally:
            self._rows.pop()

    def backward(self, loss: torch.Tensor) -> None:
        self.phase = "bwd"
        try:
            loss.backward()
        finally:
            self.phase = "fwd"

    def region(self, module: nn.Module, row: str) -> None:
        def enter(_m: nn.Module, _args: tuple) -> None:
            self._rows.append(row)

        def tag_entry(_m: nn.Module, args: tuple) -> None:
            if isinstance(args[0], torch.Tensor):
                self.tag(args[0].grad_fn, row)

        def leave(_m: nn.Module, _args: tuple, out: torch.Tensor) -> None:
            self.tag(out.grad_fn, row)
            self._rows.pop()

        module.register_forward_pre_hook(enter, prepend=True)  # before apply_tp's entry
        module.register_forward_pre_hook(tag_entry)  # after it: args[0] is its output
        module.register_forward_hook(leave)  # after apply_tp's exit

    def tag(self, node: Any, row: str) -> None:
        """Count the collectives of `node`'s backward under `row` (first tag wins)."""
        if node is None or _ROW_KEY in node.metadata:
            return
        node.metadata[_ROW_KEY] = row

        def push(_grad_outputs: tuple) -> None:
            self._rows.append(row)

        def pop(_grad_inputs: tuple, _grad_outputs: tuple) -> None:
            self._rows.pop()

        node.register_prehook(push)
        node.register_hook(pop)

    def tag_weight_grads(self, root: Any, names: dict[int, str]) -> None:
        """Tag every node that feeds a parameter's gradient with that parameter's row."""
        stack = [root]
        while stack:
            node = stack.pop()
            if node is None or node.metadata.get(_SEEN_KEY):
                continue
            node.metadata[_SEEN_KEY] = True
            for child, _ in node.next_functions:
                param = getattr(child, "variable", None)  # AccumulateGrad
                if param is not None:
                    self.tag(node, _grad_row(names.get(id(param), "?")))
                elif child is not None:
                    stack.append(child)

    def _wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def counted(*args: Any, **kwargs: Any) -> Any:
            if self._active and self._depth == 0:
                bound = signature.bind(*args, **kwargs)
                bound.apply_defaults()
                self._record(name, bound.arguments)
            self._depth += 1
            try:
                return fn(*args, **kwargs)
            finally:
                self._depth -= 1

        return counted

    def _record(self, name: str, a: dict[str, Any]) -> None:
        tensor, numel = _payload(name, a)
        op = name.removesuffix("_into_tensor").removesuffix("_tensor")
        reduce_op = a.get("op", dist.ReduceOp.SUM)
        if op == "all_reduce" and reduce_op != dist.ReduceOp.SUM:
            op += f"({getattr(reduce_op, 'name', reduce_op)!s})".lower()
        group = a["group"]
        size, nbytes = dist.get_world_size(group), numel * tensor.element_size()
        collective = Collective(op, self._group_kind(group), size, numel, nbytes)
        row = self._rows[-1] if self._rows else UNATTRIBUTED
        self.calls.append(Call(row, self.phase, collective))

    def _group_kind(self, group: dist.ProcessGroup | None) -> str:
        if group is None:
            return "world"
        if group is self.tp_group:
            return "tp"
        return "kv" if any(group is g for g in self.kv_groups) else "other"


def _grad_row(name: str) -> str:
    if name.endswith("norm.weight"):
        return NORMS
    if name.endswith(("attn.wk.weight", "attn.wv.weight")):
        return KV
    return OTHER_GRADS


# ---- one rank ---------------------------------------------------------------------------------


def count_step(
    cfg: ModelConfig, dims: ParallelDims, *, batch: int, seq_len: int, sp: bool
) -> list[Call]:
    """The collectives this rank issues in one forward + loss + backward of the TP model."""
    torch.manual_seed(0)
    model = Llama(cfg)
    loss_fn = apply_tp(model, dims, sequence_parallel=sp)
    kv_groups = [
        m.grad_group
        for m in model.modules()
        if isinstance(m, ShardedLinear) and m.grad_group is not None
    ]
    counter = CollectiveCounter(dims.group("tp"), kv_groups)
    counter.region(model.embed, EMBED)
    for layer in model.layers:
        counter.region(layer.attn, LAYERS)
        counter.region(layer.mlp, LAYERS)
    counter.region(model.head, HEAD)
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq_len + 1), generator=torch.Generator())
    with counter.counting():
        logits = model(tokens[:, :-1])  # (b, s, padded_vocab / tp)
        with counter.row(CE):
            loss = loss_fn(logits, tokens[:, 1:])
        counter.tag(loss.grad_fn, CE)
        names = {id(p): n for n, p in model.named_parameters()}
        counter.tag_weight_grads(loss.grad_fn, names)
        counter.backward(loss)
    return counter.calls


def _rank_main(
    rank: int, world_size: int, port: int, cfg: ModelConfig, batch: int, seq_len: int,
    sp_settings: list[bool], out_path: str,
) -> None:  # fmt: skip
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        dims = ParallelDims(tp=world_size, pp=1, dp=1, global_rank=rank)
        dims.build_groups()
        results = {}
        for sp in sp_settings:
            calls = count_step(cfg, dims, batch=batch, seq_len=seq_len, sp=sp)
            plain = [[row, phase, *c] for row, phase, c in calls]
            every: list[Any] = [None] * world_size
            dist.all_gather_object(every, plain)  # after `counting()`: not counted
            results[str(sp)] = {"calls": plain, "ranks_agree": all(e == plain for e in every)}
        if rank == 0:
            Path(out_path).write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


# ---- predictions ------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepShape:
    """What the analytic values depend on."""

    tp: int
    batch: int
    seq_len: int
    dim: int
    n_layers: int
    n_kv_heads: int
    head_dim: int

    @property
    def kv_replicas(self) -> int:
        from megalite.parallel.placement import kv_replicas

        return kv_replicas(self.tp, self.n_kv_heads)


def predict(shape: StepShape, *, sp: bool) -> dict[tuple[str, str], Counter[Collective]]:
    """Megatron's collectives for one step, per (row, phase), from the shapes alone.

    Without SP (Shoeybi et al. 2019, "Megatron-LM", arXiv:1909.08053, §3): every transformer layer
    has two all-reduces of b·s·h in forward (the "g" after attention and after the MLP) and two in
    backward (the "f" before them). With SP (Korthikanti et al. 2022, "Reducing Activation
    Recomputation in Large Transformer Models", arXiv:2205.05198) each g becomes a reduce-scatter
    and each f an all-gather (and the reverse in backward), of the same b·s·h payload: a ring
    all-reduce is a reduce-scatter followed by an all-gather, so the bytes sent are the same.
    """
    b, s, h, tp = shape.batch, shape.seq_len, shape.dim, shape.tp
    out: dict[tuple[str, str], Counter[Collective]] = {}
    if tp == 1:
        return out  # every primitive is a no-op

    def add(
        row: str, phase: str, op: str, numel: int, n: int, *, group: str = "tp", p: int = tp
    ) -> None:
        collective = Collective(op, group, p, numel, numel * FP32_BYTES)
        out.setdefault((row, phase), Counter())[collective] += n

    act, L = b * s * h, shape.n_layers
    if sp:
        for phase in PHASES:  # forward: AG in, RS out; backward: RS (of AG), AG (of RS)
            add(LAYERS, phase, "all_gather", act, 2 * L)
            add(LAYERS, phase, "reduce_scatter", act, 2 * L)
        add(EMBED, "fwd", "reduce_scatter", act, 1)  # partial lookups summed and sharded
        add(EMBED, "bwd", "all_gather", act, 1)
        add(HEAD, "fwd", "all_gather", act, 1)
        add(HEAD, "bwd", "reduce_scatter", act, 1)
        add(NORMS, "bwd", "all_reduce", h, 2 * L + 1)  # gains see 1/tp of the tokens each
    else:
        add(LAYERS, "fwd", "all_reduce", act, 2 * L)
        add(LAYERS, "bwd", "all_reduce", act, 2 * L)
        add(EMBED, "fwd", "all_reduce", act, 1)  # its backward is the identity
        add(HEAD, "bwd", "all_reduce", act, 1)  # forward: the identity copy
    add(CE, "fwd", "all_reduce(max)", b * s, 1)  # the logits' max
    add(CE, "fwd", "all_reduce", 2 * b * s, 1)  # sum of exponentials and target logit, stacked
    if shape.kv_replicas > 1:  # wk and wv of each layer, summed over the ranks sharing the head
        add(KV, "bwd", "all_reduce", shape.head_dim * h, 2 * L, group="kv", p=shape.kv_replicas)
    return out


# ---- report -----------------------------------------------------------------------------------


@dataclass
class Line:
    row: str
    phase: str
    counted: Counter[Collective]
    predicted: Counter[Collective]

    @property
    def ok(self) -> bool:
        return self.counted == self.predicted


@dataclass
class Report:
    shape: StepShape
    sp: bool
    lines: list[Line]
    ranks_agree: bool

    @property
    def ok(self) -> bool:
        return self.ranks_agree and all(line.ok for line in self.lines)

    def ring_bytes(self, rows: tuple[str, ...] = ROWS) -> float:
        return sum(_ring(line.counted) for line in self.lines if line.row in rows)

    def table(self) -> str:
        head = (
            f"{'row':<26}{'phase':<7}{'counted':<20}{'calls':>6}{'pred':>6}"
            f"{'bytes':>12}{'pred bytes':>12}{'ring B/rank':>13}  match"
        )
        out = [head, "-" * len(head)]
        for line in self.lines:
            out.append(_format(line.row, line.phase, line.counted, line.predicted))
        for phase in (*PHASES, "all"):
            pick = [ln for ln in self.lines if phase in (ln.phase, "all")]
            counted = sum((ln.counted for ln in pick), Counter())
            predicted = sum((ln.predicted for ln in pick), Counter())
            out.append(_format("total", phase, counted, predicted, describe=False))
        for line in self.lines:
            if not line.ok:
                only = f"counted-only {_diff(line, True)}; predicted-only {_diff(line, False)}"
                out.append(f"DIFFERS {line.row} {line.phase}: {only}")
        if not self.ranks_agree:
            out.append("DIFFERS: the ranks did not all issue the same collectives")
        out.append(f"counted == predicted: {self.ok}")
        return "\n".join(out)


def _ring(c: Counter[Collective]) -> float:
    return sum(k.ring_bytes() * n for k, n in c.items())


def _format(
    row: str, phase: str, counted: Counter[Collective], predicted: Counter[Collective],
    *, describe: bool = True,
) -> str:  # fmt: skip
    ops: Counter[str] = Counter()
    for k, n in counted.items():
        base, paren, reduce_op = k.op.partition("(")
        where = "" if k.group == "tp" else f"@{k.group}"
        ops[SHORT.get(base, base) + paren + reduce_op + where] += n
    what = " + ".join(f"{n} {op}" for op, n in ops.items()) if describe else ""
    nbytes = sum(k.nbytes * n for k, n in counted.items())
    pred_bytes = sum(k.nbytes * n for k, n in predicted.items())
    return (
        f"{row:<26}{phase:<7}{what:<20}{counted.total():>6}{predicted.total():>6}"
        f"{nbytes:>12,}{pred_bytes:>12,}{_ring(counted):>13,.0f}  "
        f"{'yes' if counted == predicted else 'NO'}"
    )


def _diff(line: Line, counted_only: bool) -> str:
    a, b = (line.counted, line.predicted) if counted_only else (line.predicted, line.counted)
    return ", ".join(f"{n}x {k.op}@{k.group} {k.numel} el" for k, n in (a - b).items()) or "-"


def measure(
    cfg: ModelConfig, *, tp: int, batch: int, seq_len: int, sp_settings: list[bool]
) -> list[Report]:
    """Spawn a gloo world of `tp` ranks, count one step per SP setting, compare to `predict`."""
    shape = StepShape(tp, batch, seq_len, cfg.dim, cfg.n_layers, cfg.n_kv_heads, cfg.head_dim)
    with tempfile.TemporaryDirectory(prefix="megalite-tp-comm-") as tmp:
        out_path = Path(tmp) / "calls.json"
        start_processes(
            _rank_main,
            nprocs=tp,
            args=(tp, free_port(), cfg, batch, seq_len, sp_settings, str(out_path)),
        )
        results = json.loads(out_path.read_text())
    reports = []
    for sp in sp_settings:
        got = results[str(sp)]
        counted: dict[tuple[str, str], Counter[Collective]] = {}
        for row, phase, *c in got["calls"]:
            counted.setdefault((row, phase), Counter())[Collective(*c)] += 1
        predicted = predict(shape, sp=sp)
        keys = sorted(
            counted.keys() | predicted.keys(), key=lambda k: (ROWS.index(k[0]), PHASES.index(k[1]))
        )
        lines = [Line(r, p, counted.get((r, p), Counter()), predicted.get((r, p), Counter()))
                 for r, p in keys]  # fmt: skip
        reports.append(Report(shape, sp, lines, got["ranks_agree"]))
    return reports


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=64)
    sp = parser.add_mutually_exclusive_group()
    sp.add_argument("--sp", dest="sp", action="store_const", const=[True])
    sp.add_argument("--no-sp", dest="sp", action="store_const", const=[False])
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. model=tiny")
    args = parser.parse_args()
    sp_settings = args.sp or [False, True]
    overrides = args.overrides
    if not any(o.lstrip("+~").startswith("model=") for o in overrides):
        overrides = ["model=tiny", *overrides]
    cfg = compose_config(overrides).model
    if args.tp < 1 or args.seq_len > cfg.max_seq_len:
        parser.error(f"need tp >= 1 and seq_len <= max_seq_len ({cfg.max_seq_len})")
    if True in sp_settings and args.seq_len % args.tp:
        parser.error(f"sequence parallelism needs seq_len divisible by tp={args.tp}")

    reports = measure(
        cfg, tp=args.tp, batch=args.batch, seq_len=args.seq_len, sp_settings=sp_settings
    )
    act = args.batch * args.seq_len * cfg.dim
    for report in reports:
        print(
            f"\ntp={args.tp} sequence parallel={'on' if report.sp else 'off'}  model={cfg.name} "
            f"(n_layers={cfg.n_layers} dim={cfg.dim} n_heads={cfg.n_heads} "
            f"n_kv_heads={cfg.n_kv_heads} head_dim={cfg.head_dim})  batch={args.batch} "
            f"seq_len={args.seq_len} fp32, b·s·h={act:,} elements"
        )
        print("per rank, one forward + backward; bytes: the full (unsharded) tensor of each call")
        print(report.table())
    if len(reports) == 2:
        plain, seq = (r.ring_bytes(ACTIVATION_ROWS) for r in reports)
        print(
            f"\nring B/rank of the activation collectives (layers, embedding, head): no SP "
            f"{plain:,.0f}, SP {seq:,.0f}, equal: {plain == seq} (Korthikanti et al. 2022)"
        )
    if not all(r.ok for r in reports):
        print("\nSOME COUNTS DIFFER FROM THE ANALYTIC VALUES (see DIFFERS above)")


if __name__ == "__main__":
    main()
