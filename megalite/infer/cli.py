"""`python tools/generate.py` / `megalite-generate`: continue prompts with any model megalite reads.

    generate CKPT --prompt "ROMEO:" [--prompt ...] [--prompts-file F] [--max-new-tokens N]
        [--temperature T] [--top-k K] [--top-p P] [--seed S] [--device cpu|cuda]
        [--dtype fp32|bf16] [--batch-size B]

CKPT is a megalite checkpoint (native of any layout, or layout-free), a run folder (its latest
checkpoint) or a Hugging Face Llama folder. Each prompt is printed followed by its continuation and
a blank line. With the default --batch-size 1 the prompts run one after another and each token is
printed as it comes; a larger batch runs that many prompts at once and prints each when the batch
is done. A continuation stops at the model's end-of-sequence token (not printed) or after
--max-new-tokens. Sampling with a --seed gives the same text at any batch size (see
megalite/infer/generate.py). Bad input exits with status 2 and one line on stderr.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from megalite.checkpoint.store import CheckpointError
from megalite.infer.generate import GenerateError, OnToken, check_request, generate
from megalite.infer.load import Tokenizer, load_model

PROG = "megalite-generate"


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (still exit status 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{PROG}: error: {message} (see --help)\n")


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="Continue prompts with a megalite or Hugging Face model.")
    p.add_argument("ckpt", help="checkpoint, run folder or Hugging Face Llama folder")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompts-file", type=Path, help="more prompts, one a line (blank: skipped)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument(
        "--batch-size", type=int, default=1, help="1 (default): stream each prompt's tokens"
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        _run(args)
    except (CheckpointError, GenerateError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    return 0


def _prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt)
    if args.prompts_file is not None:
        try:
            lines = args.prompts_file.read_text(encoding="utf-8").splitlines()
        except OSError as e:
            raise GenerateError(f"--prompts-file {args.prompts_file}: {e.strerror}") from None
        prompts += [line for line in lines if line.strip()]
    if not prompts:
        raise GenerateError("no prompt: give --prompt TEXT or --prompts-file FILE")
    return prompts


def _run(args: argparse.Namespace) -> None:
    import torch

    if args.batch_size < 1:
        raise GenerateError(f"--batch-size must be at least 1 (got {args.batch_size})")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise GenerateError("--device cuda: no CUDA device is available here")
    texts = _prompts(args)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    loaded = load_model(args.ckpt, device=args.device, dtype=dtype)
    tok = loaded.tokenizer
    assert tok is not None  # load_model raised otherwise
    prompts = [tok.encode(t) for t in texts]
    stops = () if tok.eos_id is None else (tok.eos_id,)
    # Every prompt is checked before the first runs: a bad one fails the command up front.
    check_request(loaded.model, prompts, max_new_tokens=args.max_new_tokens,
                  temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)  # fmt: skip

    def run(batch: list[list[int]], start: int, on_token: OnToken | None) -> list[list[int]]:
        return generate(
            loaded.model,
            batch,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            seed=args.seed + start,
            stop_ids=stops,
            on_token=on_token,
        )

    for start in range(0, len(prompts), args.batch_size):
        batch = prompts[start : start + args.batch_size]
        if args.batch_size == 1:
            stream = _Stream(tok, batch[0], texts[start], stops)
            run(batch, start, stream)
            stream.finish()
            continue
        for i, new in enumerate(run(batch, start, None)):
            text = texts[start + i] + _continuation(tok, batch[i], new, stops)
            print(f"{text}\n", flush=True)


def _continuation(tok: Tokenizer, prompt: list[int], new: list[int], stops: tuple) -> str:
    """The text `new` adds after `prompt` (decoded together: a SentencePiece word's leading
    space depends on what precedes it), without a final stop token."""
    if new and new[-1] in stops:
        new = new[:-1]
    base, full = tok.decode(prompt), tok.decode(prompt + new)
    return full[len(base) :] if full.startswith(base) else tok.decode(new)


class _Stream:
    """Prints a continuation as it grows, holding back an incomplete UTF-8 character."""

    def __init__(self, tok: Tokenizer, prompt: list[int], text: str, stops: tuple) -> None:
        self.tok, self.prompt, self.stops = tok, prompt, stops
        self.new: list[int] = []
        self.printed = ""
        sys.stdout.write(text)
        sys.stdout.flush()

    def __call__(self, i: int, token: int) -> None:
        self.new.append(token)
        text = _continuation(self.tok, self.prompt, self.new, self.stops)
        if text.endswith("\ufffd") or not text.startswith(self.printed):
            return  # wait for the rest of a character (or of a re-segmented word)
        sys.stdout.write(text[len(self.printed) :])
        sys.stdout.flush()
        self.printed = text

    def finish(self) -> None:
        text = _continuation(self.tok, self.prompt, self.new, self.stops)
        rest = text[len(self.printed) :] if text.startswith(self.printed) else ""
        sys.stdout.write(f"{rest}\n\n")
        sys.stdout.flush()
