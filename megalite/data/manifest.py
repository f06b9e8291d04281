"""The on-disk format shared by preparation and training: `manifest.json` and the tar shards.

A prepared folder holds `tokenizer.json` (or a SentencePiece `tokenizer.model`, named by the
manifest's "tokenizer"), `manifest.json` and one folder of WebDataset tar shards per split
(`train/shard-000000.tar`, ...). The manifest is written last and atomically, so a folder without
one is an unfinished preparation. It records everything a reader needs without opening a
shard: the token dtype, the end-of-document id, and per shard its sample, document and token
counts and its sha256, which lets every data-parallel rank plan its share of an epoch from the
manifest alone and lets the reader detect a damaged shard.

Shards are plain WebDataset tars (`webdataset.WebDataset(url)` reads them), but this module reads
them with `tarfile`: the stream wants a whole shard in key order plus integrity checks, and
importing webdataset would pull torch into the data-preparation CLI.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

MANIFEST_NAME = "manifest.json"
TOKENIZER_NAME = "tokenizer.json"
FORMAT_VERSION = 1
TOKENS_SUFFIX = "tokens.npy"  # the one member of every tar sample: `<key>.tokens.npy`


class DataError(ValueError):
    """Data that cannot be prepared or read; the message is one line that names the culprit."""


@dataclass(frozen=True)
class ShardInfo:
    """One tar shard; `documents` counts the documents that end (with an EOD token) in it."""

    path: str  # relative to the prepared folder, with forward slashes
    samples: int
    documents: int
    tokens: int
    sha256: str


class SplitTotals:
    """Totals over `self.shards`, whose items count samples, documents and tokens."""

    shards: list[Any]

    @property
    def samples(self) -> int:
        return sum(s.samples for s in self.shards)

    @property
    def documents(self) -> int:
        return sum(s.documents for s in self.shards)

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.shards)


@dataclass(frozen=True)
class SplitInfo(SplitTotals):
    shards: list[ShardInfo]


@dataclass(frozen=True)
class Manifest:
    """What `load_manifest` returns: the parsed manifest plus the folder it was read from."""

    root: Path
    vocab_size: int
    dtype: str  # numpy dtype name of the stored tokens: "uint16" or "uint32"
    eod_token: str
    eod_token_id: int
    tokenizer_sha256: str
    seed: int
    sample_tokens: int
    shard_tokens: int
    val_fraction: float
    splits: dict[str, SplitInfo]
    stats: dict[str, int] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    tokenizer: str = TOKENIZER_NAME  # file name in `root`: tokenizer.json or a SentencePiece .model

    @property
    def tokenizer_path(self) -> Path:
        return self.root / self.tokenizer

    def split(self, split: str) -> SplitInfo:
        """The named split, or a `DataError` that lists the splits there are."""
        if split not in self.splits:
            have = ", ".join(sorted(self.splits)) or "none"
            raise DataError(f"{self.root} has no split {split!r} (splits: {have})")
        return self.splits[split]

    def shards(self, split: str) -> list[Path]:
        return [self.root / s.path for s in self.split(split).shards]

    def shard_samples(self, split: str) -> list[int]:
        return [s.samples for s in self.split(split).shards]

    def samples(self, split: str) -> int:
        return self.split(split).samples

    def tokens(self, split: str) -> int:
        return self.split(split).tokens

    def to_json(self) -> dict[str, Any]:
        """The manifest as written to disk: no root, no timestamps, totals added for readers."""
        out = {k: v for k, v in asdict(self).items() if k not in ("root", "splits")}
        out["splits"] = {
            name: {
                "shards": [asdict(s) for s in info.shards],
                "samples": info.samples,
                "documents": info.documents,
                "tokens": info.tokens,
            }
            for name, info in self.splits.items()
        }
        return out


def manifest_bytes(manifest: Manifest) -> bytes:
    """Canonical encoding (sorted keys, fixed indentation): identical data gives identical bytes."""
    return (json.dumps(manifest.to_json(), indent=2, sort_keys=True) + "\n").encode()


def atomic_write(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary name, fsynced, so readers never see a part."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_manifest(manifest: Manifest) -> Path:
    path = manifest.root / MANIFEST_NAME
    atomic_write(path, manifest_bytes(manifest))
    return path


def load_manifest(root: str | Path) -> Manifest:
    """Read and check `root/manifest.json`: every split has shards, every shard and the tokenizer
    exist. Raises `DataError` with a one-line message otherwise."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist")
    path = root / MANIFEST_NAME
    if not path.is_file():
        raise DataError(
            f"{root} holds no prepared data (no {MANIFEST_NAME}): "
            f"run tools/prepare_data.py --input ... --output {root}"
        )
    manifest = parse_manifest(path.read_bytes(), root=root, name=str(path))
    _check_files(manifest)
    return manifest


def parse_manifest(data: bytes, *, root: Path, name: str) -> Manifest:
    """A manifest's bytes → `Manifest` with `root`; `DataError` naming `name` if it is invalid."""
    try:
        return _from_json(root, json.loads(data))
    except (ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{name} is not a valid manifest: {exc}") from exc


def _from_json(root: Path, raw: dict[str, Any]) -> Manifest:
    version = raw["format_version"]
    if version != FORMAT_VERSION:
        raise ValueError(f"format_version {version}, this code reads {FORMAT_VERSION}")
    if raw["dtype"] not in ("uint16", "uint32"):
        raise ValueError(f"token dtype {raw['dtype']!r} is neither uint16 nor uint32")
    splits = {
        name: SplitInfo([ShardInfo(**s) for s in info["shards"]])
        for name, info in raw["splits"].items()
    }
    tokenizer = str(raw.get("tokenizer", TOKENIZER_NAME))
    if Path(tokenizer).name != tokenizer:
        raise ValueError(f"tokenizer {tokenizer!r} is not a file name")
    return Manifest(
        root=root,
        vocab_size=int(raw["vocab_size"]),
        dtype=str(raw["dtype"]),
        eod_token=str(raw["eod_token"]),
        eod_token_id=int(raw["eod_token_id"]),
        tokenizer_sha256=str(raw["tokenizer_sha256"]),
        seed=int(raw["seed"]),
        sample_tokens=int(raw["sample_tokens"]),
        shard_tokens=int(raw["shard_tokens"]),
        val_fraction=float(raw["val_fraction"]),
        splits=splits,
        stats={k: int(v) for k, v in raw.get("stats", {}).items()},
        tokenizer=tokenizer,
    )


def _check_files(manifest: Manifest) -> None:
    root = manifest.root
    if not manifest.splits:
        raise DataError(f"{root / MANIFEST_NAME} lists no splits")
    for name, info in manifest.splits.items():
        if not info.shards:
            raise DataError(f"split {name!r} in {root / MANIFEST_NAME} has no shards")
        for shard in info.shards:
            if not (root / shard.path).is_file():
                raise DataError(f"shard {root / shard.path} is listed in the manifest but missing")
    if not manifest.tokenizer_path.is_file():
        raise DataError(f"tokenizer {manifest.tokenizer_path} is missing")


@dataclass(frozen=True)
class WriterPosition:
    """How far a `ShardWriter` got, as of its last written shard: its shards, how many of the
    split's documents lie wholly in them, and how many tokens (EOD included) of the next one."""

    shards: list[ShardInfo]
    documents_done: int = 0
    tokens_into_next: int = 0

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "shards": [asdict(s) for s in self.shards]}

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> WriterPosition:
        shards = [ShardInfo(**s) for s in raw["shards"]]
        return cls(shards, int(raw["documents_done"]), int(raw["tokens_into_next"]))


class ShardWriter:
    """One split's documents → one token stream → samples of `sample_tokens` tokens → shards of
    `samples_per_shard` samples in `folder`, each written atomically as soon as it is full.

    Resumable: `position` is updated after every shard (and `on_shard` called), and a writer made
    with `resume=position` continues that stream exactly, given the split's documents from
    `position.documents_done` on (the first is cut by the `tokens_into_next` already written).
    """

    def __init__(
        self,
        folder: Path,
        *,
        dtype: np.dtype,
        eod_id: int,
        sample_tokens: int,
        samples_per_shard: int,
        resume: WriterPosition | None = None,
        on_shard: Callable[[], None] | None = None,
    ) -> None:
        self.folder, self.dtype, self.eod_id = folder, dtype, eod_id
        self.sample_tokens, self.samples_per_shard = sample_tokens, samples_per_shard
        self.on_shard = on_shard
        folder.mkdir(parents=True, exist_ok=True)
        self.position = resume or WriterPosition([])
        self._shards: list[ShardInfo] = list(self.position.shards)
        self._next_key = sum(s.samples for s in self._shards)
        self._stream_pos = sum(s.tokens for s in self._shards)  # offset of the first pending token
        self._skip = self.position.tokens_into_next  # to drop from the next document added
        self._docs_done = self.position.documents_done
        self._done_end = self._stream_pos - self._skip  # stream offset past the last done document
        self._pending: list[np.ndarray] = []  # token pieces not yet cut into samples
        self._pending_tokens = 0
        self._doc_ends: deque[int] = deque()  # split-stream offsets just past each document
        self._samples: list[np.ndarray] = []  # samples of the shard being filled
        self._shard_docs = 0

    def add(self, ids: np.ndarray) -> None:
        """Append one document's token ids; the EOD token is added here."""
        doc = np.append(ids, self.eod_id)  # (n + 1,)
        if self._skip:
            if self._skip >= len(doc):
                raise DataError(f"cannot resume {self.folder}: the input no longer matches")
            doc, self._skip = doc[self._skip :], 0
        self._pending.append(doc)
        self._pending_tokens += len(doc)
        self._doc_ends.append(self._stream_pos + self._pending_tokens)
        if self._pending_tokens >= self.sample_tokens:
            self._cut(final=False)

    def close(self) -> list[ShardInfo]:
        self._cut(final=True)
        if self._samples:
            self._write_shard()
        return self._shards

    def _cut(self, *, final: bool) -> None:
        if not self._pending:
            return
        tokens = np.concatenate(self._pending).astype(self.dtype)  # (pending_tokens,)
        n_full = len(tokens) // self.sample_tokens
        ends = [self.sample_tokens * (i + 1) for i in range(n_full)]
        if final and len(tokens) % self.sample_tokens:
            ends.append(len(tokens))  # the last sample of a split may be short
        start = 0
        for end in ends:
            self._add_sample(tokens[start:end])
            start = end
        self._pending = [tokens[start:]] if start < len(tokens) else []
        self._pending_tokens = len(tokens) - start

    def _add_sample(self, sample: np.ndarray) -> None:
        self._stream_pos += len(sample)
        while self._doc_ends and self._doc_ends[0] <= self._stream_pos:
            self._done_end = self._doc_ends.popleft()
            self._shard_docs += 1
            self._docs_done += 1
        self._samples.append(sample)
        if len(self._samples) == self.samples_per_shard:
            self._write_shard()

    def _write_shard(self) -> None:
        name = f"shard-{len(self._shards):06d}.tar"
        data = shard_bytes(self._samples, first_key=self._next_key)
        atomic_write(self.folder / name, data)
        self._shards.append(
            ShardInfo(
                path=f"{self.folder.name}/{name}",
                samples=len(self._samples),
                documents=self._shard_docs,
                tokens=sum(len(s) for s in self._samples),
                sha256=hashlib.sha256(data).hexdigest(),
            )
        )
        self._next_key += len(self._samples)
        self._samples, self._shard_docs = [], 0
        self.position = WriterPosition(
            list(self._shards), self._docs_done, self._stream_pos - self._done_end
        )
        if self.on_shard is not None:
            self.on_shard()


def shard_bytes(samples: list[np.ndarray], *, first_key: int) -> bytes:
    """A WebDataset tar with one `<key>.tokens.npy` member per sample, keys counting up from
    `first_key`. Fixed metadata (mtime 0, uid/gid 0, no user names) makes the bytes depend on the
    tokens alone."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for i, sample in enumerate(samples):
            npy = io.BytesIO()
            np.lib.format.write_array(npy, sample, allow_pickle=False)
            info = tarfile.TarInfo(f"{first_key + i:09d}.{TOKENS_SUFFIX}")
            info.size, info.mtime, info.mode = npy.tell(), 0, 0o444
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            npy.seek(0)
            tar.addfile(info, npy)
    return buf.getvalue()


def read_shard(path: Path, info: ShardInfo, *, dtype: str) -> list[np.ndarray]:
    """All samples of one local shard, in key order, as arrays of `dtype` (see `decode_shard`)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read shard {path}: {exc.strerror}") from exc
    return decode_shard(data, info, dtype=dtype, name=str(path))


def decode_shard(data: bytes, info: ShardInfo, *, dtype: str, name: str) -> list[np.ndarray]:
    """The samples of a shard's bytes, in key order, as arrays of `dtype`.

    The bytes are checked against the manifest (sha256, sample and token counts) before and after
    decoding, so a truncated or overwritten shard raises `DataError` naming it (`name`: its path
    or URL) instead of yielding wrong tokens or stalling a reader.
    """
    found = hashlib.sha256(data).hexdigest()
    if found != info.sha256:
        raise DataError(
            f"shard {name} is corrupt ({len(data)} bytes, sha256 {found[:16]}…, the manifest's "
            f"{info.sha256[:16]}…): restore the file or prepare the data again"
        )
    try:
        samples = _decode_tar(data, np.dtype(dtype))
    except Exception as exc:  # tarfile/numpy raise many types for damaged bytes
        raise DataError(f"shard {name} is corrupt: {exc}") from exc
    tokens = sum(len(s) for s in samples)
    if len(samples) != info.samples or tokens != info.tokens:
        raise DataError(
            f"shard {name} holds {len(samples)} samples / {tokens} tokens, "
            f"the manifest says {info.samples} / {info.tokens}"
        )
    return samples


def _decode_tar(data: bytes, dtype: np.dtype) -> list[np.ndarray]:
    """Tar bytes → the samples in key order, as read-only views into `data` (no copies)."""
    members: list[tuple[str, np.ndarray]] = []
    headers: dict[bytes, tuple[tuple[int, ...], np.dtype]] = {}
    view = memoryview(data)
    for name, start, size in _tar_members(data):
        key, _, suffix = name.partition(".")
        if suffix != TOKENS_SUFFIX:
            raise ValueError(f"unexpected member {name!r}")
        raw = view[start : start + size]
        if len(raw) != size:
            raise ValueError(f"member {name!r} is cut short")
        array = _decode_npy(raw, headers)
        if array.dtype != dtype or array.ndim != 1:
            raise ValueError(f"member {name!r} is {array.dtype}{list(array.shape)}")
        members.append((key, array))
    members.sort(key=lambda m: m[0])
    return [array for _, array in members]


def _tar_members(data: bytes) -> list[tuple[str, int, int]]:
    """(name, data offset, size) of each regular file in a tar.

    The shards `shard_bytes` writes (plain USTAR headers, regular files) are parsed here directly,
    several times faster than `tarfile`, which sets the pace of streaming otherwise; anything
    else — another header type, a damaged header — goes to `tarfile`, which parses or rejects it.
    Only for bytes whose sha256 matched the manifest: header checksums are not checked here.
    """
    out: list[tuple[str, int, int]] = []
    pos, end = 0, len(data)
    while pos + 512 <= end:
        header = data[pos : pos + 512]
        if header == _ZERO_BLOCK:
            return out
        if header[257:263] != b"ustar\x00" or header[156:157] not in (b"0", b"\x00") or header[345]:
            break  # not the plain USTAR file header we write
        try:  # (no header checksum: the caller has checked the whole file's sha256)
            size = int(header[124:136].rstrip(b"\x00 ") or b"0", 8)
        except ValueError:
            break
        name = header[:100].rstrip(b"\x00").decode("utf-8")
        out.append((name, pos + 512, size))
        pos += 512 + -(-size // 512) * 512
    return _tarfile_members(data)


def _tarfile_members(data: bytes) -> list[tuple[str, int, int]]:
    out = []
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        for info in tar:
            if not info.isreg():
                raise ValueError(f"unexpected member {info.name!r}")
            out.append((info.name, info.offset_data, info.size))
    return out


_ZERO_BLOCK = bytes(512)


def _decode_npy(
    raw: memoryview, headers: dict[bytes, tuple[tuple[int, ...], np.dtype]]
) -> np.ndarray:
    """.npy bytes → array. All full samples of a shard share one header, so each distinct header
    is parsed once (numpy's parser costs more than the copy-free decode itself)."""
    last = headers.get(b"")  # the previous member's header: the common case, compared in place
    if last is not None and raw[: len(last[0])] == last[0]:
        header = last[0]
        return np.frombuffer(raw, dtype=last[2], offset=len(header)).reshape(last[1])
    if bytes(raw[:8]) != b"\x93NUMPY\x01\x00":  # not format 1.0: let numpy handle it
        return np.lib.format.read_array(io.BytesIO(raw), allow_pickle=False)
    end = 10 + int.from_bytes(raw[8:10], "little")
    header = bytes(raw[:end])
    if header not in headers:
        f = io.BytesIO(header)
        np.lib.format.read_magic(f)
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        if fortran or dtype.hasobject:
            raise ValueError("unsupported .npy layout")
        headers[header] = (shape, dtype)
    shape, dtype = headers[header]
    headers[b""] = (header, shape, dtype)  # type: ignore[assignment]
    return np.frombuffer(raw[end:], dtype=dtype).reshape(shape)
