"""`python tools/prepare_data.py` / `megalite-prepare`: the command line over `prepare()`.

Bad input (a missing path, no documents, a jsonl line without the text field, a missing tokenizer)
ends with one `error:` line on stderr and exit code 2, the code argparse uses for usage errors.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from megalite.data.manifest import DataError, Manifest
from megalite.data.prepare import EOD_TOKEN, prepare

PROG = "prepare_data"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Tokenise .txt/.jsonl text into WebDataset token shards with a manifest.",
    )
    p.add_argument(
        "--input",
        nargs="+",
        required=True,
        metavar="PATH",
        help="files, folders (searched recursively) or globs of .txt/.jsonl",
    )
    p.add_argument("--output", required=True, metavar="DIR", help="folder to prepare into")
    tok = p.add_mutually_exclusive_group()
    tok.add_argument(
        "--tokenizer",
        metavar="FILE",
        help="an existing tokenizer.json (default: train a byte-level BPE)",
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
        "--txt-document",
        choices=("paragraph", "file"),
        default="paragraph",
        help="a .txt document is a blank-line-separated paragraph or the whole file",
    )
    p.add_argument("--text-field", default="text", help="jsonl field holding the text")
    p.add_argument(
        "--eod-token",
        default=EOD_TOKEN,
        help="end-of-document token, appended after every document",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the tool; returns the exit code (0 ok, 2 bad arguments or input, 1 cannot write)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error argparse has already printed
        return exc.code if isinstance(exc.code, int) else 2
    try:
        manifest = prepare(
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
            progress=True,
        )
    except DataError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # the output side: permissions, a full disk
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    print(summary(manifest))
    return 0


def summary(manifest: Manifest) -> str:
    """A few lines for the console: what was read, dropped and written."""
    st = manifest.stats
    lines = [
        f"prepared {manifest.root}",
        f"  documents: {st['documents_read']:,} read from {st['input_files']} file(s), "
        f"{st['empty_dropped']:,} empty and {st['duplicates_dropped']:,} duplicates dropped, "
        f"{st['documents_kept']:,} kept",
        f"  tokenizer: vocab {manifest.vocab_size:,} ({manifest.dtype}), "
        f"{manifest.eod_token} = {manifest.eod_token_id}",
    ]
    for name, split in manifest.splits.items():
        n = len(split.shards)
        lines.append(
            f"  {name}: {split.documents:,} documents, {split.tokens:,} tokens, "
            f"{split.samples:,} samples in {n} shard{'s' if n != 1 else ''}"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
