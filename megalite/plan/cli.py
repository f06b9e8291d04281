"""`python tools/plan.py` / `megalite-plan`: how big a model, how many tokens, which layout fits,
how long and at what cost, before a single GPU-hour is spent.

    chinchilla --compute 1e23 [--fit hoffmann|epoch] [--method approach1|approach2|approach3]
    budget --gpus 512 --gpu h100 --days 30 --mfu 0.4 [--price-per-gpu-hour 2.5]
    estimate model=7b --gpus 256 --gpu h100 tp=2 pp=1 zero=1 micro_batch=2 seq_len=4096 \\
        global_batch=1024 ac=selective
    search model=70b --gpus 512 --gpu h100 --seq-len 4096 --global-batch 1024

Layout and model settings are given as flags or as Hydra-style key=value arguments (the short
names above, or the training config's own: parallel.tp=2, trainer.micro_batch_size=2, ...).
Every command prints a readable table, `--json` prints the same figures for scripts, and
`--plot [FILE.png]` draws a picture (default: `<command>.png` in the current folder). Bad input
exits with status 2 and one line on stderr.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path

from megalite.plan import scaling
from megalite.plan.errors import PlanError
from megalite.plan.layout import AC_MODES, PRECISIONS


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (and still exit status 2), and -1e21 reads as a
    (negative) number, not as an unknown flag, so it is refused for being negative."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{text!r} is not a boolean: use true or false")


SLURM_UNITS = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def _slurm_mem(text: str) -> int | None:
    """`--mem` as SLURM reads it (480G, 512000M, 2T; a bare number is MiB) in bytes; 0 (all of
    the node's memory) is None: nothing to check against."""
    m = re.fullmatch(r"(\d+)([KMGT]?)B?", text.strip().upper())
    if not m:
        raise ValueError(f"{text!r} is not a SLURM memory size: use e.g. 480G or 512000M")
    n = int(m.group(1)) * SLURM_UNITS[m.group(2) or "M"]
    return n or None


def _count(text: str) -> float:
    """A count or FLOP figure such as 1e23, 70e9 or 2_000_000."""
    return float(text.replace("_", ""))


# key=value names → (argparse dest, converter). Short names, then the training config's own.
_KEYS: dict[str, tuple[str, Callable[[str], object]]] = {}
for _names, _dest, _conv in (
    (("model",), "model", str),
    (("gpus",), "gpus", int),
    (("gpu",), "gpu", str),
    (("mfu",), "mfu", float),
    (("tp", "parallel.tp"), "tp", int),
    (("pp", "parallel.pp"), "pp", int),
    (("dp", "parallel.dp"), "dp", int),
    (("zero", "zero_stage", "parallel.zero_stage"), "zero", int),
    (("sp", "sequence_parallel", "parallel.sequence_parallel"), "sp", _bool),
    (("ac", "activation_checkpointing", "parallel.activation_checkpointing"), "ac", str),
    (("micro_batch", "micro_batch_size", "trainer.micro_batch_size"), "micro_batch", int),
    (("seq_len", "trainer.seq_len"), "seq_len", int),
    (("global_batch", "global_batch_size", "trainer.global_batch_size"), "global_batch", int),
    (("precision", "trainer.precision"), "precision", str),
    (("mem", "cluster.mem"), "node_mem", _slurm_mem),
):
    for _name in _names:
        _KEYS[_name] = (_dest, _conv)


def _apply_overrides(args: argparse.Namespace) -> None:
    """Set args from the key=value arguments (after the flags, so they win, as in Hydra)."""
    for item in getattr(args, "overrides", []) or []:
        key, sep, value = item.partition("=")
        key = key.lstrip("+")
        if not sep or not value:
            raise PlanError(f"{item!r} is not key=value (e.g. tp=2)")
        if key not in _KEYS or not hasattr(args, _KEYS[key][0]):
            known = sorted(k for k, (d, _) in _KEYS.items() if "." not in k and hasattr(args, d))
            raise PlanError(f"unknown setting {key!r} for {args.command}: use {', '.join(known)}")
        dest, conv = _KEYS[key]
        try:
            setattr(args, dest, conv(value))
        except ValueError as e:
            raise PlanError(f"{key}={value}: {e}") from None
    if getattr(args, "ac", None) not in (None, *AC_MODES):
        raise PlanError(f"ac={args.ac!r}: use one of {', '.join(AC_MODES)}")
    if getattr(args, "precision", None) not in (None, *PRECISIONS):
        raise PlanError(f"precision={args.precision!r}: use one of {', '.join(PRECISIONS)}")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument(
        "--plot",
        nargs="?",
        const="",
        metavar="FILE.png",
        help="also draw a picture into FILE.png (default: <command>.png here)",
    )


def _law(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--fit",
        choices=sorted(scaling.FITS),
        default="epoch",
        help="the loss law's coefficients: Besiroglu et al. 2024's refit (default; its optimum "
        "agrees with Hoffmann et al.'s approaches 1 and 2) or Hoffmann et al. 2022's Appendix D.2 "
        "(rounded: ~80 tokens per parameter at 1e23 FLOPs)",
    )
    p.add_argument(
        "--method",
        choices=scaling.METHODS,
        default="approach3",
        help="Hoffmann et al.'s approach to the optimum (default: the parametric law)",
    )


def _sized(p: argparse.ArgumentParser, *, what: str, example: str) -> None:
    """A model given as a preset or by its size, its tokens, the loss law, the output options;
    `what` is what the command works out when the tokens or the size is not given."""
    p.add_argument("--model", help="a preset of conf/model/: its size, its exact FLOPs per token")
    p.add_argument("--params", type=_count, help="a model of this size (6N FLOPs per token)")
    p.add_argument("--tokens", type=_count, help=f"training tokens (without: {what})")
    p.add_argument("--seq-len", type=int, help="for --model (default: its max_seq_len)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help=example)
    _law(p)
    _common(p)


def _gpu(p: argparse.ArgumentParser, *, default: str | None) -> None:
    p.add_argument(
        "--gpu",
        default=default,
        help="h100, h100-pcie, h200, a100-40gb, a100-80gb, "
        "b200, mi300x, l40s, or any name with --peak-tflops and --memory-gib",
    )
    p.add_argument("--peak-tflops", type=float, help="peak dense bf16 TFLOP/s (custom GPU)")
    p.add_argument("--memory-gib", type=float, help="memory per GPU in GiB (custom GPU)")
    p.add_argument("--link-gb-s", type=float, help="intra-node GB/s per direction (custom GPU)")
    p.add_argument("--gpus", type=int, help="number of GPUs")
    p.add_argument("--mfu", type=float, default=0.4, help="assumed model FLOPs utilisation")


def _layout(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="model=7b tp=2 pp=1 zero=1 micro_batch=2 seq_len=4096 global_batch=1024 "
        "ac=selective sp=true precision=bf16 (or parallel.tp=2, ...)",
    )
    p.add_argument("--model", help="a preset of conf/model/ (e.g. 7b)")
    for flag, kind in (
        ("--tp", int),
        ("--pp", int),
        ("--dp", int),
        ("--zero", int),
        ("--micro-batch", int),
        ("--global-batch", int),
    ):
        p.add_argument(flag, type=kind)
    p.add_argument("--seq-len", type=int, help="default: the preset's max_seq_len")
    p.add_argument("--ac", choices=AC_MODES, help="activation checkpointing")
    p.add_argument("--sp", action=argparse.BooleanOptionalAction, help="sequence parallelism")
    p.add_argument("--precision", choices=PRECISIONS)
    p.add_argument(
        "--usable-memory",
        type=float,
        default=0.9,
        help="fraction of GPU memory for tensors (the rest: CUDA context, NCCL, "
        "fragmentation); default 0.9",
    )
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument(
        "--inter-node-gb-s",
        type=float,
        default=50.0,
        help="network GB/s per GPU and direction (default 50: 400 Gb/s per GPU)",
    )


def build_parser() -> argparse.ArgumentParser:
    from megalite.plan import commands

    parser = _Parser(prog="megalite-plan", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("chinchilla", help="compute-optimal parameters, tokens and loss")
    p.add_argument("--compute", type=_count, nargs="+", metavar="FLOPS")
    _sized(p, what="the other: its compute-optimal value", example="model=7b seq_len=4096")
    p.set_defaults(run=commands.chinchilla)

    p = sub.add_parser("budget", help="what a cluster buys, or what a job costs")
    _gpu(p, default="h100")
    p.add_argument("--days", type=float)
    p.add_argument("--price-per-gpu-hour", type=float, help="for the cost, in dollars")
    _sized(p, what="--days, or the compute-optimal tokens", example="model=7b gpus=512 ...")
    p.set_defaults(run=commands.budget)

    p = sub.add_parser("estimate", help="FLOPs, memory per GPU and step time of one layout")
    _gpu(p, default="h100")
    _layout(p)
    p.add_argument(
        "--node-mem",
        type=_slurm_mem,
        metavar="SIZE",
        help="host memory of a node's job (cluster.mem, e.g. 480G): warn if start-up needs more",
    )
    _common(p)
    p.set_defaults(run=commands.run_estimate)

    p = sub.add_parser("search", help="the layouts that fit, fastest first")
    _gpu(p, default="h100")
    _layout(p)
    p.add_argument("--top", type=int, default=10, help="how many layouts to show (0: all)")
    _common(p)
    p.set_defaults(run=commands.run_search)
    return parser


def _plot_path(args: argparse.Namespace) -> None:
    """Resolve `--plot`: alone it names `<command>.png` in the current folder, as `prepare_data
    stats DIR --plot` names DIR/stats.png. A key=value argument right after it (`--plot model=7b`),
    which argparse takes for its value, is put back among the settings."""
    plot = getattr(args, "plot", None)
    if plot is None:
        return
    key, sep, _ = plot.partition("=")
    if sep and key.lstrip("+") in _KEYS:
        args.overrides.append(plot)
        plot = ""
    args.plot = str(Path(plot or f"{args.command}.png").expanduser())


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # key=value arguments may sit between flags, which plain parse_args refuses.
    args, extra = parser.parse_known_args(argv)
    unknown = [x for x in extra if x.startswith("-") or "=" not in x]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.overrides = [*(getattr(args, "overrides", None) or []), *extra]
    _plot_path(args)
    try:
        _apply_overrides(args)
        out = args.run(args)
    except PlanError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if getattr(args, "json", False) and args.plot:  # the table says it; stdout stays JSON
        print(f"plot: {args.plot}", file=sys.stderr)
    try:
        print(out)
    except BrokenPipeError:  # e.g. piped into `head`
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - silence the flush at exit
    return 0


if __name__ == "__main__":
    sys.exit(main())
