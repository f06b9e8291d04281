"""Raw text → tokenizer + WebDataset token shards + manifest: the library behind prepare_data.py.

Two streaming passes over the inputs, so corpora larger than memory work: the first normalises,
deduplicates, counts and (without `--tokenizer`) trains the byte-level BPE; the second tokenises
each kept document, appends the end-of-document token, and feeds the split's token stream, which is
cut into fixed-size samples and grouped into shards. Everything written is a pure function of the
input bytes and the options (fixed tar metadata, seeded hashes, canonical JSON), so preparing twice
gives byte-identical folders; `manifest.json` is written last, and marks the folder complete.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import json
import os
import re
import sys
import unicodedata
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from tqdm import tqdm

from megalite.data.manifest import (
    MANIFEST_NAME,
    TOKENIZER_NAME,
    DataError,
    Manifest,
    ShardWriter,
    SplitInfo,
    atomic_write,
    write_manifest,
)

PREPARE_VERSION = 1  # bump when the bytes written for the same input and options change
EOD_TOKEN = "<|endoftext|>"
MIN_VOCAB = 257  # the 256 byte tokens plus the end-of-document token
_ENCODE_BATCH = 512  # documents per `encode_batch` call
_SUFFIXES = (".txt", ".jsonl")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # C0/C1 controls but \t and \n


@dataclass(frozen=True)
class Document:
    text: str  # normalised, not empty
    digest: bytes  # 16-byte hash of the text: the identity used for deduplication and splitting


@dataclass
class PrepareStats:
    """What the reading pass saw; `manifest.json` keeps it under "stats"."""

    input_files: int = 0
    documents_read: int = 0
    empty_dropped: int = 0
    duplicates_dropped: int = 0

    def as_dict(self) -> dict[str, int]:
        kept = self.documents_read - self.empty_dropped - self.duplicates_dropped
        return {**asdict(self), "documents_kept": kept}


def prepare(
    inputs: Sequence[str | Path],
    output: str | Path,
    *,
    tokenizer: str | Path | None = None,
    vocab_size: int = 4096,
    val_fraction: float = 0.005,
    shard_tokens: int = 2**24,
    sample_tokens: int = 2048,
    seed: int = 0,
    txt_document: str = "paragraph",
    text_field: str = "text",
    eod_token: str = EOD_TOKEN,
    progress: bool = False,
) -> Manifest:
    """Prepare `inputs` (files, folders, globs of .txt/.jsonl) into the folder `output`.

    `val_fraction=0` (or a single document) gives a train split only. Raises `DataError` for bad
    input: missing paths, no documents, a jsonl line without `text_field`, a tokenizer file that
    is missing or lacks `eod_token`.
    """
    _check_options(vocab_size, val_fraction, shard_tokens, sample_tokens, txt_document)
    files = find_inputs(inputs)
    out = Path(output).expanduser()
    read = functools.partial(
        read_documents, files, txt_document=txt_document, text_field=text_field
    )
    stats = PrepareStats(input_files=len(files))
    plan = _SplitPlan(seed=seed, val_fraction=val_fraction)
    first_pass = plan.observe(read(stats=stats))
    if tokenizer is None:
        tok = train_tokenizer(first_pass, vocab_size=vocab_size, eod_token=eod_token)
        tokenizer_bytes = tok.to_str(pretty=True).encode()
    else:
        tok, tokenizer_bytes = _load_tokenizer(Path(tokenizer).expanduser())
        deque(first_pass, maxlen=0)
    if plan.documents == 0:
        raise DataError(f"no documents found in {len(files)} input file(s)")
    eod_id = tok.token_to_id(eod_token)
    if eod_id is None:
        raise DataError(f"tokenizer has no end-of-document token {eod_token!r} (see --eod-token)")
    tok.encode_special_tokens = True  # a literal "<|endoftext|>" in the text is text, not EOD
    vocab = max(tok.get_vocab(with_added_tokens=True).values()) + 1  # ids may have gaps
    dtype = np.dtype(np.uint16 if vocab <= 2**16 else np.uint32)

    _clear_output(out)
    atomic_write(out / TOKENIZER_NAME, tokenizer_bytes)
    writers = {
        name: ShardWriter(
            out / name,
            dtype=dtype,
            eod_id=eod_id,
            sample_tokens=sample_tokens,
            samples_per_shard=max(1, shard_tokens // sample_tokens),
        )
        for name in plan.split_names()
    }
    _tokenise(read(stats=PrepareStats()), tok, plan, writers, progress=progress)
    manifest = Manifest(
        root=out,
        vocab_size=vocab,
        dtype=dtype.name,
        eod_token=eod_token,
        eod_token_id=eod_id,
        tokenizer_sha256=hashlib.sha256(tokenizer_bytes).hexdigest(),
        seed=seed,
        sample_tokens=sample_tokens,
        shard_tokens=shard_tokens,
        val_fraction=val_fraction,
        splits={name: SplitInfo(w.close()) for name, w in writers.items()},
        stats=stats.as_dict(),
    )
    write_manifest(manifest)
    return manifest


def _tokenise(
    docs: Iterator[Document],
    tok: Tokenizer,
    plan: _SplitPlan,
    writers: dict[str, ShardWriter],
    *,
    progress: bool,
) -> None:
    """Second pass: each document's ids go to its split's writer, in input order."""
    bar = tqdm(
        total=plan.documents, unit="doc", desc="tokenising", file=sys.stderr, disable=not progress
    )
    with bar:
        for batch in _batched(docs, _ENCODE_BATCH):
            encoded = tok.encode_batch_fast([d.text for d in batch], add_special_tokens=False)
            for doc, enc in zip(batch, encoded, strict=True):
                writers[plan.split_of(doc)].add(np.asarray(enc.ids, dtype=np.int64))
            bar.update(len(batch))


def train_tokenizer(texts: Iterator[Document], *, vocab_size: int, eod_token: str) -> Tokenizer:
    """Byte-level BPE with `eod_token` as its only special token (id 0).

    Deterministic: the trainer breaks ties between equally frequent pairs by token ids, which
    come from the sorted byte alphabet, so the merges do not depend on thread count or hash order
    (checked by preparing twice and comparing tokenizer.json bytes).
    """
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[eod_token],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    batches = ([d.text for d in batch] for batch in _batched(texts, _ENCODE_BATCH))
    tok.train_from_iterator(batches, trainer=trainer)
    return tok


def normalize(text: str) -> str:
    """Control characters other than newline and tab removed (so CRLF becomes LF), then NFC."""
    return unicodedata.normalize("NFC", _CONTROL.sub("", text))


def find_inputs(inputs: Sequence[str | Path]) -> list[Path]:
    """Input specs → .txt/.jsonl files: files as given, folders recursively and globs, each sorted;
    a file named twice is read once."""
    files = [f for spec in inputs for f in _expand(str(spec))]
    if not files:
        raise DataError("no input given")
    return list(dict.fromkeys(files))


def _expand(spec: str) -> list[Path]:
    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix.lower() not in _SUFFIXES:
            raise DataError(f"input {spec} is neither a .txt nor a .jsonl file")
        return [path]
    if path.is_dir():
        found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in _SUFFIXES)
        if not found:
            raise DataError(f"input folder {spec} holds no .txt or .jsonl files")
        return found
    if glob.has_magic(spec):
        matches = sorted(glob.glob(os.path.expanduser(spec), recursive=True))
        wanted = [m for m in matches if Path(m).is_dir() or Path(m).suffix.lower() in _SUFFIXES]
        found = [f for m in wanted for f in _expand(m)]
        if not found:
            raise DataError(f"input pattern {spec} matches no .txt or .jsonl file")
        return found
    raise DataError(f"input path {spec} does not exist")


def read_documents(
    files: Sequence[Path], *, stats: PrepareStats, txt_document: str, text_field: str
) -> Iterator[Document]:
    """The normalised, non-empty, first-seen documents of `files`, in order; counts in `stats`."""
    seen: set[bytes] = set()
    for path in files:
        if path.suffix.lower() == ".jsonl":
            texts = _jsonl_texts(path, text_field)
        elif txt_document == "paragraph":
            texts = _paragraphs(path)
        else:
            texts = iter([normalize(path.read_text(encoding="utf-8-sig", errors="replace"))])
        for text in texts:
            stats.documents_read += 1
            if not text.strip():
                stats.empty_dropped += 1
                continue
            digest = hashlib.blake2b(text.encode(), digest_size=16).digest()
            if digest in seen:
                stats.duplicates_dropped += 1
                continue
            seen.add(digest)
            yield Document(text, digest)


def _paragraphs(path: Path) -> Iterator[str]:
    """Runs of non-blank lines; a line holding only whitespace counts as blank."""
    lines: list[str] = []
    with open(path, encoding="utf-8-sig", errors="replace") as f:
        for line in f:
            line = normalize(line)
            if line.strip():
                lines.append(line)
            elif lines:
                yield "".join(lines).rstrip()
                lines = []
    if lines:
        yield "".join(lines).rstrip()


def _jsonl_texts(path: Path, field: str) -> Iterator[str]:
    with open(path, encoding="utf-8-sig", errors="replace") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{line_no}: not valid JSON ({exc.msg})") from None
            if not isinstance(record, dict) or field not in record:
                raise DataError(
                    f"{path}:{line_no}: no {field!r} field (pick the field with --text-field)"
                )
            text = record[field]
            if not isinstance(text, str):
                kind = type(text).__name__
                raise DataError(f"{path}:{line_no}: field {field!r} is {kind}, not a string")
            yield normalize(text)


def _load_tokenizer(path: Path) -> tuple[Tokenizer, bytes]:
    if not path.is_file():
        raise DataError(f"tokenizer file {path} does not exist")
    data = path.read_bytes()
    try:
        return Tokenizer.from_str(data.decode()), data
    except Exception as exc:  # tokenizers raises a bare Exception for a bad file
        raise DataError(f"tokenizer file {path} cannot be loaded: {exc}") from exc


def _check_options(
    vocab_size: int, val_fraction: float, shard_tokens: int, sample_tokens: int, txt_document: str
) -> None:
    if vocab_size < MIN_VOCAB:
        raise DataError(f"--vocab-size {vocab_size} is too small: at least {MIN_VOCAB}")
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"--val-fraction {val_fraction} must be in [0, 1)")
    if sample_tokens < 1 or shard_tokens < 1:
        raise DataError("--sample-tokens and --shard-tokens must be positive")
    if txt_document not in ("paragraph", "file"):
        raise DataError(f"--txt-document {txt_document!r} must be 'paragraph' or 'file'")


def _clear_output(out: Path) -> None:
    """Make `out` an unfinished preparation: drop the manifest first, then our stale shards."""
    if out.exists() and not out.is_dir():
        raise DataError(f"output {out} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST_NAME).unlink(missing_ok=True)
    for split_dir in (out / "train", out / "val"):
        for stale in sorted(split_dir.glob("shard-*.tar*")):
            stale.unlink()


def _batched(items: Iterator[Document], size: int) -> Iterator[list[Document]]:
    batch: list[Document] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


@dataclass
class _SplitPlan:
    """Assigns each document to val or train by a seeded hash of its text.

    A document is val when its score (a hash mapped to [0, 1)) is below `val_fraction`. The first
    pass (`observe`) counts; when that leaves val or train empty although there are ≥ 2 documents,
    the document with the lowest (highest) score moves there, so both splits exist.
    """

    seed: int
    val_fraction: float
    documents: int = 0
    val: int = 0
    lowest: tuple[float, bytes] = (2.0, b"")
    highest: tuple[float, bytes] = (-1.0, b"")

    def observe(self, docs: Iterator[Document]) -> Iterator[Document]:
        for doc in docs:
            score = self._score(doc)
            self.documents += 1
            self.val += score < self.val_fraction
            self.lowest = min(self.lowest, (score, doc.digest))
            self.highest = max(self.highest, (score, doc.digest))
            yield doc

    def split_names(self) -> list[str]:
        return ["train", "val"] if self.val_fraction > 0 and self.documents >= 2 else ["train"]

    def split_of(self, doc: Document) -> str:
        if "val" not in self.split_names():
            return "train"
        if self.val == 0 and doc.digest == self.lowest[1]:
            return "val"
        if self.val == self.documents and doc.digest == self.highest[1]:
            return "train"
        return "val" if self._score(doc) < self.val_fraction else "train"

    def _score(self, doc: Document) -> float:
        key = str(self.seed).encode()[:64]
        h = hashlib.blake2b(doc.digest, digest_size=8, key=key).digest()
        return int.from_bytes(h, "little") / 2**64
