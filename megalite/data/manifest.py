"""The on-disk format shared by preparation and training: `manifest.json` and the tar shards
(the shards' bytes: `codec`; writing them: `writer`).

A prepared folder holds `tokenizer.json` (or a SentencePiece `tokenizer.model`, named by the
manifest's "tokenizer"), `manifest.json` and one folder of WebDataset tar shards per split
(`train/shard-000000.tar`, ...). The manifest is written last and atomically, so a folder without
one is an unfinished preparation. It records everything a reader needs without opening a
shard: the token dtype, the end-of-document id, and per shard its sample, document and token
counts, its sha256 and (format 2) its xxh3-64, which lets every data-parallel rank plan its
share of an epoch from the manifest alone and lets the reader detect a damaged shard.

Format versions: 1 checks a shard's bytes by their sha256; 2 (written since) records its
xxh3-64 as well and checks that (`ShardInfo.checksum`). sha256 runs at about 1 GB/s on one core,
slower than a disk reads, and set the pace of streaming; xxh3 runs at over 10 GB/s and catches
damage (a cut, overwritten or partly downloaded file) as surely — it is no defence against
deliberately forged shards, which sha256 in the manifest of a trusted folder was not either. The
tar shards are the same bytes in both, and version-1 folders are read as before (the same
manifest bytes, hence the same data id for a resumed run's stream state).

Shards are plain WebDataset tars (`webdataset.WebDataset(url)` reads them).

Fine-tuning data (`--format chat|prompt-response`) adds `data_format`, `loss_mask: true` (the
tokens are int32, a context token stored as -(id + 1): `loss_mask.py`) and `window`: every sample
is one packed window of exactly that many tokens (seq_len + 1), which a stream must read whole.
These keys are written only when they differ from pretraining's defaults, so a pretraining
manifest is the same bytes as before they existed, and old manifests load unchanged.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from megalite.data.errors import DataError
from megalite.data.loss_mask import MASKED_DTYPE
from megalite.files import atomic_write

MANIFEST_NAME = "manifest.json"
TOKENIZER_NAME = "tokenizer.json"
FORMAT_VERSION = 2  # written; READ_VERSIONS are read
READ_VERSIONS = (1, 2)
TOKENS_SUFFIX = "tokens.npy"  # the one member of every tar sample: `<key>.tokens.npy`
DTYPES = ("uint16", "uint32", MASKED_DTYPE)
_SFT_DEFAULTS = {"data_format": "text", "loss_mask": False, "window": None}  # left out of JSON


@dataclass(frozen=True)
class ShardInfo:
    """One tar shard; `documents` counts the documents that end (with an EOD token) in it."""

    path: str  # relative to the prepared folder, with forward slashes
    samples: int
    documents: int
    tokens: int
    sha256: str
    xxh3_64: str | None = None  # format 2: the bytes' xxh3-64 (hex), what reads check

    @property
    def checksum(self) -> tuple[str, str]:
        """(algorithm, hex digest) a read of the shard's bytes is checked against: the xxh3-64
        where the manifest records it (format 2), else the sha256 (format 1)."""
        return ("sha256", self.sha256) if self.xxh3_64 is None else ("xxh3_64", self.xxh3_64)

    def to_json(self) -> dict[str, Any]:
        """The shard's manifest entry; a format-1 shard's without `xxh3_64`, as format 1 wrote
        it."""
        return {k: v for k, v in asdict(self).items() if k != "xxh3_64" or v is not None}


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
    dtype: str  # numpy dtype name of the stored tokens: "uint16", "uint32" (or int32: loss_mask)
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
    data_format: str = "text"  # "text" (pretraining), "chat" or "prompt-response" (fine-tuning)
    loss_mask: bool = False  # tokens carry the loss mask (`loss_mask.py`)
    window: int | None = None  # tokens per packed sample (seq_len + 1); None: a token stream

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
        for key, default in _SFT_DEFAULTS.items():
            if out[key] == default:
                del out[key]
        out["splits"] = {
            name: {
                "shards": [s.to_json() for s in info.shards],
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
    if version not in READ_VERSIONS or isinstance(version, bool):
        reads = " and ".join(map(str, READ_VERSIONS))
        raise ValueError(f"format_version {version}, this code reads {reads}")
    if raw["dtype"] not in DTYPES:
        raise ValueError(f"token dtype {raw['dtype']!r} is not one of {', '.join(DTYPES)}")
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
        format_version=int(version),
        tokenizer=tokenizer,
        data_format=str(raw.get("data_format", "text")),
        loss_mask=bool(raw.get("loss_mask", False)),
        window=None if raw.get("window") is None else int(raw["window"]),
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
