"""`megalite-evaluate` (tools/evaluate.py): lm-eval tasks and text perplexity of a checkpoint.

    megalite-evaluate CKPT --tasks hellaswag,arc_easy [--limit N] [--include-path DIR]
    megalite-evaluate CKPT --perplexity a.txt b.txt

Tasks run through lm-eval's `simple_evaluate` with the `megalite` model class
(megalite/infer/lm_eval.py); the table printed has one row per task and metric. Task names are
checked against lm-eval's task index (plus `--include-path`) before the model loads: an unknown
one is refused in one line naming the closest known names. `--perplexity` scores each file as one
text with the checkpoint's tokenizer over windows of max_seq_len tokens that advance by half a
window, so every token is scored once with at least max_seq_len/2 tokens of context
(`MegaliteLM.text_logprob`). Bad input (a folder that is no checkpoint, a checkpoint without a
tokenizer, an unknown task) exits 2 with one line.
"""

from __future__ import annotations

import argparse
import difflib
import json
import math
import sys
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

from megalite.checkpoint.store import CheckpointError
from megalite.infer.generate import GenerateError

PROG = "megalite-evaluate"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="a checkpoint (any layout), run folder or HF Llama folder")
    p.add_argument("--tasks", default=None, help="comma-separated lm-eval task or group names")
    p.add_argument("--limit", type=float, default=None, help="examples per task (<1: a fraction)")
    p.add_argument("--num-fewshot", type=int, default=None)
    p.add_argument("--include-path", action="append", default=[], metavar="DIR",
                   help="a folder of task YAML files (repeatable)")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", help="fp32, bf16 or fp16")
    p.add_argument("--max-length", type=int, default=None, help="default: the model's max_seq_len")
    p.add_argument("--bootstrap-iters", type=int, default=100000,
                   help="bootstrap draws for the stderr of non-mean metrics (0: none)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", type=Path, default=None, help="write lm-eval's results as JSON")
    p.add_argument("--perplexity", nargs="+", type=Path, default=[], metavar="FILE",
                   help="token-level perplexity of text files")  # fmt: skip
    return p


@lru_cache(maxsize=4)
def task_manager(include_path: tuple[str, ...]) -> Any:
    """lm-eval's task index with `include_path` (building it reads every task YAML: ~8 s)."""
    from lm_eval.tasks import TaskManager  # type: ignore[import-untyped]

    return TaskManager(include_path=list(include_path) or None)


def unknown_tasks(names: list[str], manager: Any) -> str | None:
    """One line naming each task lm-eval does not know, with the closest known names."""
    known = manager.all_tasks
    parts = []
    for name in names:
        if name in known or manager.match_tasks([name]) or Path(name).is_file():
            continue
        close = difflib.get_close_matches(name, known, n=5, cutoff=0.6)
        hint = f"closest: {', '.join(close)}" if close else "see `lm-eval ls tasks`"
        parts.append(f"{name!r} ({hint})")
    return f"unknown task {'; '.join(parts)}" if parts else None


def metric_rows(results: dict[str, Any]) -> list[tuple[str, str, float, float | None]]:
    """(task, metric, value, stderr) of lm-eval's results, groups included."""
    rows = []
    for task, metrics in results["results"].items():
        for key, value in metrics.items():
            metric, _, filt = key.partition(",")
            skip = key in ("alias", "sample_len", "samples") or "_stderr" in metric
            if skip or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            err = metrics.get(f"{metric}_stderr,{filt}")
            name = metric if filt in ("", "none") else f"{metric} ({filt})"
            rows.append((task, name, float(value), err if isinstance(err, (int, float)) else None))
    return rows


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [header, ["-" * w for w in widths], *rows]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in lines)  # fmt: skip


def _evaluate(lm: Any, args: argparse.Namespace, tasks: list[str], manager: Any) -> str:
    import lm_eval  # type: ignore[import-untyped]
    from lm_eval.utils import handle_non_serializable  # type: ignore[import-untyped]

    results = lm_eval.simple_evaluate(
        model=lm, tasks=tasks, num_fewshot=args.num_fewshot, limit=args.limit,
        task_manager=manager, bootstrap_iters=args.bootstrap_iters, log_samples=False,
        random_seed=args.seed, numpy_random_seed=args.seed, torch_random_seed=args.seed,
        fewshot_random_seed=args.seed,
    )  # fmt: skip
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(results, indent=2, default=handle_non_serializable))
    rows = [
        (t, m, _number(v), "" if e is None else _number(e)) for t, m, v, e in metric_rows(results)
    ]
    return table(("task", "metric", "value", "stderr"), rows)


def _number(x: float) -> str:
    return f"{x:.4f}" if abs(x) < 1e6 else f"{x:.4e}"


def _perplexity(lm: Any, files: list[Path]) -> str:
    rows = []
    for file in files:
        n, logprob = lm.text_logprob(file.read_text(encoding="utf-8"))
        nll = -logprob / n if n else float("nan")
        rows.append((str(file), str(n), f"{nll:.4f}", f"{math.exp(nll):.3f}"))
    return table(("file", "tokens", "nll/token", "perplexity"), rows)


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    tasks = [t.strip() for t in (args.tasks or "").split(",") if t.strip()]
    if not tasks and not args.perplexity:
        print(f"{PROG}: error: nothing to do: give --tasks and/or --perplexity", file=sys.stderr)
        return 2
    missing = [str(f) for f in args.perplexity if not f.is_file()]
    if missing:
        print(f"{PROG}: error: no such file {', '.join(missing)}", file=sys.stderr)
        return 2
    from megalite.rank.env import name_deepspeed_accelerator

    name_deepspeed_accelerator()  # before a ZeRO checkpoint's unpickling imports DeepSpeed
    try:
        from megalite.infer.lm_eval import EvalError, MegaliteLM
    except ModuleNotFoundError as e:
        if e.name is None or not e.name.startswith("lm_eval"):
            raise
        print(f"{PROG}: error: lm-eval is not installed: pip install 'megalite[eval]'",
              file=sys.stderr)  # fmt: skip
        return 2

    manager = task_manager(tuple(str(p) for p in args.include_path)) if tasks else None
    unknown = unknown_tasks(tasks, manager) if tasks else None
    if unknown:
        print(f"{PROG}: error: {unknown}", file=sys.stderr)
        return 2
    try:
        lm = MegaliteLM(checkpoint=args.checkpoint, device=args.device, dtype=args.dtype,
                        batch_size=args.batch_size, max_length=args.max_length)  # fmt: skip
        if tasks:
            print(_evaluate(lm, args, tasks, manager), flush=True)
        if args.perplexity:
            print(_perplexity(lm, args.perplexity), flush=True)
    except (CheckpointError, EvalError, GenerateError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
