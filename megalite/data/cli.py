"""`python tools/prepare_data.py` / `megalite-prepare`: the command line over `prepare()`.

    prepare_data --input PATH... --output DIR [options]   prepare (or resume preparing) a folder
    prepare_data --format chat|prompt-response --input x.jsonl --tokenizer MODEL_DIR \
        --seq-len N --output DIR                          fine-tuning data with a loss mask
    prepare_data stats DIR [--plot [PNG]] [--top K]       report what a prepared folder holds

Bad input (a missing path, no documents, a jsonl line without the text field, a missing tokenizer)
ends with one `error:` line on stderr and exit code 2, the code argparse uses for usage errors.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from megalite.data.errors import DataError
from megalite.data.manifest import Manifest
from megalite.data.prepare import DEDUP_MODES, EOD_TOKEN, prepare
from megalite.data.sft import FORMATS

PROG = "prepare_data"
_STAGE_WORDS = {
    "empty": "empty",
    "min_chars": "shorter than --min-chars",
    "max_chars": "longer than --max-chars",
    "symbol_fraction": "over --max-symbol-fraction",
    "duplicates": "duplicates",
    "near_duplicates": "near-duplicates",
    "max_tokens": "past --max-tokens",
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Tokenise text into WebDataset token shards with a manifest; "
        f"`{PROG} stats DIR` reports on a prepared folder. Re-running an interrupted "
        "preparation resumes it.",
    )
    p.add_argument(
        "--input",
        nargs="+",
        required=True,
        metavar="PATH",
        help="files, folders (searched recursively) or globs of .txt, .jsonl, .jsonl.gz, "
        ".jsonl.zst, .parquet",
    )
    p.add_argument("--output", required=True, metavar="DIR", help="folder to prepare into")
    tok = p.add_mutually_exclusive_group()
    tok.add_argument(
        "--tokenizer",
        metavar="PATH",
        help="an existing tokenizer.json or SentencePiece *.model, or a model folder holding "
        "one (with its tokenizer_config.json: EOS, chat template) (default: train a byte-level "
        "BPE)",
    )
    tok.add_argument(
        "--vocab-size",
        type=int,
        default=4096,
        help="vocabulary of the trained BPE (default: %(default)s)",
    )
    p.add_argument(
        "--val-fraction",
        type=float,
        default=0.005,
        help="share of documents held out for validation (default: %(default)s)",
    )
    p.add_argument(
        "--shard-tokens",
        type=int,
        default=2**24,
        help="about this many tokens per shard (default: %(default)s)",
    )
    p.add_argument(
        "--sample-tokens",
        type=int,
        default=2048,
        help="tokens per stored sample (default: %(default)s)",
    )
    p.add_argument("--seed", type=int, default=0, help="seeds the train/val split")
    p.add_argument(
        "--format",
        choices=FORMATS,
        default="text",
        help="text: documents for pretraining; chat ({'messages': [{'role', 'content'}...]}) or "
        "prompt-response ({'prompt', 'response'}) jsonl: fine-tuning records, only assistant / "
        "response tokens trained, packed into windows of --seq-len + 1 (default: %(default)s)",
    )
    p.add_argument(
        "--seq-len",
        type=int,
        metavar="N",
        help="fine-tuning: the trainer.seq_len the windows are packed for",
    )
    p.add_argument(
        "--txt-document",
        choices=("paragraph", "file"),
        default="paragraph",
        help="a .txt document is a blank-line-separated paragraph or the whole file",
    )
    p.add_argument(
        "--text-field", default="text", help="jsonl field / parquet column holding the text"
    )
    p.add_argument(
        "--eod-token",
        help=f"end-of-document token, appended after every document (default: {EOD_TOKEN}, or "
        "the EOS piece of a SentencePiece model)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="processes for tokenising and MinHash; 1 works in this process, where the tokenizer "
        "uses its own threads; the output does not depend on it (default: %(default)s)",
    )
    _add_filter_args(p)
    return p


def _add_filter_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("filters and deduplication, applied in this order")
    g.add_argument("--min-chars", type=int, metavar="N", help="drop documents of < N characters")
    g.add_argument("--max-chars", type=int, metavar="N", help="drop documents of > N characters")
    g.add_argument(
        "--max-symbol-fraction",
        type=float,
        metavar="F",
        help="drop documents where more than F of the characters are neither alphanumeric "
        "nor whitespace",
    )
    g.add_argument(
        "--dedup",
        choices=DEDUP_MODES,
        default="exact",
        help="exact: drop repeated documents; minhash: also near-duplicates (MinHash LSH over "
        "word 5-grams); none: keep all (default: %(default)s)",
    )
    g.add_argument(
        "--dedup-threshold",
        type=float,
        default=0.8,
        metavar="J",
        help="minhash: Jaccard similarity that makes a near-duplicate (default: %(default)s)",
    )
    g.add_argument(
        "--minhash-perms",
        type=int,
        default=128,
        metavar="K",
        help="minhash: signature length (default: %(default)s)",
    )
    g.add_argument(
        "--max-tokens",
        type=int,
        metavar="N",
        help="stop once N tokens (all splits, EOD included) are written; documents count whole "
        "(default: no cap)",
    )


def build_stats_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=f"{PROG} stats",
        description="Tokens, documents and samples per split and shard, the document-length "
        "histogram and the most frequent tokens of a prepared folder.",
    )
    p.add_argument("dir", metavar="DIR", help="a prepared folder")
    p.add_argument(
        "--plot",
        nargs="?",
        const="",
        metavar="PNG",
        help="also draw the length histograms into PNG (default: DIR/stats.png)",
    )
    p.add_argument("--top", type=int, default=20, metavar="K", help="tokens to list (default: 20)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the tool; returns the exit code (0 ok, 2 bad arguments or input, 1 cannot write)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    stats = bool(argv) and argv[0] == "stats"
    parser = build_stats_parser() if stats else build_parser()
    try:
        args = parser.parse_args(argv[1:] if stats else argv)
    except SystemExit as exc:  # --help, or a usage error argparse has already printed
        return exc.code if isinstance(exc.code, int) else 2
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{PROG}: %(message)s"))
    logger = logging.getLogger("megalite.data")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        print(_stats(args) if stats else summary(_prepare(args)))
    except DataError as exc:
        print(f"{PROG}: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    except OSError as exc:  # the output side: permissions, a full disk
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    return 0


def _prepare(args: argparse.Namespace) -> Manifest:
    return prepare(
        args.input,
        args.output,
        tokenizer=args.tokenizer,
        vocab_size=args.vocab_size,
        val_fraction=args.val_fraction,
        shard_tokens=args.shard_tokens,
        sample_tokens=args.sample_tokens,
        seed=args.seed,
        txt_document=args.txt_document,
        text_field=args.text_field,
        eod_token=args.eod_token,
        dedup=args.dedup,
        dedup_threshold=args.dedup_threshold,
        minhash_perms=args.minhash_perms,
        min_chars=args.min_chars,
        max_chars=args.max_chars,
        max_symbol_fraction=args.max_symbol_fraction,
        max_tokens=args.max_tokens,
        data_format=args.format,
        seq_len=args.seq_len,
        workers=args.workers,
        progress=True,
    )


def _stats(args: argparse.Namespace) -> str:
    from megalite.data.stats import report

    plot = None
    if args.plot is not None:
        plot = Path(args.plot or Path(args.dir) / "stats.png").expanduser()
    return report(args.dir, top=args.top, plot=plot)


def summary(manifest: Manifest) -> str:
    """A few lines for the console: what was read, dropped at each stage, and written."""
    st = manifest.stats
    dropped = [
        f"{st[f'{stage}_dropped']:,} {words}"
        for stage, words in _STAGE_WORDS.items()
        if f"{stage}_dropped" in st
    ]
    docs = "records" if manifest.loss_mask else "documents"
    lines = [
        f"prepared {manifest.root}",
        f"  {docs}: {st['documents_read']:,} read from {st['input_files']} file(s); "
        f"dropped: {', '.join(dropped)}; {st['documents_kept']:,} kept",
        f"  tokenizer: {manifest.tokenizer}, vocab {manifest.vocab_size:,} ({manifest.dtype}), "
        f"{manifest.eod_token} = {manifest.eod_token_id}",
    ]
    samples = f"windows of {manifest.window}" if manifest.loss_mask else "samples"
    for name, split in manifest.splits.items():
        n = len(split.shards)
        lines.append(
            f"  {name}: {split.documents:,} {docs}, {split.tokens:,} tokens, "
            f"{split.samples:,} {samples} in {n} shard{'s' if n != 1 else ''}"
        )
    if manifest.loss_mask:
        lines.append(_packing_line(st))
    return "\n".join(lines)


def _packing_line(st: dict[str, int]) -> str:
    """Fine-tuning data: what was trained, and what packing cut or dropped."""
    return (
        f"  tokens: {st['trained_tokens']:,} trained, {st['context_tokens']:,} context, "
        f"{st['padding_tokens']:,} padding; {st['records_truncated']:,} records cut to the "
        f"window; {st['windows_dropped']:,} windows without a trained token dropped "
        f"({st['records_dropped']:,} records)"
    )


if __name__ == "__main__":
    sys.exit(main())
