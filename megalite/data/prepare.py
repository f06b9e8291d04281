"""Raw text → tokenizer + WebDataset token shards + manifest: the library behind prepare_data.py.

Two streaming passes over the inputs, so corpora larger than memory work. The first reads and
normalises (`inputs.py`), drops documents stage by stage (empty, quality filters, exact and near
duplicates: `filters.py`, `dedup.py`), plans the train/val split, and (without `--tokenizer`)
trains the byte-level BPE; its result, down to a keep bit per document, is saved in the output's
work folder (`resume.py`). The second reads the inputs again, tokenises each kept document
(in `--workers` processes, results in input order), appends the end-of-document token and feeds
its split's `ShardWriter`, which cuts the token stream into samples and shards, until the
`--max-tokens` cap. Everything written is a pure function of the input bytes and the options
(fixed tar metadata, seeded hashes, canonical JSON), whatever the number of workers and however
often the run was interrupted and resumed; `manifest.json` is written last and marks the folder
complete.

Fine-tuning data (`data_format` "chat" or "prompt-response", `sft.py`) runs the same two passes
over records instead of texts: the first validates each record (a bad one names its file and
line), dedups and splits it like a text; the second tokenises it with its loss mask and hands it
to a `PackedWriter`, which packs whole records into windows of `seq_len + 1` tokens.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import sys
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import tokenizers
from tqdm import tqdm

from megalite.data.dedup import MinHasher, NearDupIndex
from megalite.data.encode import (
    EOD_TOKEN,
    MIN_VOCAB,
    SENTENCEPIECE_NAME,
    Encoder,
    EncodeTask,
    TokenizerConfig,
    TokenizerFile,
    find_tokenizer,
    load_tokenizer,
    train_tokenizer,
    unpack,
)
from megalite.data.errors import DataError
from megalite.data.filters import PrepareStats, QualityFilter
from megalite.data.inputs import find_inputs, normalize, read_texts
from megalite.data.loss_mask import MASKED_DTYPE
from megalite.data.manifest import (
    MANIFEST_NAME,
    TOKENIZER_NAME,
    Manifest,
    SplitInfo,
    write_manifest,
)
from megalite.data.parallel import Workers
from megalite.data.resume import WORK_DIR, Journal, WorkFolder, fingerprint
from megalite.data.sft import (
    DEFAULT_CHAT_TEMPLATE,
    FORMATS,
    SFT_FORMATS,
    ChatTemplate,
    RecordTask,
    read_records,
)
from megalite.data.split import SplitPlan
from megalite.data.writer import PACKING_COUNTS, PackedWriter, ShardWriter, WriterPosition
from megalite.files import atomic_write

PREPARE_VERSION = 2  # bump when the bytes written for the same input and options change
DEDUP_MODES = ("exact", "minhash", "none")
_BATCH_DOCS, _BATCH_CHARS = 512, 2**20  # a tokenizer / MinHash batch holds at most these

__all__ = ["EOD_TOKEN", "MIN_VOCAB", "PREPARE_VERSION", "Options", "normalize", "prepare"]
log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class Document:
    index: int  # position among all documents read, dropped ones included
    text: str  # normalised, not empty
    digest: bytes  # 16-byte hash of the text: the identity for exact dedup and splitting


@dataclass(frozen=True)
class Options:
    """Every option that shapes the output (the resume fingerprint covers all of them)."""

    tokenizer: str | None = None  # path of an existing tokenizer file
    vocab_size: int = 4096
    val_fraction: float = 0.005
    shard_tokens: int = 2**24
    sample_tokens: int = 2048
    seed: int = 0
    txt_document: str = "paragraph"
    text_field: str = "text"
    eod_token: str | None = None  # None: "<|endoftext|>", or a SentencePiece model's EOS
    dedup: str = "exact"
    dedup_threshold: float = 0.8
    minhash_perms: int = 128
    filters: QualityFilter = field(default_factory=QualityFilter)
    max_tokens: int | None = None
    data_format: str = "text"  # or a fine-tuning format: "chat", "prompt-response"
    seq_len: int | None = None  # fine-tuning: windows of seq_len + 1 tokens
    chat_template: str | None = None  # "chat": the tokenizer's template (None: the default)
    bos_token: str | None = None  # "chat": the template's `bos_token`

    @property
    def sft(self) -> bool:
        return self.data_format in SFT_FORMATS

    def __post_init__(self) -> None:
        if self.vocab_size < MIN_VOCAB:
            raise DataError(f"--vocab-size {self.vocab_size} is too small: at least {MIN_VOCAB}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise DataError(f"--val-fraction {self.val_fraction} must be in [0, 1)")
        if self.sample_tokens < 1 or self.shard_tokens < 1:
            raise DataError("--sample-tokens and --shard-tokens must be positive")
        if self.txt_document not in ("paragraph", "file"):
            raise DataError(f"--txt-document {self.txt_document!r} must be 'paragraph' or 'file'")
        if self.dedup not in DEDUP_MODES:
            raise DataError(f"--dedup {self.dedup!r} must be one of {', '.join(DEDUP_MODES)}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise DataError(f"--max-tokens {self.max_tokens} must be ≥ 1")
        if self.dedup == "minhash":  # checks the threshold and the permutation count
            NearDupIndex(self.dedup_threshold, MinHasher(self.minhash_perms).perms)
        self._check_format()

    def _check_format(self) -> None:
        if self.data_format not in FORMATS:
            raise DataError(f"--format {self.data_format!r} must be one of {', '.join(FORMATS)}")
        if not self.sft:
            if self.seq_len is not None:
                raise DataError("--seq-len packs fine-tuning data: it needs --format chat or "
                                "prompt-response")  # fmt: skip
            return
        if self.tokenizer is None:
            raise DataError(f"--format {self.data_format} needs --tokenizer (the model's)")
        if self.seq_len is None or self.seq_len < 1:
            raise DataError(f"--format {self.data_format} needs --seq-len N ≥ 1 (the training "
                            "seq_len)")  # fmt: skip

    def stages(self) -> list[str]:
        dedup = {"exact": ["duplicates"], "minhash": ["duplicates", "near_duplicates"]}
        cap = ["max_tokens"] if self.max_tokens is not None else []
        return ["empty", *self.filters.stages(), *dedup.get(self.dedup, []), *cap]


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
    eod_token: str | None = None,
    dedup: str = "exact",
    dedup_threshold: float = 0.8,
    minhash_perms: int = 128,
    min_chars: int | None = None,
    max_chars: int | None = None,
    max_symbol_fraction: float | None = None,
    max_tokens: int | None = None,
    data_format: str = "text",
    seq_len: int | None = None,
    workers: int = 1,
    progress: bool = False,
) -> Manifest:
    """Prepare `inputs` (files, folders, globs of .txt/.jsonl[.gz|.zst]/.parquet) into the
    folder `output`. The options are those of the CLI (see `Options`); `workers` and `progress`
    change how, never what, is written.

    `val_fraction=0` (or a single document) gives a train split only. Resumes an interrupted
    preparation of the same inputs with the same options. Raises `DataError` for bad input:
    missing paths, no documents, a record without `text_field`, a damaged file, a tokenizer file
    that is missing or lacks the end-of-document token. `tokenizer` may be a model folder
    (`encode.find_tokenizer`): its EOS is the end-of-document token unless `eod_token` is given.

    `data_format` "chat" or "prompt-response" prepares fine-tuning records (`sft.py`) into
    windows of `seq_len + 1` tokens carrying their loss mask; `sample_tokens` does not apply.
    """
    tok_path, config = None, TokenizerConfig()
    if tokenizer is not None:
        found, config = find_tokenizer(Path(tokenizer).expanduser())
        tok_path, eod_token = str(found), eod_token or config.eos_token
    chat = data_format == "chat"
    opts = Options(
        tokenizer=tok_path,
        vocab_size=vocab_size,
        val_fraction=val_fraction,
        shard_tokens=shard_tokens,
        sample_tokens=sample_tokens,
        seed=seed,
        txt_document=txt_document,
        text_field=text_field,
        eod_token=eod_token,
        dedup=dedup,
        dedup_threshold=dedup_threshold,
        minhash_perms=minhash_perms,
        filters=QualityFilter(min_chars, max_chars, max_symbol_fraction),
        max_tokens=max_tokens,
        data_format=data_format,
        seq_len=seq_len,
        chat_template=config.chat_template if chat else None,
        bos_token=config.bos_token if chat else None,
    )
    files = find_inputs(inputs)
    out = Path(output).expanduser()
    if out.exists() and not out.is_dir():
        raise DataError(f"output {out} exists and is not a folder")
    loaded = load_tokenizer(Path(tok_path), eod_token=opts.eod_token) if tok_path else None
    if chat and loaded is not None and loaded.kind == "sentencepiece":
        raise DataError("--format chat needs a tokenizer.json: the sentencepiece library cannot "
                        "read a chat template's special tokens from text")  # fmt: skip
    work = WorkFolder(out, fingerprint(files, _fingerprint_options(opts, loaded)))
    with Workers(workers) as pool:
        pool.start()
        first = _load_first_pass(work, out)
        if first is None:
            first = _first_pass(files, opts, loaded, pool, progress=progress)
            _clear_output(out)
            _save_first_pass(work, out, first)
        else:
            log.info("resuming: the first pass is done (%s)", out / WORK_DIR)
        manifest = _second_pass(files, opts, first, work, pool, out, progress=progress)
    write_manifest(manifest)
    work.remove()
    return manifest


@dataclass
class _FirstPass:
    stats: PrepareStats
    plan: SplitPlan
    keep: np.ndarray  # (documents_read,) bool
    tokenizer: TokenizerFile


def _first_pass(
    files: list[Path],
    opts: Options,
    tokenizer: TokenizerFile | None,
    pool: Workers,
    *,
    progress: bool,
) -> _FirstPass:
    stats = PrepareStats.for_stages(opts.stages(), input_files=len(files))
    keep = bytearray()
    plan = SplitPlan(seed=opts.seed, val_fraction=opts.val_fraction)
    bar = tqdm(unit="doc", desc="reading", file=sys.stderr, disable=not progress, delay=1.0)
    with bar:
        docs = _candidates(files, opts, stats, keep, bar)
        if opts.dedup == "minhash":
            docs = _drop_near_duplicates(docs, opts, stats, keep, pool)
        texts = (doc.text for doc in plan.observe(docs))
        if tokenizer is None:
            eod = opts.eod_token or EOD_TOKEN
            tokenizer = train_tokenizer(texts, vocab_size=opts.vocab_size, eod_token=eod)
        else:
            deque(texts, maxlen=0)
    if plan.documents == 0:
        raise DataError(f"no documents found in {len(files)} input file(s)")
    return _FirstPass(stats, plan, np.frombuffer(bytes(keep), np.uint8).astype(bool), tokenizer)


def _read(files: list[Path], opts: Options) -> Iterator[str]:
    """The documents of the inputs: texts, or fine-tuning records as `sft.document`s."""
    if not opts.sft:
        for path in files:
            yield from read_texts(path, txt_document=opts.txt_document, text_field=opts.text_field)
        return
    template = None
    if opts.data_format == "chat":
        source = opts.chat_template or DEFAULT_CHAT_TEMPLATE
        eos = opts.eod_token or EOD_TOKEN  # a tokenizer.json's default (chat needs one)
        template = ChatTemplate(source, bos_token=opts.bos_token, eos_token=eos)
    for path in files:
        yield from read_records(path, data_format=opts.data_format, template=template)


def _candidates(
    files: list[Path], opts: Options, stats: PrepareStats, keep: bytearray, bar: tqdm
) -> Iterator[Document]:
    """Documents that pass the empty, quality and exact-duplicate stages, in input order; appends
    one keep flag per document read (1 for those yielded: later stages may clear it)."""
    seen: set[bytes] = set()
    for index, text in enumerate(_read(files, opts)):
        stats.documents_read += 1
        bar.update()
        stage = "empty" if not text.strip() else opts.filters.reject(text)
        digest = b""
        if stage is None:
            digest = hashlib.blake2b(text.encode(), digest_size=16).digest()
            if opts.dedup != "none":
                stage = "duplicates" if digest in seen else None
                seen.add(digest)
        keep.append(stage is None)
        if stage is None:
            yield Document(index, text, digest)
        else:
            stats.drop(stage)


def _drop_near_duplicates(
    docs: Iterator[Document], opts: Options, stats: PrepareStats, keep: bytearray, pool: Workers
) -> Iterator[Document]:
    """MinHash signatures in the workers, decisions here in input order (first seen stays)."""
    index = NearDupIndex(opts.dedup_threshold, opts.minhash_perms)
    hasher = MinHasher(opts.minhash_perms)
    sent: deque[list[Document]] = deque()

    def texts() -> Iterator[list[str]]:
        for batch in _batched(docs, text=lambda d: d.text):
            sent.append(batch)
            yield [d.text for d in batch]

    for sigs in pool.map(hasher.signatures, texts()):
        for doc, new in zip(sent.popleft(), index.add_batch(sigs), strict=True):
            if new:
                yield doc
            else:
                keep[doc.index] = 0
                stats.drop("near_duplicates")


def _second_pass(
    files: list[Path],
    opts: Options,
    first: _FirstPass,
    work: WorkFolder,
    pool: Workers,
    out: Path,
    *,
    progress: bool,
) -> Manifest:
    """Tokenise the kept documents into their splits' writers, resuming from the journal."""
    enc = Encoder(first.tokenizer)
    journal = _load_journal(work, out, first.plan)
    fed = _Fed(journal.last_doc, journal.fed_tokens)
    writers: dict[str, ShardWriter | PackedWriter] = {}

    def save() -> None:  # after every shard written, in any split
        positions = {n: w.position for n, w in writers.items()}
        work.save_journal(Journal(positions, fed.last_doc, fed.tokens))

    for name in first.plan.split_names():
        writers[name] = _writer(out / name, opts, enc, journal.splits.get(name), save)
    done = {n: w.position.documents_done for n, w in writers.items()}
    seen = dict.fromkeys(writers, 0)
    encode = EncodeTask(
        path=str(out / first.tokenizer.name),
        sha256=hashlib.sha256(first.tokenizer.data).hexdigest(),
        kind=first.tokenizer.kind,
        eod_token=first.tokenizer.eod_token,
        threads=1 if pool.n > 1 else None,  # a worker keeps to its core
        parse_special=opts.data_format == "chat",  # a template's markers are special tokens
    )
    task = RecordTask(encode) if opts.sft else encode
    total, off = first.plan.documents, not progress
    bar = tqdm(total=total, unit="doc", desc="tokenising", file=sys.stderr, disable=off)

    def todo() -> Iterator[tuple[Document, str]]:
        """The documents still to write, with their split; skips what the journal has."""
        for doc in _kept(files, opts, first.keep):
            split = first.plan.split_of(doc)
            seen[split] += 1
            if seen[split] > done[split]:
                yield doc, split
            else:
                bar.update()

    sent: deque[list[tuple[Document, str]]] = deque()

    def texts() -> Iterator[list[str]]:
        for batch in _batched(todo(), text=lambda d: d[0].text):
            sent.append(batch)
            yield [doc.text for doc, _ in batch]

    with bar, contextlib.closing(pool.map(task, texts())) as results:
        for packed in results:
            batch = sent.popleft()
            if not _feed(batch, unpack(*packed), writers, fed, opts.max_tokens):
                break
            bar.update(len(batch))
    return _manifest(out, opts, first, enc, writers)


def _writer(
    folder: Path,
    opts: Options,
    enc: Encoder,
    resume: WriterPosition | None,
    on_shard: Callable[[], None],
) -> ShardWriter | PackedWriter:
    """A split's writer: a token stream cut into samples, or fine-tuning records packed."""
    if opts.sft:
        assert opts.seq_len is not None
        return PackedWriter(
            folder,
            pad_id=enc.eod_id,
            window=opts.seq_len + 1,
            samples_per_shard=max(1, opts.shard_tokens // (opts.seq_len + 1)),
            resume=resume,
            on_shard=on_shard,
        )
    return ShardWriter(
        folder,
        dtype=enc.dtype,
        eod_id=enc.eod_id,
        sample_tokens=opts.sample_tokens,
        samples_per_shard=max(1, opts.shard_tokens // opts.sample_tokens),
        resume=resume,
        on_shard=on_shard,
    )


@dataclass
class _Fed:
    """The input index of the last document fed to a writer and the tokens fed up to it."""

    last_doc: int
    tokens: int


def _feed(
    batch: list[tuple[Document, str]],
    ids: list[np.ndarray],
    writers: dict[str, ShardWriter | PackedWriter],
    fed: _Fed,
    max_tokens: int | None,
) -> bool:
    """Add a batch to the writers; False once the `max_tokens` cap stops the pass (documents
    count whole: the one that reaches the cap is written). Documents up to `fed.last_doc` were
    under the cap when first fed (a resumed run skipped some of them without tokenising, so it
    cannot recount); later ones are counted here."""
    for (doc, split), doc_ids in zip(batch, ids, strict=True):
        if doc.index > fed.last_doc:
            if max_tokens is not None and fed.tokens >= max_tokens:
                return False
            fed.last_doc = doc.index
            fed.tokens += len(doc_ids) + writers[split].ADDED_TOKENS
        writers[split].add(doc_ids)
    return True


def _kept(files: list[Path], opts: Options, keep: np.ndarray) -> Iterator[Document]:
    """The documents the first pass kept, read again, in input order."""
    n = 0
    for n, text in enumerate(_read(files, opts), 1):  # noqa: B007 (the count is checked)
        if n > len(keep):
            break
        if keep[n - 1]:
            yield Document(n - 1, text, hashlib.blake2b(text.encode(), digest_size=16).digest())
    if n != len(keep):
        raise DataError(
            f"the inputs changed during preparation ({n} documents now, {len(keep)} before)"
        )


def _manifest(
    out: Path,
    opts: Options,
    first: _FirstPass,
    enc: Encoder,
    writers: dict[str, ShardWriter | PackedWriter],
) -> Manifest:
    splits = {name: SplitInfo(w.close()) for name, w in writers.items()}
    stats = PrepareStats(first.stats.input_files, first.stats.documents_read)
    stats.dropped = dict(first.stats.dropped)
    written = sum(s.documents for s in splits.values())
    if opts.max_tokens is not None:
        stats.dropped["max_tokens"] = first.plan.documents - written
    cause = "dropping windows without a trained token"  # the cap, or packing, empties a split
    if opts.max_tokens is not None:
        cause = f"--max-tokens {opts.max_tokens}"
    for name in [n for n, s in splits.items() if not s.shards]:
        if name == "train":
            raise DataError(f"{cause} leaves no training documents")
        log.warning("%s leaves split %r empty: left out", cause, name)
        del splits[name]
        with contextlib.suppress(OSError):  # leave a folder that holds other files
            (out / name).rmdir()
    window = None if opts.seq_len is None else opts.seq_len + 1
    return Manifest(
        root=out,
        vocab_size=enc.vocab_size,
        dtype=MASKED_DTYPE if opts.sft else enc.dtype.name,
        eod_token=enc.eod_token,
        eod_token_id=enc.eod_id,
        tokenizer_sha256=hashlib.sha256(first.tokenizer.data).hexdigest(),
        seed=opts.seed,
        sample_tokens=window or opts.sample_tokens,
        shard_tokens=opts.shard_tokens,
        val_fraction=opts.val_fraction,
        splits=splits,
        stats=stats.as_dict() | _packing_counts(writers),
        tokenizer=first.tokenizer.name,
        data_format=opts.data_format,
        loss_mask=opts.sft,
        window=window,
    )


def _packing_counts(writers: dict[str, ShardWriter | PackedWriter]) -> dict[str, int]:
    """The `PackedWriter` counters summed over the splits (none for pretraining data)."""
    packed = [w for w in writers.values() if isinstance(w, PackedWriter)]
    return {k: sum(w.counts[k] for w in packed) for k in PACKING_COUNTS} if packed else {}


def _fingerprint_options(opts: Options, loaded: TokenizerFile | None) -> dict[str, Any]:
    raw = asdict(opts)
    if loaded is not None:  # the tokenizer's content counts, not where it was
        raw["tokenizer"] = [loaded.kind, hashlib.sha256(loaded.data).hexdigest()]
    return {"options": raw, "prepare": PREPARE_VERSION, "tokenizers": tokenizers.__version__}


def _save_first_pass(work: WorkFolder, out: Path, first: _FirstPass) -> None:
    atomic_write(out / first.tokenizer.name, first.tokenizer.data)
    state = {
        "stats": first.stats.as_dict(),
        "plan": first.plan.to_json(),
        "tokenizer": {
            "name": first.tokenizer.name,
            "kind": first.tokenizer.kind,
            "eod_token": first.tokenizer.eod_token,
            "sha256": hashlib.sha256(first.tokenizer.data).hexdigest(),
        },
    }
    work.save_first_pass(state, first.keep)


def _load_first_pass(work: WorkFolder, out: Path) -> _FirstPass | None:
    saved = work.load_first_pass()
    if saved is None:
        return None
    state, keep = saved
    tok = state["tokenizer"]
    try:
        data = (out / tok["name"]).read_bytes()
    except OSError:
        return None
    if hashlib.sha256(data).hexdigest() != tok["sha256"]:
        return None
    return _FirstPass(
        PrepareStats.from_dict(state["stats"]),
        SplitPlan.from_json(state["plan"]),
        keep,
        TokenizerFile(tok["kind"], data, tok["eod_token"]),
    )


def _load_journal(work: WorkFolder, out: Path, plan: SplitPlan) -> Journal:
    """The journal to resume from, with the output cleared of everything it does not list."""
    journal = work.load_journal() or Journal({})
    listed = {s.path for p in journal.splits.values() for s in p.shards}
    if set(journal.splits) - set(plan.split_names()) or not all(
        (out / path).is_file() for path in listed
    ):
        log.warning("the shards of the interrupted run are incomplete: writing them again")
        journal, listed = Journal({}), set()
    elif listed:
        log.info("resuming: %d finished shard(s) kept", len(listed))
    (out / MANIFEST_NAME).unlink(missing_ok=True)
    for split_dir in (out / "train", out / "val"):
        for stale in sorted(split_dir.glob("shard-*.tar*")):
            if stale.relative_to(out).as_posix() not in listed:
                stale.unlink()
    return journal


def _clear_output(out: Path) -> None:
    """Make `out` an unfinished preparation: drop the manifest first, then our stale files."""
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST_NAME).unlink(missing_ok=True)
    for name in (TOKENIZER_NAME, SENTENCEPIECE_NAME):
        (out / name).unlink(missing_ok=True)
    for split_dir in (out / "train", out / "val"):
        for stale in sorted(split_dir.glob("shard-*.tar*")):
            stale.unlink()


def _batched(items: Iterator[T], *, text: Callable[[T], str]) -> Iterator[list[T]]:
    """Consecutive batches of at most `_BATCH_DOCS` items and (unless one item is longer)
    `_BATCH_CHARS` characters of text: small enough to spread evenly over the workers."""
    batch: list[T] = []
    chars = 0
    for item in items:
        n = len(text(item))
        if batch and (len(batch) == _BATCH_DOCS or chars + n > _BATCH_CHARS):
            yield batch
            batch, chars = [], 0
        batch.append(item)
        chars += n
    if batch:
        yield batch
