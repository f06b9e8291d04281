#!/usr/bin/env python3
"""Data throughput: preparation, streaming and the raw read rate of the same shards, in one run.
Prints a table; measures, never asserts.

    python tools/bench/data.py [--mb 200] [--work DIR] [--seq-len 4096] [--micro-batch 8]

The corpus is real text found on this machine — the Python standard library's sources and the
documentation under /usr/share/doc and site-packages — repeated with distinct seeds (each copy's
paragraphs shuffled differently, so deduplication keeps them) until it reaches `--mb`. A BPE
tokenizer is trained once on its first 20 MB (kept in --work); preparation with it is timed
with 1 and 2 workers (both outputs compared byte for byte). Streaming reads one epoch of the
prepared train split through the trainer's loader with 0, 1 and 2 worker processes; the ceiling
is reading the same shard files' bytes. Both start from storage: the files are evicted from the
page cache first (posix_fadvise DONTNEED), as a run's first epoch reads them; the warm
(in-memory) read rate is printed too. The training rate to beat is what one H100 consumes
training the 7b model at 50% MFU.
"""

# ruff: noqa: E402  (sys.path is set before the megalite imports)
from __future__ import annotations

import argparse
import filecmp
import functools
import gzip
import json
import os
import random
import shutil
import sys
import sysconfig
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from megalite.data.loader import Loader
from megalite.data.manifest import load_manifest
from megalite.data.prepare import prepare
from megalite.data.stream import TokenStream
from megalite.launch import compose_config
from megalite.model.flops import flops_per_token

H100_BF16 = 989e12  # dense bf16 datasheet peak, FLOP/s
TEXT_SUFFIXES = {".py", ".rst", ".txt", ".md"}
DOC_CHARS = 200_000  # longer files become several documents


def real_text_files() -> list[Path]:
    roots = [Path(sysconfig.get_paths()["stdlib"]), Path("/usr/share/doc")]
    roots.append(Path(sysconfig.get_paths()["purelib"]))
    files = []
    for root in roots:
        if root.is_dir():
            files += sorted(
                p
                for p in root.rglob("*")
                if p.is_file() and (p.suffix in TEXT_SUFFIXES or p.name.endswith(".txt.gz"))
            )
    return files


def read_text(path: Path) -> str:
    try:
        data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        return data.decode("utf-8")
    except (OSError, UnicodeDecodeError, EOFError, gzip.BadGzipFile):
        return ""


def build_corpus(out: Path, target_mb: float) -> int:
    """jsonl files of real documents totalling ≥ target_mb of text; returns the bytes."""
    out.mkdir(parents=True, exist_ok=True)
    texts = [t for t in map(read_text, real_text_files()) if len(t.strip()) > 100]
    if not texts:
        raise SystemExit("no text files found on this machine")
    total, copy = 0, 0
    while total < target_mb * 1e6:
        rng = random.Random(copy)
        with open(out / f"part-{copy:03d}.jsonl", "w", encoding="utf-8") as f:
            for text in texts:
                paragraphs = text.split("\n\n")
                if copy:
                    rng.shuffle(paragraphs)  # a distinct document for every copy
                body = "\n\n".join(paragraphs)
                for i in range(0, len(body), DOC_CHARS):
                    doc = body[i : i + DOC_CHARS]
                    f.write(json.dumps({"text": doc}) + "\n")
                    total += len(doc.encode())
                    if total >= target_mb * 1e6:
                        return total
        copy += 1
    return total


def first_mb(corpus: Path, out: Path, mb: float) -> Path:
    """The first `mb` of the corpus as one jsonl (to train the tokenizer on)."""
    size = 0
    with open(out, "w", encoding="utf-8") as f:
        for part in sorted(corpus.glob("*.jsonl")):
            for line in open(part, encoding="utf-8"):
                f.write(line)
                size += len(line)
                if size >= mb * 1e6:
                    return out
    return out


def timed(fn) -> float:  # noqa: ANN001
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def same_folders(a: Path, b: Path) -> bool:
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    return files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file()) and all(
        filecmp.cmp(a / f, b / f, shallow=False) for f in files
    )


def evict(paths: list[Path]) -> None:
    """Drop the files' pages from the page cache, so the next read comes from storage."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def raw_read(shards: list[Path], *, cold: bool) -> float:
    """Seconds to read every byte of `shards` (from storage if `cold`, else from memory)."""
    if cold:
        evict(shards)
    else:
        for p in shards:
            p.read_bytes()
    return timed(lambda: [p.read_bytes() for p in shards])


def stream_epoch(data: Path, *, seq_len: int, mb: int, workers: int) -> tuple[int, float]:
    """Tokens of one epoch of train through the loader with `workers`, and the seconds."""
    make = functools.partial(
        TokenStream, str(data), "train", seq_len=seq_len, micro_batch_size=mb, dp_rank=0,
        dp_size=1, seed=0,
    )  # fmt: skip
    batches = load_manifest(data).tokens("train") // (mb * (seq_len + 1))
    loader = iter(Loader(make, workers=workers, prefetch=4))
    start = time.perf_counter()
    for _ in range(batches):
        next(loader)
    return batches * mb * (seq_len + 1), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=200.0, help="corpus size (default 200 MB)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/megalite-bench-data"))
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--reuse", action="store_true", help="keep prepared folders in --work")
    args = parser.parse_args()
    work = args.work
    corpus = work / f"corpus-{args.mb:g}mb"
    if not corpus.is_dir():
        print(f"building a {args.mb:g} MB corpus of real text in {corpus} ...", flush=True)
        build_corpus(corpus, args.mb)
    corpus_bytes = sum(p.stat().st_size for p in corpus.glob("*.jsonl"))
    tok_dir = work / f"tokenizer-v{args.vocab_size}"
    if not (tok_dir / "tokenizer.json").is_file():
        mb = min(20.0, args.mb)
        sample = first_mb(corpus, work / "tok-sample.jsonl", mb)
        print(f"training the tokenizer on {mb:g} MB ...", flush=True)
        seconds = timed(lambda: prepare([sample], tok_dir, vocab_size=args.vocab_size))
        print(f"  {mb / seconds:.1f} MB/s (train BPE + prepare)", flush=True)
    rows = []
    outs = {}
    for workers in (1, 2):
        out = work / f"prepared-w{workers}"
        outs[workers] = out
        if args.reuse and (out / "manifest.json").is_file():
            continue
        shutil.rmtree(out, ignore_errors=True)
        print(f"preparing with {workers} worker(s) ...", flush=True)
        seconds = timed(
            lambda out=out, workers=workers: prepare(
                [corpus], out, tokenizer=tok_dir / "tokenizer.json", workers=workers
            )
        )
        rows.append((f"prepare, {workers} worker(s)", corpus_bytes / seconds / 1e6, "MB/s text"))
    identical = same_folders(outs[1], outs[2])
    data = outs[1]
    m = load_manifest(data)
    shards = m.shards("train")
    shard_bytes = sum(p.stat().st_size for p in shards)
    tokens = m.tokens("train")
    raw_s = min(raw_read(shards, cold=True) for _ in range(3))
    warm_s = min(raw_read(shards, cold=False) for _ in range(3))
    raw_tps = tokens / raw_s
    rows.append(("raw read of the shards (cold)", shard_bytes / raw_s / 1e6, "MB/s"))
    rows.append(("raw read, as tokens (cold)", raw_tps, "tokens/s"))
    rows.append(("raw read of the shards (warm)", shard_bytes / warm_s / 1e6, "MB/s"))
    stream_rates = {}
    for workers in (0, 1, 2):
        evict(shards)
        n, seconds = stream_epoch(data, seq_len=args.seq_len, mb=args.micro_batch, workers=workers)
        stream_rates[workers] = n / seconds
        rows.append((f"stream, {workers} loader worker(s)", n / seconds, "tokens/s"))
    try:
        model = compose_config(["model=7b"]).model
        train_tps: float | None = 0.5 * H100_BF16 / flops_per_token(model, args.seq_len)
    except Exception as exc:  # the data rows stand without the model's
        train_tps = None
        print(f"the 7b config does not compose ({type(exc).__name__}): no training row")
    if train_tps is not None:
        rows.append(("7b training on 1 H100 at 50% MFU", train_tps, "tokens/s"))

    print(f"\ncorpus {corpus_bytes / 1e6:.0f} MB of text → {tokens / 1e6:.1f}M train tokens in "
          f"{len(shards)} shards ({shard_bytes / 1e6:.0f} MB); seq_len {args.seq_len}, "
          f"micro-batch {args.micro_batch}")  # fmt: skip
    print(f"prepare with 1 and 2 workers: byte-identical outputs: {identical}")
    print(f"load average (1 min) at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"{'measure':<36}{'rate':>14}  unit")
    for name, rate, unit in rows:
        print(f"{name:<36}{rate:>14,.1f}  {unit}")
    best = max(stream_rates, key=lambda w: stream_rates[w])
    check = m.split("train").shards[0].checksum[0]
    print(
        f"\nstreaming / raw read: {stream_rates[best] / raw_tps:.0%} (goal ≥ 50%): "
        f"{stream_rates[best] / 1e6:,.0f}M tokens/s (one cold epoch, {best} loader worker(s), the "
        f"fastest row) / {raw_tps / 1e6:,.0f}M tokens/s (the fastest of 3 cold reads of the "
        f"same shards); format {m.format_version}, checked by {check}"
    )
    if train_tps is not None:
        print(f"streaming / 7b-on-H100 consumption: {best / train_tps:.0f}x (goal ≥ 20x)")


if __name__ == "__main__":
    main()
