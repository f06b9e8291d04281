#!/usr/bin/env python3
"""megalite's Triton kernels against torch eager and torch.compile of their references, on one
GPU, on training-sized inputs. Prints a table; measures, never asserts.

    python tools/bench/kernels.py [--tokens 16384] [--hidden 4096] [--vocab 131072] [--dtype bf16]
                                  [--only rmsnorm ...] [--warmup 5] [--repeats 20]
    python tools/bench/kernels.py --cpu-smoke   (tiny shapes on CPU under TRITON_INTERPRET=1)

Ops (T tokens, H hidden, F SwiGLU width, V vocabulary, e bytes per element of --dtype):

- rmsnorm fwd: y = norm(x) * w of x (T, H). Bytes: read x, write y: 2*T*H*e (+ w).
- rmsnorm fwd+bwd: the forward, then dx and dw from dy. Bytes: read x, write y; read dy and x,
  write dx: 5*T*H*e (+ w, dw).
- rmsnorm+residual fwd: h = x + r, y = norm(h) * w. Bytes: read x, r, write h, y: 4*T*H*e.
- rmsnorm+residual fwd+bwd: bytes 4*T*H*e forward, and read dy, dh, h, write dx (the gradient of
  both x and r, one tensor): 8*T*H*e.
- rotary fwd: q (b, Hq, s, d) and k (b, Hk, s, d) rotated, T = b*s, laid out as the model's
  (transposed views of (b, s, heads, d)). Bytes: read q, k, write both: 2*T*(Hq+Hk)*d*e (+ the
  fp32 cos/sin tables, 2*s*d*4). rotary fwd+bwd: twice that.
- swiglu fwd: silu(gate) * up, (T, F) each. Bytes: read 2, write 1: 3*T*F*e. swiglu fwd+bwd: and
  read dout, gate, up, write dgate, dup: 8*T*F*e.
- cross_entropy fwd+bwd: mean loss of logits (T, V) (5% of targets ignored) and its gradient.
  Bytes: read the logits (forward), read them again and write the gradient (backward):
  3*T*V*e (+ the int64 targets, 16*T).

Byte counts are what each op must move at the least (a kernel reads each input and writes each
output once; fp32 statistics of T numbers are left out); the same count divides every
implementation's time, so GB/s (1 GB = 1e9 bytes) compares them on the same work. The ceiling is
a device-to-device copy of a --copy-mib tensor (bytes = read + write), timed the same way.

Implementations: triton (`megalite.kernels.*`, through its autograd wrapper), eager (the
reference in torch, `megalite.kernels.reference`: `rms_norm`, `apply_rotary_qk`, `swiglu`, and
for the loss `cross_entropy`, F.cross_entropy on fp32 logits: what the model runs with
kernels.backend=torch) and compile (`torch.compile` of that reference,
default mode, dynamic=False; its compilation falls in the warm-up). fwd+bwd runs the forward and
`torch.autograd.grad` of its outputs with fixed random output gradients (no .grad accumulation);
fwd runs under no_grad.

Method: per op, the inputs are made once; each implementation is checked against eager first (max
relative error: max |out - ref| / max |ref| over every output and gradient, in fp32; flagged when
above the tests' tolerance, 1e-2 for bf16/fp16, 1e-5 for fp32), then its peak memory is taken
over one call (torch.cuda.max_memory_allocated minus what was allocated before: outputs,
gradients and temporaries, not the inputs), then it is timed: --warmup calls, then --repeats calls
each between two CUDA events, median reported. Goals (issue 8): every op here is memory-bound, so
triton >= 80% of the copy ceiling and >= 1.5x eager, and within tolerance.

Without CUDA the script says so and exits 2. --cpu-smoke runs the same code on tiny shapes on CPU
under Triton's interpreter (set before triton is imported), timing with time.perf_counter and
compiling with inductor's CPU backend (--no-compile skips it): it checks the script and the
kernels' agreement, not speed; its timings mean nothing.
"""

# ruff: noqa: E402  (sys.path is set before the megalite imports)
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
TOLERANCE = {torch.bfloat16: 1e-2, torch.float16: 1e-2, torch.float32: 1e-5}
GOAL_CEILING = 0.80  # of the copy ceiling
GOAL_SPEEDUP = 1.5  # over eager
IGNORE_INDEX = -100
EPS = 1e-5
GB = 1e9
MIB = 2**20
KERNELS = ("rmsnorm", "rmsnorm_residual", "rotary", "swiglu", "cross_entropy")
IMPLS = ("triton", "eager", "compile")

# Shapes: a training step of an 8B-class model (16k tokens of 4 sequences of 4096), and tiny ones
# for --cpu-smoke (odd sizes, so masking is exercised; the interpreter is slow).
TRAINING = dict(
    tokens=16384, hidden=4096, ffn=14336, vocab=131072, heads=32, kv_heads=8, head_dim=128,
    seq=4096, warmup=5, repeats=20, copy_mib=2048,
)  # fmt: skip
SMOKE = dict(
    tokens=24, hidden=96, ffn=160, vocab=1000, heads=4, kv_heads=2, head_dim=16, seq=12,
    warmup=1, repeats=3, copy_mib=16,
)  # fmt: skip

Tensors = tuple[torch.Tensor, ...]


@dataclass
class Case:
    """One op: its inputs, the implementations to compare and the bytes it must move."""

    name: str  # "rmsnorm fwd+bwd"
    kernel: str  # the --only key
    nbytes: int
    inputs: Tensors  # made once; requires_grad on the differentiable ones when backward
    impls: dict[str, Callable[..., torch.Tensor | Tensors]]  # triton, eager (the reference)
    backward: bool
    grad_outputs: Tensors = ()  # one per output, when backward


@dataclass
class Row:
    case: str
    impl: str
    ms: float = float("nan")
    err: float = float("nan")
    peak: float = float("nan")  # bytes over the inputs
    gbps: float = float("nan")
    note: str = ""  # why there is no time (a failure)


# ---- inputs and cases ------------------------------------------------------------------------


def randn(*shape: int, dtype: torch.dtype, device: torch.device, grad: bool) -> torch.Tensor:
    return torch.randn(*shape, dtype=dtype, device=device).requires_grad_(grad)


def rope_tables(seq: int, head_dim: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """fp32 cos, sin (seq, head_dim) in the rotate-half layout, as `RotaryEmbedding` builds them."""
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim))
    angles = torch.outer(torch.arange(seq, device=device).float(), inv_freq)  # (seq, d/2)
    angles = torch.cat((angles, angles), dim=-1)  # (seq, d)
    return angles.cos(), angles.sin()


def case_builders(args: argparse.Namespace, device: torch.device) -> list[Callable[[], Case]]:
    """One thunk per case of the kernels named by --only; each builds its inputs when called, so
    that only one case's tensors are alive at a time."""
    from megalite.kernels import reference
    from megalite.kernels.cross_entropy import cross_entropy
    from megalite.kernels.rmsnorm import rms_norm
    from megalite.kernels.rotary import apply_rotary_qk
    from megalite.kernels.swiglu import swiglu

    dt, e = args.dtype, args.dtype.itemsize
    t, h, f, v = args.tokens, args.hidden, args.ffn, args.vocab
    kw = dict(dtype=dt, device=device)

    def rmsnorm(backward: bool) -> Case:
        x = randn(t, h, **kw, grad=backward)
        w = (1 + 0.1 * torch.randn(h, **kw)).requires_grad_(backward)
        return Case(
            f"rmsnorm {'fwd+bwd' if backward else 'fwd'}", "rmsnorm",
            (5 if backward else 2) * t * h * e + (2 if backward else 1) * h * e, (x, w),
            {"triton": lambda x, w: rms_norm(x, w, EPS),
             "eager": lambda x, w: reference.rms_norm(x, w, EPS)},
            backward, (randn(t, h, **kw, grad=False),) if backward else (),
        )  # fmt: skip

    def rmsnorm_residual(backward: bool) -> Case:
        x, r = randn(t, h, **kw, grad=backward), randn(t, h, **kw, grad=backward)
        w = (1 + 0.1 * torch.randn(h, **kw)).requires_grad_(backward)
        dys = (randn(t, h, **kw, grad=False), randn(t, h, **kw, grad=False)) if backward else ()
        return Case(
            f"rmsnorm+residual {'fwd+bwd' if backward else 'fwd'}", "rmsnorm_residual",
            (8 if backward else 4) * t * h * e + (2 if backward else 1) * h * e, (x, w, r),
            {"triton": lambda x, w, r: rms_norm(x, w, EPS, residual=r),
             "eager": lambda x, w, r: reference.add_rms_norm(x, r, w, EPS)},
            backward, dys,
        )  # fmt: skip

    def rotary(backward: bool) -> Case:
        s = min(args.seq, t)
        b = max(1, t // s)
        hq, hk, d = args.heads, args.kv_heads, args.head_dim

        def qk(heads: int) -> torch.Tensor:  # (b, heads, s, d), the model's transposed layout
            return torch.randn(b, s, heads, d, **kw).transpose(1, 2).detach()

        q, k = qk(hq).requires_grad_(backward), qk(hk).requires_grad_(backward)
        cos, sin = rope_tables(s, d, device)
        dys = (qk(hq), qk(hk)) if backward else ()
        nbytes = (4 if backward else 2) * b * s * (hq + hk) * d * e + 2 * s * d * 4
        return Case(
            f"rotary {'fwd+bwd' if backward else 'fwd'}", "rotary", nbytes, (q, k, cos, sin),
            {"triton": apply_rotary_qk, "eager": reference.apply_rotary_qk}, backward, dys,
        )  # fmt: skip

    def swiglu_case(backward: bool) -> Case:
        gate, up = randn(t, f, **kw, grad=backward), randn(t, f, **kw, grad=backward)
        return Case(
            f"swiglu {'fwd+bwd' if backward else 'fwd'}", "swiglu",
            (8 if backward else 3) * t * f * e, (gate, up),
            {"triton": swiglu, "eager": reference.swiglu},
            backward, (randn(t, f, **kw, grad=False),) if backward else (),
        )  # fmt: skip

    def ce() -> Case:
        logits = (2 * torch.randn(t, v, **kw)).requires_grad_(True)
        targets = torch.randint(0, v, (t,), device=device)
        targets[torch.rand(t, device=device) < 0.05] = IGNORE_INDEX
        return Case(
            "cross_entropy fwd+bwd", "cross_entropy", 3 * t * v * e + 16 * t, (logits, targets),
            {"triton": lambda x, y: cross_entropy(x, y, ignore_index=IGNORE_INDEX),
             "eager": lambda x, y: reference.cross_entropy(x, y, ignore_index=IGNORE_INDEX)},
            True, (torch.ones((), device=device),),
        )  # fmt: skip

    builders = {
        "rmsnorm": [lambda: rmsnorm(False), lambda: rmsnorm(True)],
        "rmsnorm_residual": [lambda: rmsnorm_residual(False), lambda: rmsnorm_residual(True)],
        "rotary": [lambda: rotary(False), lambda: rotary(True)],
        "swiglu": [lambda: swiglu_case(False), lambda: swiglu_case(True)],
        "cross_entropy": [ce],
    }
    return [b for name in (args.only or KERNELS) for b in builders[name]]


# ---- running, checking, timing ---------------------------------------------------------------


def as_tuple(out: torch.Tensor | Tensors) -> Tensors:
    return (out,) if isinstance(out, torch.Tensor) else tuple(out)


def runner(case: Case, fn: Callable[..., torch.Tensor | Tensors]) -> Callable[[], Tensors]:
    """A no-argument call of fn on the case's inputs: its outputs (and, for fwd+bwd, the
    gradients of the inputs that require one, from the case's output gradients)."""
    wrt = [x for x in case.inputs if x.requires_grad]

    def forward() -> Tensors:
        with torch.no_grad():
            return as_tuple(fn(*case.inputs))

    def forward_backward() -> Tensors:
        outs = as_tuple(fn(*case.inputs))
        grads = torch.autograd.grad(outs, wrt, case.grad_outputs)
        return tuple(o.detach() for o in outs) + tuple(grads)

    return forward_backward if case.backward else forward


def max_rel_err(outs: Tensors, refs: Tensors, chunk: int = 2**26) -> float:
    """max |out - ref| / max |ref| over all outputs, in fp32, a chunk of elements at a time (the
    gradients of the logits are GiBs; an fp32 copy of a whole one would be more)."""
    worst = 0.0
    for out, ref in zip(outs, refs, strict=True):
        if out.shape != ref.shape:
            return float("inf")
        a, b = out.reshape(-1), ref.reshape(-1)
        diff = scale = 0.0
        for i in range(0, a.numel(), chunk):
            a32, b32 = a[i : i + chunk].float(), b[i : i + chunk].float()
            diff = max(diff, (a32 - b32).abs().max().item())
            scale = max(scale, b32.abs().max().item())
        worst = max(worst, diff / max(scale, torch.finfo(torch.float32).tiny))
    return worst


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> float:
    """Median milliseconds of fn over `repeats` calls after `warmup` calls: CUDA events around
    each call on a GPU, time.perf_counter (after a synchronize) elsewhere."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    if device.type == "cuda":
        events = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            events.append((start, end))
        torch.cuda.synchronize(device)
        return statistics.median(s.elapsed_time(e) for s, e in events)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def peak_bytes(fn: Callable[[], Tensors], device: torch.device) -> float:
    """Peak allocated bytes over one call, above what was allocated before it (nan off CUDA)."""
    if device.type != "cuda":
        return float("nan")
    synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = fn()
    synchronize(device)
    del out
    return float(torch.cuda.max_memory_allocated(device) - base)


def copy_ceiling(args: argparse.Namespace, device: torch.device) -> float:
    """GB/s of a device-to-device copy of a --copy-mib tensor (bytes read + written)."""
    n = args.copy_mib * MIB
    src = torch.empty(n, dtype=torch.uint8, device=device).random_(0, 256)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, args.warmup, args.repeats)
    return 2 * n / (ms * 1e-3) / GB


def short(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".splitlines()[0]
    return text[:60]


def run_case(case: Case, args: argparse.Namespace, device: torch.device) -> list[Row]:
    impls = dict(case.impls)
    if not args.no_compile:
        impls["compile"] = torch.compile(case.impls["eager"], dynamic=False)
    calls = {name: runner(case, fn) for name, fn in impls.items()}
    rows = {name: Row(case.name, name) for name in IMPLS if name in calls}
    print(f"  {case.name}: checking", end="", flush=True)
    ref = calls["eager"]()
    for name in ("triton", "compile"):
        if name in calls:
            try:
                rows[name].err = max_rel_err(calls[name](), ref)
            except Exception as exc:  # a failing implementation is a row, not a crash
                rows[name].note = short(exc)
    rows["eager"].err = 0.0
    del ref
    print(", timing", end="", flush=True)
    for name, call in calls.items():
        row = rows[name]
        if row.note:
            continue
        try:
            row.peak = peak_bytes(call, device)
            row.ms = time_ms(call, device, args.warmup, args.repeats)
            row.gbps = case.nbytes / (row.ms * 1e-3) / GB
        except Exception as exc:
            row.note = short(exc)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(" done", flush=True)
    return [rows[name] for name in IMPLS if name in rows]


# ---- report ----------------------------------------------------------------------------------


def fmt(x: float, spec: str, width: int) -> str:
    return f"{'-':>{width}}" if x != x else f"{x:>{width}{spec}}"  # nan -> "-"


def report(
    rows: list[Row], cases: Sequence[Case], ceiling: float, args: argparse.Namespace
) -> None:
    tol = TOLERANCE[args.dtype]
    nbytes = {c.name: c.nbytes for c in cases}
    eager_ms = {r.case: r.ms for r in rows if r.impl == "eager"}
    head = (
        f"{'op':<26}{'impl':<9}{'MB moved':>10}{'ms':>10}{'GB/s':>9}{'% copy':>8}"
        f"{'vs eager':>10}{'max rel err':>13}{'peak MiB':>10}"
    )
    print()
    print(head)
    print("-" * len(head))
    for r in rows:
        speedup = eager_ms.get(r.case, float("nan")) / r.ms
        bad = "" if r.impl == "eager" or r.err != r.err or r.err <= tol else " BAD"
        line = (
            f"{r.case:<26}{r.impl:<9}{nbytes[r.case] / 1e6:>10.1f}{fmt(r.ms, '.3f', 10)}"
            f"{fmt(r.gbps, '.0f', 9)}{fmt(100 * r.gbps / ceiling, '.0f', 8)}"
            f"{fmt(speedup, '.2f', 9)}x{fmt(r.err, '.1e', 13)}{bad}"
            f"{fmt(r.peak / MIB, '.0f', 10 - len(bad))}"
        )
        print(line + (f"  ({r.note})" if r.note else ""))
    print(f"\ncopy ceiling: {ceiling:.0f} GB/s ({args.copy_mib} MiB copied device to device)")
    print(
        f"goals (memory-bound kernels): triton >= {GOAL_CEILING:.0%} of the copy ceiling and "
        f">= {GOAL_SPEEDUP}x eager, max rel err <= {tol:g}:"
    )
    for r in rows:
        if r.impl != "triton":
            continue
        frac, speedup = r.gbps / ceiling, eager_ms.get(r.case, float("nan")) / r.ms
        ok = frac >= GOAL_CEILING and speedup >= GOAL_SPEEDUP and r.err <= tol
        detail = r.note or f"{frac:.0%} of copy, {speedup:.2f}x eager, err {r.err:.1e}"
        print(f"  {'PASS' if ok else 'FAIL'} {r.case}: {detail}")


# ---- main ------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, help="rows: batch x sequence (16384)")
    parser.add_argument("--hidden", type=int, help="RMSNorm width (4096)")
    parser.add_argument("--ffn", type=int, help="SwiGLU width (14336)")
    parser.add_argument("--vocab", type=int, help="cross-entropy vocabulary (131072)")
    parser.add_argument("--heads", type=int, help="rotary q heads (32)")
    parser.add_argument("--kv-heads", type=int, help="rotary k heads (8)")
    parser.add_argument("--head-dim", type=int, help="rotary head dim (128)")
    parser.add_argument("--seq", type=int, help="rotary sequence length; tokens / seq = batch")
    parser.add_argument("--dtype", choices=DTYPES, default="bf16")
    parser.add_argument("--only", action="append", choices=KERNELS, help="repeatable")
    parser.add_argument("--warmup", type=int, help="untimed calls per implementation (5)")
    parser.add_argument("--repeats", type=int, help="timed calls per implementation (20)")
    parser.add_argument("--copy-mib", type=int, help="size of the ceiling's copy (2048)")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    parser.add_argument(
        "--cpu-smoke", action="store_true",
        help="tiny shapes on CPU under TRITON_INTERPRET=1: checks the script, not speed",
    )  # fmt: skip
    args = parser.parse_args()
    for key, value in (SMOKE if args.cpu_smoke else TRAINING).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.dtype = DTYPES[args.dtype]
    return args


def main() -> None:
    args = parse_args()
    if args.cpu_smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before megalite.kernels imports triton
        device = torch.device("cpu")
    elif not torch.cuda.is_available():
        print("kernels.py: no CUDA device; this is a GPU benchmark (--cpu-smoke checks it on CPU)")
        sys.exit(2)
    else:
        device = torch.device("cuda")
    import triton

    torch.manual_seed(0)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (interpreter)"
    print(
        f"{name}, torch {torch.__version__}, triton {triton.__version__}, "
        f"dtype {str(args.dtype).removeprefix('torch.')}"
    )
    print(
        f"tokens {args.tokens}, hidden {args.hidden}, ffn {args.ffn}, vocab {args.vocab}, "
        f"rotary {args.heads}/{args.kv_heads} heads x {args.head_dim} "
        f"(seq {min(args.seq, args.tokens)}); "
        f"median of {args.repeats} after {args.warmup} warm-up"
    )
    if args.cpu_smoke:
        print("cpu smoke: Triton's interpreter on CPU; timings and GB/s mean nothing here")
    ceiling = copy_ceiling(args, device)
    rows: list[Row] = []
    cases: list[Case] = []
    for build in case_builders(args, device):
        case = build()
        rows += run_case(case, args, device)
        case.inputs = case.grad_outputs = ()  # free the tensors, keep name and bytes
        cases.append(case)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    report(rows, cases, ceiling, args)


if __name__ == "__main__":
    main()
